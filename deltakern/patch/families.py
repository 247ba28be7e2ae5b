"""Where the delta modules go in each supported model family.

A *family* is a table of module paths inside one transformer block: the self-attention module
(whose attention call goes through transformers' ``AttentionInterface``), its output projection,
the feed-forward module and the FFN's output projection. Blocks are found by a pattern on the
fully qualified module names, so the table holds no per-model code, only names.

| family | blocks | self-attention | attn. output | FFN | FFN output |
|---|---|---|---|---|---|
| Llama, Qwen2, Mistral | ``layers.N`` | ``self_attn`` | ``self_attn.o_proj`` | ``mlp`` | ``mlp.down_proj`` |
| GPT-2 (Conv1D weights) | ``h.N`` | ``attn`` | ``attn.c_proj`` | ``mlp`` | ``mlp.c_proj`` |
| BERT, RoBERTa | ``encoder.layer.N`` | ``attention.self`` | ``attention.output.dense`` | ``intermediate`` + ``output`` | ``output.dense`` |
| T5 | ``encoder.block.N``, ``decoder.block.N`` | ``layer.0.SelfAttention`` | ``layer.0.SelfAttention.o`` | ``layer.-1.DenseReluDense`` | ``layer.-1.DenseReluDense.wo`` |

T5's cross-attention (``layer.1.EncDecAttention`` in decoder blocks) is not a self-attention
site: it gets no prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    """One row of the table above. Paths are relative to a block; alternatives are tried in order
    (T5's FFN sits at ``layer.1`` in encoder blocks and ``layer.2`` in decoder blocks)."""

    name: str
    model_types: tuple[str, ...]
    block_pattern: str
    attention: str
    attention_output: str
    ffn: tuple[str, ...]
    ffn_output: tuple[str, ...]
    # Attribute names on the self-attention module: (query heads, key/value heads, head dim).
    heads_attr: str
    kv_heads_attr: str
    head_dim_attr: str
    causal: bool
    # Whether the block adds the residual after a LayerNorm of the sublayer output (BERT) rather
    # than feeding a normalised input to the sublayer (pre-LN).
    post_layernorm: bool = False


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "qwen2", "mistral"), r"(?:^|\.)layers\.(\d+)$", "self_attn", "self_attn.o_proj",
           ("mlp",), ("mlp.down_proj",), "config.num_attention_heads", "config.num_key_value_heads", "head_dim", True),
    Family("gpt2", ("gpt2",), r"(?:^|\.)h\.(\d+)$", "attn", "attn.c_proj", ("mlp",), ("mlp.c_proj",),
           "num_heads", "num_heads", "head_dim", True),
    Family("bert", ("bert", "roberta"), r"(?:^|\.)encoder\.layer\.(\d+)$", "attention.self", "attention.output.dense",
           ("output",), ("output.dense",), "num_attention_heads", "num_attention_heads", "attention_head_size", False,
           post_layernorm=True),
    Family("t5", ("t5",), r"(?:^|\.)(encoder|decoder)\.block\.(\d+)$", "layer.0.SelfAttention", "layer.0.SelfAttention.o",
           ("layer.1.DenseReluDense", "layer.2.DenseReluDense"), ("layer.1.DenseReluDense.wo", "layer.2.DenseReluDense.wo"),
           "n_heads", "n_heads", "key_value_proj_dim", False),
)


@dataclass
class Block:
    """One transformer block of a model, with its modules resolved from the family table.

    ``stack`` is ``"encoder"`` or ``"decoder"`` for T5 and ``""`` for single-stack models;
    ``index`` counts blocks within the stack. ``causal`` is True for decoder self-attention.
    """

    name: str
    module: nn.Module
    stack: str
    index: int
    attention_name: str
    attention: nn.Module
    attention_output_name: str
    ffn_name: str
    ffn_output_name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool


def _attr_path(module: nn.Module, dotted: str):
    value = module
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _first_existing(block: nn.Module, block_name: str, paths: tuple[str, ...]) -> str:
    for path in paths:
        try:
            block.get_submodule(path)
        except AttributeError:
            continue
        return f"{block_name}.{path}"
    raise ValueError(f"deltakern: block {block_name!r} has none of the modules {', '.join(paths)}")


def looked_for() -> str:
    """What the family table searches for, for error messages."""
    rows = [f"{f.name} ({', '.join(f.model_types)}): blocks /{f.block_pattern}/ with self-attention {f.attention!r}"
            for f in FAMILIES]
    return "; ".join(rows)


def family_of(model: nn.Module, caller: str) -> Family:
    """The family of ``model`` (by ``config.model_type``), or a ``ValueError`` naming the table."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ValueError(
        f"{caller}: {type(model).__name__} (model_type={model_type!r}) is not a supported family; "
        f"looked for {looked_for()}"
    )


def blocks(model: nn.Module, caller: str) -> list[Block]:
    """Every transformer block of ``model`` in module order, or a ``ValueError`` naming what was
    looked for when the model is outside the table or none of its blocks match."""
    family = family_of(model, caller)
    pattern = re.compile(family.block_pattern)
    found: list[Block] = []
    for name, module in model.named_modules():
        match = pattern.search(name)
        if match is None:
            continue
        stack = match.group(1) if match.re.groups == 2 else ""
        try:
            attention = module.get_submodule(family.attention)
        except AttributeError:
            continue
        causal = family.causal or stack == "decoder"
        found.append(Block(
            name=name, module=module, stack=stack, index=int(match.group(match.re.groups)),
            attention_name=f"{name}.{family.attention}", attention=attention,
            attention_output_name=f"{name}.{family.attention_output}",
            ffn_name=_first_existing(module, name, family.ffn),
            ffn_output_name=_first_existing(module, name, family.ffn_output),
            num_heads=int(_attr_path(attention, family.heads_attr)),
            num_kv_heads=int(_attr_path(attention, family.kv_heads_attr)),
            head_dim=int(_attr_path(attention, family.head_dim_attr)),
            causal=causal,
        ))
    if not found:
        raise ValueError(
            f"{caller}: found no transformer blocks with self-attention in {type(model).__name__}; "
            f"looked for {family.name} blocks /{family.block_pattern}/ holding {family.attention!r}"
        )
    return found
