"""``add_prefix``: prefix tuning (P-tuning v2) through transformers' ``AttentionInterface``.

How a prefixed model runs
-------------------------
- ``model.deltakern_prefix`` is one :class:`deltakern.nn.PrefixEncoder` for the whole model; each
  self-attention module with a prefix carries a small record (``_deltakern_site``: the encoder,
  its slot in the encoder, causality, T5's bias module).
- The model's attention implementation is switched to ``"deltakern"``, registered with both
  ``AttentionInterface`` and ``AttentionMaskInterface``. The mask function returns the ``[B, Lk]``
  bool key padding mask (True = keep) or ``None``: never a dense ``[B, 1, Lq, Lk]`` mask.
- The attention function runs :func:`deltakern.prefix_attention` for a layer with a prefix (q, k, v
  as ``[B, H, L, D]`` after RoPE; the cache holds only real tokens, so decoding is ``Lq = 1`` with
  the bottom-right causal alignment). A module without a prefix (T5 cross-attention, the T5 encoder
  of a PEFT checkpoint) runs the implementation the model had before (``_deltakern_fallback``, e.g.
  ``"sdpa"``) with the mask that implementation's own mask function builds.
- Dense path: a layer that needs an additive bias (T5's relative position bias), attention
  dropout in training, or a 4D mask passed by the caller computes ``softmax(q [Pk; k]ᵀ·s + bias) [Pv; v]``
  in plain torch, as the model's eager attention would. It is exact, only not fused.

Semantics (PEFT's prefix tuning)
--------------------------------
- No RoPE on prefix keys; the prefix is visible to every query, padded rows too; padding masks the
  input keys only.
- Input positions start at P: PEFT gets this from a KV cache already holding P entries (and adds
  P to explicit ``position_ids``). Here a forward pre-hook shifts them: ``position_ids`` (given, as
  ``generate()`` computes them from the mask, or the model's default ``arange + cache length``)
  by P for Llama/Qwen2/Mistral and GPT-2,
  and the embeddings' ``cache_length`` by P for BERT/RoBERTa, which derive positions from it.
- T5: PEFT (``PeftModelForSeq2SeqLM``) gives the prefix to the decoder self-attention only, never
  to the encoder, and drops its cross-attention entries. Prefix keys sit at positions ``0..P-1``
  before inputs at ``P..``, so they get T5's relative position bias for those distances (in PEFT
  this falls out of ``compute_bias`` over the cache). PEFT duplicates its ``num_layers`` slots
  into groups of four, so decoder block i uses slot ``2i mod num_layers``; a PEFT checkpoint is
  loaded with exactly that layout. ``add_prefix`` itself gives T5 a prefix in every encoder and
  decoder self-attention (own slots: encoder blocks, then decoder blocks), with the same position
  convention in the (bidirectional) encoder; that layout has no PEFT equivalent and
  :func:`peft_prefix_checkpoint` refuses it.
"""

from __future__ import annotations

import copy
import functools
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import PrefixEncoder
from ..ops import prefix_attention
from ..registry import E2EProviders, MethodSpec, PeftFormat, register_method
from .common import (freeze_base, load_base_model_tensors, peft_config_fields, peft_task_type, prompt_weight_dtype,
                     task_head_checkpoint)
from .families import blocks, family_of

IMPLEMENTATION = "deltakern"
ENCODER_ATTRIBUTE = "deltakern_prefix"
# Layouts of the encoder's slots: "blocks" = one slot per prefixed block in module order;
# "peft-seq2seq" = PEFT's T5 layout (decoder self-attention only, block i -> slot 2i mod slots).
_BLOCKS, _PEFT_SEQ2SEQ = "blocks", "peft-seq2seq"


class _Site:
    """What the attention function needs to know about one prefixed self-attention module.
    A plain object, not a Module, so the encoder is not registered twice in the model."""

    __slots__ = ("encoder", "slot", "causal", "bias_module")

    def __init__(self, encoder: PrefixEncoder, slot: int, causal: bool, bias_module: nn.Module | None):
        self.encoder, self.slot, self.causal, self.bias_module = encoder, slot, causal, bias_module


# ---------------------------------------------------------------------------------------------
# Attention and mask functions registered as "deltakern"
# ---------------------------------------------------------------------------------------------

