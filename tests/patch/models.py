"""Tiny models of every supported family, built from configs with random weights (nothing downloads).

``build(family)`` returns a model in eval mode in fp32 with seeded weights; ``inputs(family, ...)``
returns a batch with left padding on the second row (decoder-only and encoder families) as a dict
of keyword arguments for the model's forward.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 96
FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "bert", "roberta", "t5")
DECODER_ONLY = ("llama", "qwen2", "mistral", "gpt2")


def config(family: str):
    common_llama = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return transformers.LlamaConfig(**common_llama)
    if family == "qwen2":
        return transformers.Qwen2Config(**common_llama)
    if family == "mistral":
        return transformers.MistralConfig(**common_llama, sliding_window=None)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "bert":
        return transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=48, max_position_embeddings=128, pad_token_id=0)
    if family == "roberta":
        return transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=48, max_position_embeddings=130, pad_token_id=1)
    if family == "t5":
        return transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                     decoder_start_token_id=0)
    raise KeyError(family)


def build(family: str, seed: int = 0, task: str = "lm", **overrides) -> torch.nn.Module:
    """A tiny model of ``family``; ``task="lm"``: causal LM, masked LM (BERT/RoBERTa) or seq2seq LM (T5);
    ``task="cls"``: sequence classification with 3 labels (BERT/RoBERTa). ``overrides`` set config fields."""
    torch.manual_seed(seed)
    cfg = config(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    if task == "cls":
        cfg.num_labels = 3
        model = transformers.AutoModelForSequenceClassification.from_config(cfg)
    elif family in DECODER_ONLY:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    elif family == "t5":
        model = transformers.T5ForConditionalGeneration(cfg)
    else:
        model = transformers.AutoModelForMaskedLM.from_config(cfg)
    return model.eval()


def inputs(family: str, batch: int = 2, length: int = 9, pad: int = 3, seed: int = 1) -> dict:
    """input_ids and attention_mask with the last row left-padded by ``pad`` tokens; T5 also gets
    decoder_input_ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    pad_id = config(family).pad_token_id
    if pad:
        mask[-1, :pad] = 0
        ids[-1, :pad] = pad_id
    out = {"input_ids": ids, "attention_mask": mask}
    if family == "t5":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    return out


def loss_of(out: torch.Tensor) -> torch.Tensor:
    """A scalar that weighs every output element with a fixed random weight, so each element's
    gradient is exercised (a plain sum would hide errors that cancel)."""
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    return (out * weights).sum()


def logits(model: torch.nn.Module, family: str) -> torch.Tensor:
    """The logits of ``model`` on :func:`inputs` of ``family``."""
    return model(**inputs(family)).logits


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 gradients summed in another order: T5's unscaled attention gives delta gradients up to
    ~100, so the absolute tolerance scales with the tensor's largest entry (1e-5 of it)."""
    torch.testing.assert_close(actual, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-4)


def named_layers(model: torch.nn.Module, layer_type: type | tuple[type, ...]) -> dict[str, torch.nn.Module]:
    """{qualified name: module} of the modules of ``model`` that are ``layer_type`` (or one of them)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, layer_type)}


def quantize_with_bitsandbytes(model: torch.nn.Module, names, compute_dtype=torch.float32) -> torch.nn.Module:
    """``model`` with each ``nn.Linear`` whose last name part is in ``names`` replaced by
    bitsandbytes' NF4 ``Linear4bit`` (fp32 absmax: deltakern.quantize's bytes; see
    ``deltakern.nf4.bnb_linear4bit``), marked loaded in 4 bits as transformers marks it."""
    from deltakern.nf4 import bnb_linear4bit

    for name, layer in list(named_layers(model, torch.nn.Linear).items()):
        if name.rpartition(".")[2] in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, bnb_linear4bit(layer, compute_dtype))
    model.is_loaded_in_4bit = True
    return model


def draw_normal(model: torch.nn.Module, name_part: str, mean: float = 0.0, std: float = 1.0) -> None:
    """Redraws, from torch's generator, every parameter whose name contains ``name_part`` (e.g.
    ``lora_B``, zero at initialisation, so that the delta shows in the outputs)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name_part in name:
                p.normal_(mean, std)


def assert_same_adapter_tensors(ours_dir, peft_dir) -> None:
    """The adapter_model.safetensors of two checkpoints hold the same keys and, bit for bit, the
    same tensors."""
    from safetensors.torch import load_file

    ours = load_file(Path(ours_dir) / "adapter_model.safetensors")
    theirs = load_file(Path(peft_dir) / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0)
