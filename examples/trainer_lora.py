"""Fine-tune a Hugging Face causal LM with deltakern's fused LoRA through transformers' ``Trainer``.

The model is a tiny random ``LlamaForCausalLM`` built from a config and the data a tiny synthetic
dataset, so nothing downloads and it runs on the CPU in seconds; swap in
``AutoModelForCausalLM.from_pretrained(...)`` and your tokenised dataset for real work. The only
deltakern line is ``deltakern.add_lora``: the Trainer, its optimiser, gradient checkpointing and
DDP work on the patched model as on any other.

    python examples/trainer_lora.py [--gradient-checkpointing] [--steps 8]
    torchrun --nproc-per-node 2 examples/trainer_lora.py      # DDP (gloo on the CPU)
    python examples/trainer_lora.py --save-dir lora-out      # then deltakern.load(base, "lora-out")
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

import deltakern

# r, alpha, dropout and targets as a PEFT LoraConfig would name them (r, lora_alpha, lora_dropout,
# target_modules); deltakern.save writes a PEFT checkpoint with these settings.
LORA = {"r": 8, "alpha": 16, "dropout_p": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
VOCAB, LENGTH = 128, 16


def build_base(seed: int = 0) -> transformers.LlamaForCausalLM:
    """A tiny random Llama (hidden 64, 2 layers, 4 heads of 16, 2 KV heads), fp32."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def build_model(seed: int = 0) -> transformers.LlamaForCausalLM:
    """The tiny Llama with deltakern's LoRA on every projection; only the LoRA factors train."""
    model = build_base(seed)
    deltakern.add_lora(model, **LORA)
    return model


def dataset(size: int = 64, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``size`` sequences of ``LENGTH`` tokens, each counting up from a random start by a random
    stride (a pattern a model can learn), as causal-LM examples (labels = input_ids)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(3, VOCAB, (size, 1), generator=g)
    stride = torch.randint(1, 4, (size, 1), generator=g)
    ids = 3 + (start - 3 + stride * torch.arange(LENGTH)) % (VOCAB - 3)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def training_arguments(options: argparse.Namespace, output_dir: str) -> transformers.TrainingArguments:
    """CPU-friendly Trainer settings: no reporting, no checkpoints, no dataloader workers, a log
    line (the loss) every step."""
    return transformers.TrainingArguments(
        output_dir=output_dir, max_steps=options.steps, per_device_train_batch_size=options.batch_size,
        learning_rate=options.lr, optim=options.optim, lr_scheduler_type="constant", seed=options.seed,
        activation_checkpointing=options.gradient_checkpointing,  # transformers 5's name for gradient checkpointing
        ddp_find_unused_parameters=False,  # every LoRA factor gets a gradient
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True,
    )


def train(model: torch.nn.Module, args: transformers.TrainingArguments) -> list[float]:
    """Train ``model`` with ``Trainer``; returns the loss of every step (averaged over processes)."""
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(),
                                   data_collator=transformers.default_data_collator)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--optim", default="adamw_torch", help="a TrainingArguments optim, e.g. adamw_torch, sgd")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-dir", help="write the trained LoRA here (a PEFT checkpoint) with deltakern.save")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[float]:
    """Build, train and print the loss of every step; returns the losses."""
    options = parse(argv)
    model = build_model(options.seed)
    with tempfile.TemporaryDirectory() as output_dir:
        args = training_arguments(options, output_dir)
        if args.process_index == 0:
            print(f"{deltakern.trainable_parameters(model)}; {args.world_size} process(es)", flush=True)
        losses = train(model, args)
    if args.process_index == 0:
        for step, loss in enumerate(losses, 1):
            print(f"step {step}: loss {loss:.6f}", flush=True)
        if options.save_dir:
            deltakern.save(model, options.save_dir)  # under DDP every process holds the same weights
            print(f"saved the LoRA to {options.save_dir}", flush=True)
    return losses


if __name__ == "__main__":
    main()
