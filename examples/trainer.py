"""Fine-tune Hugging Face models with deltakern's delta methods through transformers' ``Trainer``.

Three methods, each on the model it is usually trained on:

- ``lora``: LoRA on every projection of a causal LM (a tiny Llama), ``deltakern.add_lora``;
- ``prefix``: prefix tuning (P-tuning v2) of a sequence-classification BERT, ``deltakern.add_prefix``,
  with the classifier head trained too (as PEFT does for ``task_type="SEQ_CLS"``);
- ``adapters``: Houlsby bottleneck adapters in the tiny Llama, ``deltakern.add_adapters``.

The models are tiny and random, built from configs, and the data synthetic, so nothing downloads
and each method trains on the CPU in seconds; swap in ``from_pretrained(...)`` and your tokenised
dataset for real work. The deltakern lines are the ``add_*`` call (and, for classification, the
head made trainable): the Trainer, its optimiser, gradient checkpointing and DDP work on the
patched model as on any other.

    python examples/trainer.py [--method lora prefix adapters] [--gradient-checkpointing] [--steps 8]
    torchrun --nproc-per-node 2 examples/trainer.py      # DDP (gloo on the CPU)
    python examples/trainer.py --save-dir out            # then deltakern.load(base, "out/lora")
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import transformers

import deltakern

METHODS = ("lora", "prefix", "adapters")
# r, alpha, dropout and targets as a PEFT LoraConfig would name them (r, lora_alpha, lora_dropout,
# target_modules); deltakern.save writes a PEFT checkpoint with these settings.
LORA = {"r": 8, "alpha": 16, "dropout_p": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
PREFIX = {"num_virtual_tokens": 4}
ADAPTERS = {"bottleneck": 16, "placement": "houlsby"}
VOCAB, LENGTH, LABELS = 128, 16, 2


def build_base(method: str, seed: int = 0) -> torch.nn.Module:
    """The method's base model, fp32: for ``lora`` and ``adapters`` a tiny random Llama causal LM
    (hidden 64, 2 layers, 4 heads of 16, 2 KV heads); for ``prefix`` a tiny random BERT for
    sequence classification (hidden 64, 2 layers, 4 heads, 2 labels, dropout off so runs compare
    exactly)."""
    torch.manual_seed(seed)
    if method == "prefix":
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, max_position_embeddings=64, num_labels=LABELS,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
        return transformers.BertForSequenceClassification(config)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config)


def build_model(method: str, seed: int = 0) -> torch.nn.Module:
    """The base with the method's delta; only the delta (and for ``prefix`` the classifier) trains."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    model = build_base(method, seed)
    if method == "lora":
        deltakern.add_lora(model, **LORA)
    elif method == "prefix":
        deltakern.add_prefix(model, **PREFIX)
        # add_prefix freezes the whole base; a new task's head must learn too (PEFT's SEQ_CLS
        # trains it as a module to save, and deltakern.save writes it beside the prefixes).
        model.classifier.requires_grad_(True)
        # BERT's classifier takes **kwargs but ignores num_items_in_batch, so Trainer (transformers
        # 5) would scale its mean loss by the number of DDP processes; this is Trainer's switch
        # for models that average their loss themselves (the same holds without deltakern).
        model.accepts_loss_kwargs = False
    else:
        deltakern.add_adapters(model, **ADAPTERS)
    return model


def dataset(method: str, size: int = 64, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``size`` sequences of ``LENGTH`` tokens, each counting up from a random start by a random
    stride (a pattern a model can learn): causal-LM examples (labels = input_ids), or for
    ``prefix`` classification examples labelled by the stride being 1 or not."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(3, VOCAB, (size, 1), generator=g)
    stride = torch.randint(1, 4, (size, 1), generator=g)
    ids = 3 + (start - 3 + stride * torch.arange(LENGTH)) % (VOCAB - 3)
    if method == "prefix":
        return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": (s != 1).long().squeeze(0)}
                for row, s in zip(ids, stride)]
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def training_arguments(options: argparse.Namespace, output_dir: str) -> transformers.TrainingArguments:
    """CPU-friendly Trainer settings: no reporting, no checkpoints, no dataloader workers, a log
    line (the loss) every step."""
    return transformers.TrainingArguments(
        output_dir=output_dir, max_steps=options.steps, per_device_train_batch_size=options.batch_size,
        learning_rate=options.lr, optim=options.optim, lr_scheduler_type="constant", seed=options.seed,
        activation_checkpointing=options.gradient_checkpointing,  # transformers 5's name for gradient checkpointing
        ddp_find_unused_parameters=False,  # every delta parameter gets a gradient
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True,
    )


def train(model: torch.nn.Module, method: str, args: transformers.TrainingArguments) -> list[float]:
    """Train ``model`` with ``Trainer`` on the method's data; returns the loss of every step
    (averaged over processes)."""
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(method),
                                   data_collator=transformers.default_data_collator)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", nargs="+", choices=METHODS, default=["lora"], help="one or more, trained in turn")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--optim", default="adamw_torch", help="a TrainingArguments optim, e.g. adamw_torch, sgd")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-dir", help="write each trained delta to <save-dir>/<method> (a PEFT checkpoint) "
                                           "with deltakern.save")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    """Build, train and print the loss of every step of each method; returns the losses by method."""
    options = parse(argv)
    losses = {}
    for method in options.method:
        model = build_model(method, options.seed)
        with tempfile.TemporaryDirectory() as output_dir:
            args = training_arguments(options, output_dir)
            if args.process_index == 0:
                print(f"{method}: {deltakern.trainable_parameters(model)}; {args.world_size} process(es)", flush=True)
            losses[method] = train(model, method, args)
        if args.process_index == 0:
            for step, loss in enumerate(losses[method], 1):
                print(f"{method} step {step}: loss {loss:.6f}", flush=True)
            if options.save_dir:
                directory = os.path.join(options.save_dir, method)
                deltakern.save(model, directory)  # under DDP every process holds the same weights
                print(f"saved the {method} delta to {directory}", flush=True)
    return losses


if __name__ == "__main__":
    main()