def _mask_function(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                   mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """The ``"deltakern"`` mask: ``[B, kv_length]`` bool key padding mask (True = keep) or ``None``.

    Causality is not encoded: the attention function knows it per layer. Only the plain causal and
    bidirectional masks are representable this way; sliding windows, packed sequences and custom
    overlays would need a dense mask and are refused.
    """
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    if mask_function not in (causal_mask_function, bidirectional_mask_function):
        raise NotImplementedError(
            f"deltakern attention mask: only plain causal and bidirectional masks are supported with a prefix, "
            f"got mask_function={getattr(mask_function, '__qualname__', mask_function)!r} (sliding window, packed "
            f"sequences or a custom overlay)"
        )
    if attention_mask is None:
        return None
    end = kv_offset + kv_length
    if attention_mask.shape[-1] < end:
        attention_mask = F.pad(attention_mask, (0, end - attention_mask.shape[-1]))
    return attention_mask[:, kv_offset:end].to(torch.bool)


def _eager_function(module: nn.Module):
    """The eager attention function of ``module``'s model file (what the model itself falls back to)."""
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise NotImplementedError(
            f"deltakern attention: {type(module).__name__} had attn_implementation 'eager' but its module "
            f"{type(module).__module__} defines no eager_attention_forward"
        )
    return function


def _fallback(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """Run ``module`` with the implementation the model had before ``add_prefix``."""
    from transformers.masking_utils import (ALL_MASK_ATTENTION_FUNCTIONS, bidirectional_mask_function,
                                            causal_mask_function)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    implementation = getattr(module, "_deltakern_fallback", None)
    if implementation is None:
        raise NotImplementedError(
            f"deltakern attention: {type(module).__name__} has no prefix and no recorded previous attention "
            f"implementation; call deltakern.add_prefix on the model instead of setting attn_implementation='deltakern'"
        )
    function = _eager_function(module) if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
    if attention_mask is None or attention_mask.dim() == 2:
        # Our mask function returned the key padding mask; build the mask the previous
        # implementation expects with that implementation's own mask function.
        causal = bool(getattr(module, "is_causal", False))
        q_length, kv_length = query.shape[2], key.shape[2]
        attention_mask = ALL_MASK_ATTENTION_FUNCTIONS[implementation](
            batch_size=query.shape[0], q_length=q_length, kv_length=kv_length, q_offset=kv_length - q_length,
            kv_offset=0, mask_function=causal_mask_function if causal else bidirectional_mask_function,
            attention_mask=attention_mask, allow_is_causal_skip=causal, allow_is_bidirectional_skip=not causal,
            dtype=query.dtype, device=query.device, config=getattr(module, "config", None),
        )
    return function(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _t5_prefix_bias(bias_module: nn.Module, num_virtual_tokens: int, q_length: int, kv_length: int) -> torch.Tensor:
    """T5 relative position bias of the prefix keys, ``[1, H, Lq, P]``.

    Prefix key p sits at position p; query i at ``P + (Lk - Lq) + i`` (the cache holds ``Lk - Lq``
    earlier real tokens). Same buckets and table as T5's ``compute_bias`` for these distances.
    """
    device = bias_module.relative_attention_bias.weight.device
    query_position = torch.arange(q_length, device=device)[:, None] + (num_virtual_tokens + kv_length - q_length)
    key_position = torch.arange(num_virtual_tokens, device=device)[None, :]
    buckets = bias_module._relative_position_bucket(
        key_position - query_position, bidirectional=not bias_module.is_decoder,
        num_buckets=bias_module.relative_attention_num_buckets, max_distance=bias_module.relative_attention_max_distance,
    )
    return bias_module.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)


def _dense(query, key, value, prefix_k, prefix_v, attention_mask, causal, scaling, dropout, training,
           input_bias, prefix_bias):
    """Exact attention over ``[prefix; input]`` with additive biases, in plain torch.

    query ``[B, Hq, Lq, D]``; key/value ``[B, Hkv, Lk, D]``; prefix ``[Hkv, P, D]``; attention_mask
    ``None``, ``[B, Lk]`` bool (True = keep) or a caller's 4D mask over the input keys (bool, or
    additive float); input_bias ``[., Hq, Lq, Lk]`` or None; prefix_bias ``[., Hq, Lq, P]`` or None.
    Returns ``[B, Hq, Lq, D]``.
    """
    batch, heads, q_length, _ = query.shape
    groups = heads // key.shape[1]
    kv_length = key.shape[2]
    keys = torch.cat([prefix_k.unsqueeze(0).expand(batch, -1, -1, -1), key], dim=2).repeat_interleave(groups, dim=1)
    values = torch.cat([prefix_v.unsqueeze(0).expand(batch, -1, -1, -1), value], dim=2).repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
    prefix_scores, input_scores = scores.split([prefix_k.shape[1], kv_length], dim=3)
    if prefix_bias is not None:
        prefix_scores = prefix_scores + prefix_bias
    if input_bias is not None:
        input_scores = input_scores + input_bias
    visible = None
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype != torch.bool:
        input_scores = input_scores + attention_mask
    elif attention_mask is not None and attention_mask.dim() == 4:
        visible = attention_mask
    elif attention_mask is not None:
        visible = attention_mask[:, None, None, :]
    if causal:
        rows = torch.arange(q_length, device=query.device)[:, None] + (kv_length - q_length)
        below = torch.arange(kv_length, device=query.device)[None, :] <= rows
        visible = below if visible is None else visible & below
    if visible is not None:
        input_scores = input_scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    probabilities = torch.softmax(torch.cat([prefix_scores, input_scores], dim=3), dim=-1)
    probabilities = F.dropout(probabilities, p=dropout, training=training)
    return torch.matmul(probabilities, values)


def _attention_function(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs):
    """The ``"deltakern"`` attention function: q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` in, ``([B, Lq, Hq, D], None)`` out."""
    site = getattr(module, "_deltakern_site", None)
    if site is None:
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scaling = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else scaling
    prefix_k, prefix_v = (t.to(query.dtype) for t in site.encoder.layer(site.slot))
    position_bias = kwargs.get("position_bias")
    dropout = dropout if module.training else 0.0
    if position_bias is None and dropout == 0.0 and (attention_mask is None or attention_mask.dim() == 2):
        out = prefix_attention(query, key, value, prefix_k, prefix_v, causal=site.causal,
                               key_padding_mask=attention_mask, scale=scaling)
    else:
        prefix_bias = None
        if site.bias_module is not None:
            prefix_bias = _t5_prefix_bias(site.bias_module, site.encoder.num_virtual_tokens, query.shape[2], key.shape[2])
        out = _dense(query, key, value, prefix_k, prefix_v, attention_mask, site.causal, scaling, dropout,
                     module.training, position_bias, prefix_bias)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _attention_function)
    AttentionMaskInterface.register(IMPLEMENTATION, _mask_function)


# ---------------------------------------------------------------------------------------------
# Positions start at P
# ---------------------------------------------------------------------------------------------

def _sequence_length(args, kwargs) -> int:
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is not None:
        return input_ids.shape[1]
    return kwargs["inputs_embeds"].shape[1]


def _shift_position_ids_hook(encoder: PrefixEncoder, table: nn.Embedding | None, module, args, kwargs):
    """Forward pre-hook on a decoder model (Llama/GPT-2), bound with functools.partial (not a
    closure: a prefixed model pickles whole): position_ids += P, defaulting to ``arange(L) + cache
    length`` as the model does."""
    shift = encoder.num_virtual_tokens
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        device = encoder.embedding.weight.device
        position_ids = (torch.arange(_sequence_length(args, kwargs), device=device) + (past + shift)).unsqueeze(0)
        highest = past + shift + position_ids.shape[1] - 1
    else:
        position_ids = position_ids + shift
        highest = int(position_ids.max()) if table is not None else 0
    if table is not None and highest >= table.num_embeddings:
        raise ValueError(
            f"deltakern.add_prefix: position {highest} (P={shift} virtual tokens + input and cache) is beyond the "
            f"{table.num_embeddings} absolute positions of {type(module).__name__}"
        )
    kwargs["position_ids"] = position_ids
    return args, kwargs


def _shift_cache_length_hook(encoder: PrefixEncoder, module, args, kwargs):
    """Forward pre-hook on BERT/RoBERTa embeddings, bound with functools.partial: they derive
    positions from ``cache_length`` (RoBERTa also skips padding), exactly as PEFT's P cached
    entries make them do."""
    shift = encoder.num_virtual_tokens
    kwargs["cache_length"] = kwargs.get("cache_length", 0) + shift
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + shift
    # RoBERTa numbers positions from padding_idx + 1; BERT from 0.
    first = getattr(module, "padding_idx", -1) + 1
    highest = first + kwargs["cache_length"] + _sequence_length(args, kwargs) - 1
    table = module.position_embeddings
    if highest >= table.num_embeddings:
        raise ValueError(
            f"deltakern.add_prefix: position {highest} (P={shift} virtual tokens + input) is beyond the "
            f"{table.num_embeddings} absolute positions of {type(module).__name__}"
        )
    return args, kwargs


# ---------------------------------------------------------------------------------------------
# Attaching a prefix
# ---------------------------------------------------------------------------------------------

def _check_count(name: str, value, caller: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{caller}: {name} must be an int >= 1, got {value!r}")


def _own_configs(model: nn.Module) -> None:
    """Give ``model`` and its submodules private copies of their config objects before the
    attention implementation is switched: the switch writes to the config, and models built from
    one config object (``LlamaForCausalLM(cfg)`` twice) share it, so the other model would start
    calling the deltakern attention without a prefix. One deepcopy memo keeps a sub-config that a
    submodule holds (a composite model's text config) the same object as in its parent's copy."""
    memo: dict = {}
    for module in model.modules():
        config = module.__dict__.get("config")
        if config is not None and hasattr(config, "_attn_implementation"):
            module.config = copy.deepcopy(config, memo)


def _attach(model: nn.Module, num_virtual_tokens: int, projection_hidden: int | None, layout: str,
            caller: str) -> PrefixEncoder:
    _check_count("num_virtual_tokens", num_virtual_tokens, caller)
    if projection_hidden is not None:
        _check_count("projection_hidden", projection_hidden, caller)
    found = blocks(model, caller)
    if has_prefix(model):
        raise ValueError(f"{caller}: {type(model).__name__} already has a deltakern prefix")
    kv_shapes = {(b.num_kv_heads, b.head_dim) for b in found}
    if len(kv_shapes) != 1:
        raise NotImplementedError(f"{caller}: one prefix needs one key/value shape in all blocks, found (Hkv, D) = {sorted(kv_shapes)}")
    (num_kv_heads, head_dim), = kv_shapes
    if layout == _PEFT_SEQ2SEQ:
        num_slots = model.config.num_layers
        prefixed = [(b, (2 * b.index) % num_slots) for b in found if b.stack == "decoder"]
    else:
        prefixed = list(zip(found, range(len(found))))
        num_slots = len(found)
    first_parameter = next(model.parameters())
    encoder = PrefixEncoder(num_slots, num_kv_heads, head_dim, num_virtual_tokens, projection_hidden)
    encoder.to(device=first_parameter.device, dtype=prompt_weight_dtype(first_parameter.dtype))
    encoder.layout = layout
    model.add_module(ENCODER_ATTRIBUTE, encoder)

    # Every module that may call the attention interface holds a config; remember what it used.
    for module in model.modules():
        config = getattr(module, "config", None)
        if module is not model and hasattr(config, "_attn_implementation"):
            module._deltakern_fallback = config._attn_implementation

    first_blocks = {}
    for block in found:
        first_blocks.setdefault(block.stack, block)
    for block, slot in prefixed:
        bias_module = None
        if family_of(model, caller).name == "t5":
            bias_module = first_blocks[block.stack].attention
        block.attention._deltakern_site = _Site(encoder, slot, block.causal, bias_module)

    _register()
    _own_configs(model)
    model.set_attn_implementation(IMPLEMENTATION)
    _install_position_shift(model, found, encoder, caller)
    freeze_base(model)
    return encoder


def _install_position_shift(model: nn.Module, found, encoder: PrefixEncoder, caller: str) -> None:
    family = family_of(model, caller).name
    if family == "t5":
        return  # relative positions: the prefix bias accounts for P (see _t5_prefix_bias)
    if family == "bert":
        embeddings = model.get_submodule(found[0].name.rsplit(".encoder.layer.", 1)[0] + ".embeddings"
                                         if ".encoder.layer." in found[0].name else "embeddings")
        embeddings.register_forward_pre_hook(functools.partial(_shift_cache_length_hook, encoder), with_kwargs=True)
        return
    # Llama/GPT-2: the module holding the block list ("model.layers.N" -> "model").
    decoder_name = found[0].name.rsplit(".", 2)[0] if found[0].name.count(".") >= 2 else ""
    decoder = model.get_submodule(decoder_name)
    decoder.register_forward_pre_hook(functools.partial(_shift_position_ids_hook, encoder, getattr(decoder, "wpe", None)),
                                      with_kwargs=True)


def add_prefix(model: nn.Module, num_virtual_tokens: int, projection_hidden: int | None = None) -> nn.Module:
    """Add prefix tuning (P-tuning v2) to a Hugging Face ``model`` in place and return it.

    One :class:`deltakern.nn.PrefixEncoder` (``model.deltakern_prefix``) holds ``num_virtual_tokens``
    (P) key and value prefixes ``[Hkv, P, D]`` for every self-attention block (Llama/Qwen2/Mistral,
    GPT-2, BERT/RoBERTa; T5 encoder and decoder self-attention, not cross-attention);
    ``projection_hidden`` selects PEFT's reparameterisation (``prefix_projection``). The base model
    is frozen and its attention switched to ``"deltakern"`` (see the module docstring for the
    semantics, which are PEFT's). Works with ``generate()`` and gradient checkpointing.

    Raises:
        ValueError: the model is outside the families or has no attention blocks (the message names
            what was looked for), it already has a prefix, or a count is not an int >= 1.
    """
    _attach(model, num_virtual_tokens, projection_hidden, _BLOCKS, "deltakern.add_prefix")
    return model


def has_prefix(model: nn.Module) -> bool:
    """Whether ``model`` holds a deltakern prefix."""
    return any(isinstance(module, PrefixEncoder) for module in model.modules())


# ---------------------------------------------------------------------------------------------
# PEFT's checkpoint format
# ---------------------------------------------------------------------------------------------

def _task_type(model: nn.Module, caller: str) -> str:
    task = peft_task_type(model)
    if task is None:
        raise NotImplementedError(
            f"{caller}: PEFT's prefix tuning has no task type for {type(model).__name__} (it applies the prefix "
            f"for causal LM, seq2seq LM, sequence/token classification, question answering and bare models)"
        )
    return task


def peft_prefix_checkpoint(model: nn.Module) -> tuple[dict, dict]:
    """``(adapter_config, state_dict)`` exactly as PEFT's ``save_pretrained`` writes prefix tuning.

    The weights are ``{"prompt_embeddings": [P, num_layers·2·Hkv·D]}``: the prefixes themselves,
    also when the prefix is reparameterised (PEFT saves the projection's output and loads it into a
    direct encoder; ``prefix_projection`` in the config records that it was projected). Sequence
    and token classification also hold the head (``base_model.classifier.*`` or
    ``base_model.score.*``), as PEFT's do.

    Raises:
        NotImplementedError: a T5 prefix in the encoder (PEFT has no such layout), or a model class
            PEFT's prefix tuning has no task type for.
    """
    caller = "deltakern.save"
    encoder = model.get_submodule(ENCODER_ATTRIBUTE)
    task = _task_type(model, caller)
    if task == "SEQ_2_SEQ_LM" and encoder.layout != _PEFT_SEQ2SEQ:
        raise NotImplementedError(
            f"{caller}: this T5 prefix covers the encoder and decoder self-attention; PEFT's prefix tuning has "
            f"the decoder only, so its format cannot hold it"
        )
    token_dim = encoder.num_kv_heads * encoder.head_dim
    config = {
        **peft_config_fields(model, "PREFIX_TUNING", task),
        "encoder_hidden_size": encoder.transform[0].out_features if encoder.transform is not None else token_dim,
        "init_weights": None,
        "modules_to_save": None,
        "num_attention_heads": encoder.num_kv_heads,
        "num_layers": encoder.num_layers,
        "num_transformer_submodules": 2 if task == "SEQ_2_SEQ_LM" else 1,
        "num_virtual_tokens": encoder.num_virtual_tokens,
        "prefix_projection": encoder.transform is not None,
        "token_dim": token_dim,
    }
    with torch.no_grad():
        state = {"prompt_embeddings": encoder.prompt_embeddings().detach().clone()}
    # Sequence and token classification: PEFT trains the task head too and saves it beside the
    # prefixes (base_model.classifier.* or base_model.score.*), as for prompt tuning.
    config["modules_to_save"], head = task_head_checkpoint(model, task)
    return config, {**state, **head}


def load_peft_prefix(model: nn.Module, config: dict, state: dict) -> nn.Module:
    """Add the prefix a PEFT prefix-tuning checkpoint describes to the plain base ``model`` and
    load its ``prompt_embeddings``, and a saved task head (``base_model.<name>``) into the base
    model; returns the model.

    Raises:
        ValueError: the checkpoint does not fit the model (virtual tokens, layers, key/value heads,
            head size, seq2seq or not), lacks ``prompt_embeddings``, or holds a tensor the model has
            no parameter for.
    """
    caller = "deltakern.load"
    if config.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{caller}: expected a PREFIX_TUNING checkpoint, got peft_type={config.get('peft_type')!r}")
    if "prompt_embeddings" not in state:
        raise ValueError(f"{caller}: the prefix-tuning checkpoint has no 'prompt_embeddings', got keys {sorted(state)}")
    found = blocks(model, caller)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    submodules = config.get("num_transformer_submodules") or 1
    if submodules != (2 if seq2seq else 1):
        raise ValueError(
            f"{caller}: num_transformer_submodules={submodules} does not fit {type(model).__name__} "
            f"(expected {2 if seq2seq else 1})"
        )
    if seq2seq:
        expected_layers = model.config.num_layers
        decoder_blocks = sum(b.stack == "decoder" for b in found)
        if decoder_blocks != expected_layers:
            raise NotImplementedError(
                f"{caller}: PEFT's seq2seq prefix has {expected_layers} slots for {decoder_blocks} decoder blocks; "
                f"only equal counts are supported"
            )
    else:
        expected_layers = len(found)
    expected = {"num_layers": expected_layers, "num_attention_heads": found[0].num_kv_heads,
                "token_dim": found[0].num_kv_heads * found[0].head_dim}
    for key, value in expected.items():
        if config.get(key) != value:
            raise ValueError(f"{caller}: the checkpoint's {key}={config.get(key)!r} does not fit {type(model).__name__} "
                             f"(expected {value})")
    layout = _PEFT_SEQ2SEQ if seq2seq else _BLOCKS
    load_base_model_tensors(model, {k: v for k, v in state.items() if k != "prompt_embeddings"}, caller)
    encoder = _attach(model, config.get("num_virtual_tokens"), None, layout, caller)
    prompt_embeddings = state["prompt_embeddings"].to(device=encoder.embedding.weight.device,
                                                      dtype=encoder.embedding.weight.dtype)
    encoder.load_prompt_embeddings(prompt_embeddings)
    return model


# ---------------------------------------------------------------------------------------------
# The method's declaration
# ---------------------------------------------------------------------------------------------

E2E_VIRTUAL_TOKENS = 32


def _e2e_reference(base: nn.Module) -> nn.Module:
    """PEFT's ``get_peft_model`` with ``PrefixTuningConfig(num_virtual_tokens=32)``."""
    import peft

    return peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=E2E_VIRTUAL_TOKENS))


register_method(MethodSpec(
    name="prefix", label="a prefix", present=has_prefix,
    checkpoint=PeftFormat(("PREFIX_TUNING",), save=peft_prefix_checkpoint, load=load_peft_prefix),
    e2e=E2EProviders(
        reference=_e2e_reference,
        deltakern=lambda base: add_prefix(base, E2E_VIRTUAL_TOKENS),
        pairs=lambda reference, ours: [("prefix.embedding", reference.prompt_encoder["default"].embedding.weight,
                                        getattr(ours, ENCODER_ATTRIBUTE).embedding.weight)],
        virtual_tokens=E2E_VIRTUAL_TOKENS)))
