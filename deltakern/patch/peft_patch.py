"""``patch`` and ``unpatch``: route a PEFT model's LoRA layers through deltakern's fused ops in place.

A patched layer keeps its class, its parameters and their names (so ``save_pretrained``,
``PeftModel.from_pretrained`` and optimizers see nothing new); only the instance's ``forward`` is
replaced by one that calls

- ``lora_linear`` on the base weight and the active adapter's ``lora_A`` / ``lora_B``
  (``qlora_linear`` over an NF4 base, ``dora_linear`` with its ``lora_magnitude_vector`` for a
  DoRA adapter);
- with several active adapters (``set_adapter([...])``: every row gets the sum of their deltas),
  one ``lora_linear`` (``qlora_linear``) over the adapters' factors concatenated along the rank
  (``[A_1; A_2; ...]``, ``[s_1 B_1, s_2 B_2, ...]``) for those without dropout at the time of the
  call, each further adapter with active dropout added on its own (independent masks, as PEFT);
- for PEFT's mixed batches (``model(..., adapter_names=[...])``, one adapter name per sequence,
  ``"__base__"`` for none), ``segmented_lora_linear`` with a per-row adapter index; the
  :class:`~deltakern.LoraSegments` are built once per batch and shared by every layer holding the
  same adapters (a small cache keyed on the names, the row shape and the device).

Every call first checks that the layer and the call are still fusable (not merged, adapters
enabled, no other forward arguments, input dtype = weight dtype, ...) and otherwise runs PEFT's own
forward, so merging or switching adapters after ``patch`` stays correct and PEFT's errors (an
``adapter_names`` list of the wrong length, DoRA in a mixed batch, ...) are raised as PEFT raises them.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..nf4 import NF4Weight
from ..nn.multi_lora import concatenated_factors
from ..nn.wrapped_linear import is_conv1d
from ..ops.dora_linear import RowSqNormCache, dora_linear
from ..ops.lora_linear import lora_linear
from ..ops.qlora_linear import qlora_linear
from ..ops.segmented_lora_linear import (
    LoraSegments,
    lora_segments,
    segmented_lora_linear,
)

# The attribute of a patched layer holding the cache of its base weight's ‖W‖²_row (DoRA).
_SQNORM_CACHE = "_deltakern_weight_sqnorm"


@dataclass
class PatchReport:
    """What :func:`patch` did.

    Attributes:
        patched: names of the LoRA layers now running ``lora_linear`` (``qlora_linear``,
            ``dora_linear``), relative to the base model.
        skipped: ``(name, reason)`` of each LoRA layer left on PEFT's path.
    """

    patched: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        """How many LoRA layers the model has."""
        return len(self.patched) + len(self.skipped)

    def __str__(self) -> str:
        text = f"patched {len(self.patched)} of {self.total} LoRA layers"
        if self.skipped:
            text += f"; skipped {len(self.skipped)}: " + ", ".join(f"{name} ({why})" for name, why in self.skipped)
        return text


def _peft_classes(caller: str):
    try:
        from peft.tuners.lora.layer import Linear, LoraLayer
    except ImportError as error:
        raise ValueError(f"{caller}: takes a PEFT model, but peft is not installed") from error
    return Linear, LoraLayer


def _peft_linear4bit_class():
    """PEFT's LoRA layer over bitsandbytes' ``Linear4bit`` (None without bitsandbytes)."""
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return None
    return Linear4bit


def _quant_state(base: nn.Module):
    """The bitsandbytes quant state of a ``Linear4bit``'s weight, or None. FSDP2 turns the
    ``Params4bit`` into a plain parameter without ``quant_state`` (on every unshard); bitsandbytes
    keeps a copy on the module (``Linear4bit.quant_state``) for this, read when the weight has none."""
    return getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)


def _is_nf4_base(base: nn.Module) -> bool:
    """Whether ``base`` is a bitsandbytes ``Linear4bit`` holding an NF4-quantised weight."""
    if not _is_linear4bit(base):
        return False
    state = _quant_state(base)
    return state is not None and state.quant_type == "nf4"


def _nf4_weight(base: nn.Module) -> NF4Weight:
    """An NF4 ``Linear4bit``'s weight as an :class:`NF4Weight` (its storage, read in place).

    On a CPU with AVX512-BF16, bitsandbytes' own forward in eval mode (no grad) repacks the weight
    into a layout of its inference kernel (``packing_format_for_cpu``; absmax rounded to bf16). A
    layer that ran so before it was patched is put back into the NF4 format first, with the
    inverse bitsandbytes applies before it saves the layer, so deltakern computes with what
    ``state_dict()`` would write."""
    state = _quant_state(base)
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        base.weight.data, state = _convert_weight_packed_for_cpu_inverse(base.weight.data, state)
        base.weight.quant_state = state
        if hasattr(base, "quant_state"):
            base.quant_state = state
    return NF4Weight.from_bnb(base.weight, state)


def _is_linear4bit(module: nn.Module) -> bool:
    # A model holding one has imported bitsandbytes already; deltakern never imports it.
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _base_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the base layer computes in: its weight's, or a 4-bit layer's compute dtype."""
    if _is_nf4_base(base):
        return base.compute_dtype or _quant_state(base).dtype
    return base.weight.dtype


def _lora_layers(model: nn.Module, caller: str) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every PEFT LoRA layer, names relative to the wrapped base model."""
    _, layer_cls = _peft_classes(caller)
    root = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    layers = [(name, m) for name, m in root.named_modules() if isinstance(m, layer_cls)]
    if not layers:
        raise ValueError(f"{caller}: {type(model).__name__} has no PEFT LoRA layers (peft.tuners.lora.LoraLayer)")
    return layers


def _is_dora(layer: nn.Module, adapter: str) -> bool:
    """Whether ``adapter`` of ``layer`` is DoRA (PEFT's ``use_dora``: a ``DoraLinearVariant`` in
    PEFT versions with LoRA variants, no variant in those before)."""
    if not layer.use_dora.get(adapter):
        return False
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is None:
        return True
    from peft.tuners.lora.variants import DoraLinearVariant

    return isinstance(variant, DoraLinearVariant)


def _adapter_reason(layer: nn.Module, adapter: str) -> str | None:
    """Why ``adapter`` of ``layer`` cannot run fused (in any of the ways), or None."""
    dora = _is_dora(layer, adapter)
    variant = getattr(layer, "lora_variant", {}).get(adapter)  # PEFT versions before variants have none
    if variant is not None and not dora:
        return f"LoRA variant {type(variant).__name__}"
    if layer.lora_bias.get(adapter) or layer.lora_B[adapter].bias is not None:
        return "lora_bias"
    dropout = layer.lora_dropout[adapter]
    if not isinstance(dropout, (nn.Identity, nn.Dropout)):
        return f"dropout module {type(dropout).__name__}"
    if layer.lora_A[adapter].weight.dtype != _base_dtype(layer.base_layer):
        return (f"LoRA weights in {layer.lora_A[adapter].weight.dtype}, base computes in "
                f"{_base_dtype(layer.base_layer)}")
    if layer.lora_B[adapter].weight.dtype != layer.lora_A[adapter].weight.dtype:
        return (f"lora_B in {layer.lora_B[adapter].weight.dtype}, lora_A in "
                f"{layer.lora_A[adapter].weight.dtype}")
    if dora and layer.lora_magnitude_vector[adapter].weight.dtype != layer.lora_A[adapter].weight.dtype:
        return (f"DoRA magnitude in {layer.lora_magnitude_vector[adapter].weight.dtype}, LoRA weights in "
                f"{layer.lora_A[adapter].weight.dtype}")
    return None


def _active_in_layer(layer: nn.Module) -> list[str]:
    """The active adapters this layer holds, in PEFT's order (PEFT skips the others)."""
    return [a for a in layer.active_adapters if a in layer.lora_A]


def _state_reason(layer: nn.Module) -> str | None:
    """Why the layer's current adapter state cannot run as one fused call (``lora_linear``,
    ``qlora_linear``, ``dora_linear``, or ``lora_linear`` over the concatenated factors of several
    active adapters), or None. Checked at patch time and again on every call (the state can change
    after patching). ``adapter_names`` calls are checked by :func:`_mixed_reason` instead."""
    if layer.merged:
        return "merged weights"
    adapters = _active_in_layer(layer)
    if not adapters:
        # No active adapter here (another layer's target, set_adapter of one this layer lacks):
        # PEFT runs the base alone, and so does the patched layer; mixed batches still route.
        return None
    if len(adapters) > 1 and any(_is_dora(layer, a) for a in adapters):
        # PEFT applies each DoRA adapter's magnitude scale to the running sum of the ones before
        # it, so the result depends on their order; no fused op computes that.
        return "several active adapters with DoRA (PEFT chains their magnitude scales; not fused)"
    for adapter in adapters:
        reason = _adapter_reason(layer, adapter)
        if reason is not None:
            return reason if len(adapters) == 1 else f"active adapter {adapter!r}: {reason}"
    return None


def _skip_reason(layer: nn.Module, linear_cls) -> str | None:
    if type(layer) is not linear_cls and type(layer) is not _peft_linear4bit_class():
        return f"{type(layer).__name__} LoRA layer"
    base = layer.base_layer
    if _is_linear4bit(base) and not _is_nf4_base(base):
        return "4-bit base not in NF4 (FP4, or not quantised yet)"
    if not (isinstance(base, nn.Linear) or is_conv1d(base) or _is_nf4_base(base)):
        return f"base layer is {type(base).__name__}"
    return _state_reason(layer)


def _dropout_p(layer: nn.Module, adapter: str) -> float:
    """The adapter's dropout probability for this call: PEFT's dropout module follows the model's
    train/eval mode, and so does the probability handed to deltakern's ops."""
    dropout = layer.lora_dropout[adapter]
    return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as ``[out, in]``: a transposed view of a Conv1D's ``[in, out]`` weight, or an
    NF4 weight dequantised to ``dtype`` (bit for bit bitsandbytes' ``dequantize_4bit``)."""
    if _is_nf4_base(base):
        return _nf4_weight(base).dequantize(dtype)
    return base.weight.t() if is_conv1d(base) else base.weight


def _single_forward(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
    """One active adapter: ``lora_linear``, ``qlora_linear`` or ``dora_linear``."""
    base = self.base_layer
    p = _dropout_p(self, adapter)
    dora = _is_dora(self, adapter)
    if _is_nf4_base(base) and not dora:  # bitsandbytes' Params4bit codes, read in place
        return qlora_linear(x, _nf4_weight(base), base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                            self.scaling[adapter], p)
    if _is_nf4_base(base):
        # QDoRA: the NF4 weight dequantised to x's dtype on every call, as PEFT's DoRA does over a
        # Linear4bit; not fused yet.
        return dora_linear(x, _dense_weight(base, x.dtype), base.bias, self.lora_A[adapter].weight,
                           self.lora_B[adapter].weight, self.lora_magnitude_vector[adapter].weight,
                           self.scaling[adapter], p)
    weight = _dense_weight(base, x.dtype)
    if dora:
        # Created on first use: an adapter can become DoRA (add_adapter, set_adapter) after patch.
        sqnorm = self.__dict__.setdefault(_SQNORM_CACHE, RowSqNormCache())(weight)
        return dora_linear(x, weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                           self.lora_magnitude_vector[adapter].weight, self.scaling[adapter], p, weight_sqnorm=sqnorm)
    return lora_linear(x, weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                       self.scaling[adapter], p)


def _summed_forward(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
    """Several active plain-LoRA adapters, every row getting the sum of their deltas (PEFT's
    ``set_adapter([...])``).

    The adapters without dropout in this call (p = 0, or eval mode) share one mask-free low-rank
    term, so they run as one ``lora_linear`` (``qlora_linear`` over NF4) of rank ``Σ r_i`` on
    ``[A_1; A_2; ...]`` and ``[s_1 B_1, s_2 B_2, ...]`` (scaling 1; the plain B's and the common
    scaling when all scalings agree). Adapters with dropout need masks of their own: the first
    one runs fused with the base when no adapter is mask-free, the others add
    ``s_i B_i A_i drop_i(x)`` by PyTorch with their own mask, as PEFT does. Autograd carries the
    gradients through the concatenation to each adapter's factors."""
    base = self.base_layer
    p = {a: _dropout_p(self, a) for a in adapters}
    plain = [a for a in adapters if p[a] == 0.0]
    dropped = [a for a in adapters if p[a] > 0.0]
    if plain:
        fused, rest, fused_p = plain, dropped, 0.0
    else:
        fused, rest, fused_p = dropped[:1], dropped[1:], p[dropped[0]]
    lora_A, lora_B, scaling = concatenated_factors([self.lora_A[a].weight for a in fused],
                                                   [self.lora_B[a].weight for a in fused],
                                                   [self.scaling[a] for a in fused])
    if _is_nf4_base(base):
        y = qlora_linear(x, _nf4_weight(base), base.bias, lora_A, lora_B, scaling, fused_p)
    else:
        y = lora_linear(x, _dense_weight(base, x.dtype), base.bias, lora_A, lora_B, scaling, fused_p)
    for a in rest:
        delta = F.linear(F.linear(F.dropout(x, p[a], training=True), self.lora_A[a].weight), self.lora_B[a].weight)
        y = y + delta * self.scaling[a]
    return y


# LoraSegments of recent adapter_names batches. PEFT hands the same list to every layer of a
# forward: the segments are built once and reused by each layer that holds the same adapters.
# The key is the names themselves (not the list's identity: a list may be mutated or reused), the
# adapters the layer holds, the row shape and the device.
_SEGMENTS: OrderedDict[tuple, LoraSegments] = OrderedDict()
_SEGMENTS_SIZE = 16
_SEGMENTS_LOCK = threading.Lock()


def _batch_segments(names: tuple[str, ...], adapters: tuple[str, ...], x: torch.Tensor) -> LoraSegments:
    """The segments of a mixed batch: sequence b's rows (``x[b]``, ``prod(x.shape[1:-1])`` of
    them) belong to ``adapters.index(names[b])``, or to none (-1: ``"__base__"``, an adapter this
    layer lacks). Built on the host from the names (no device sync), then moved to x's device."""
    key = (names, adapters, tuple(x.shape[:-1]), x.device)
    with _SEGMENTS_LOCK:
        segments = _SEGMENTS.get(key)
        if segments is not None:
            _SEGMENTS.move_to_end(key)
            return segments
    position = {a: i for i, a in enumerate(adapters)}
    per_sequence = torch.tensor([position.get(n, -1) for n in names], dtype=torch.int64)
    index = per_sequence.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
    host = lora_segments(index, len(adapters))
    segments = LoraSegments(host.order.to(x.device), host.offsets, host.num_rows)
    with _SEGMENTS_LOCK:
        _SEGMENTS[key] = segments
        while len(_SEGMENTS) > _SEGMENTS_SIZE:
            _SEGMENTS.popitem(last=False)
    return segments


def _mixed_reason(layer: nn.Module, x: torch.Tensor, names) -> str | None:
    """Why a call with ``adapter_names=names`` cannot run as ``segmented_lora_linear``, or None.
    PEFT's own forward then runs (and raises its errors: wrong length, merged, DoRA)."""
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "merged weights"
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        return "adapter_names is not a list of str"
    if x.dim() < 2 or x.shape[0] != len(names):
        return "adapter_names does not give one name per sequence"
    if x.dtype != _base_dtype(layer.base_layer):
        return "input dtype differs from the base's"
    for adapter in set(names):
        if adapter in layer.lora_A:
            if _is_dora(layer, adapter):
                return "DoRA in a mixed batch"
            reason = _adapter_reason(layer, adapter)
            if reason is not None:
                return reason
    return None


def _mixed_forward(self, x: torch.Tensor, names) -> torch.Tensor:
    """PEFT's mixed batch: sequence b of x ``[B, ..., in]`` uses adapter ``names[b]`` (none for
    ``"__base__"`` or an adapter this layer lacks), by one ``segmented_lora_linear`` over the
    adapters the batch uses, ordered by name."""
    names = tuple(names)
    adapters = tuple(sorted({n for n in names if n in self.lora_A}))
    if not adapters:  # every row is the base's
        return self.base_layer(x)
    segments = _batch_segments(names, adapters, x)
    return segmented_lora_linear(x, _dense_weight(self.base_layer, x.dtype), self.base_layer.bias,
                                 [self.lora_A[a].weight for a in adapters],
                                 [self.lora_B[a].weight for a in adapters],
                                 [self.scaling[a] for a in adapters], segments,
                                 [_dropout_p(self, a) for a in adapters])


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``base(x) + Σ_active scaling · B(A(drop(x)))`` by deltakern's fused ops (see the module
    docstring), or, with ``adapter_names``, each sequence's own adapter by
    ``segmented_lora_linear``; PEFT's forward when the layer's state or the call does not allow
    that. x ``[..., in]`` → ``[..., out]``."""
    if not args and kwargs.keys() == {"adapter_names"}:
        names = kwargs["adapter_names"]
        if names is None:
            kwargs = {}
        elif _mixed_reason(self, x, names) is None:
            return _mixed_forward(self, x, names)
    if not args and not kwargs and not self.disable_adapters and x.dtype == _base_dtype(self.base_layer) \
            and _state_reason(self) is None:
        adapters = _active_in_layer(self)
        if not adapters:
            return self.base_layer(x)
        if len(adapters) == 1:
            return _single_forward(self, x, adapters[0])
        return _summed_forward(self, x, adapters)
    # PEFT's merge and unmerge write the base weight through .data, unseen by its version
    # counter: a DoRA layer recomputes ‖W‖²_row once it is fusable again.
    self.__dict__.pop(_SQNORM_CACHE, None)
    return type(self).forward(self, x, *args, **kwargs)


def _is_patched(layer: nn.Module) -> bool:
    forward = layer.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _fused_forward


def patch(peft_model: nn.Module) -> PatchReport:
    """Route the LoRA layers of ``peft_model`` through deltakern's fused ops, in place.

    Each ``peft.tuners.lora.Linear`` over an ``nn.Linear`` or a ``Conv1D`` (PEFT's
    ``fan_in_fan_out``), and each LoRA layer over a bitsandbytes NF4 ``Linear4bit`` (QLoRA, run
    by ``qlora_linear`` on the ``Params4bit`` in place), gets a fused forward when its active
    adapters are plain LoRA:

    - one active adapter: ``lora_linear`` (``qlora_linear``);
    - one active DoRA adapter (``use_dora=True``): ``dora_linear`` with PEFT's
      ``lora_magnitude_vector``; ‖W‖²_row is cached on the layer and recomputed when the base
      weight changes; over an NF4 ``Linear4bit`` (QDoRA) the weight is dequantised on each call,
      as PEFT does, not fused yet;
    - several active adapters (``set_adapter([...])``, the deltas summed on every row): one
      ``lora_linear`` (``qlora_linear``) over their concatenated factors for those without dropout
      in the call; each further adapter with dropout adds its own term (its own mask);
    - mixed batches (``adapter_names=[...]`` in ``model(...)`` or ``model.generate(...)``, one
      name per sequence, ``"__base__"`` for none): ``segmented_lora_linear``, adapters ordered by
      name, rows of ``"__base__"`` or of an adapter the layer lacks on the base only; over an NF4
      base the weight is dequantised on each such call. The row segments are built once per
      batch and shared by the layers.

    A layer none of whose active adapters it holds runs its base alone, as PEFT does (and still
    routes mixed batches). Parameters and their names are untouched. Layers left on PEFT's path,
    with the reason in the report: several active adapters one of which is DoRA (PEFT chains their
    magnitude scales), LoRA variants other than DoRA, merged weights, ``lora_bias``, LoRA weights
    (or a DoRA magnitude) in another dtype than the base computes in, FP4 bases, other layer types
    (Embedding, Conv2d, 8-bit layers, ...). A patched layer also runs PEFT's forward for a call it
    cannot fuse: a mixed batch naming a DoRA adapter (PEFT raises), an input in another dtype,
    other forward arguments. Dropout: the adapter's ``lora_dropout`` probability, in training mode
    only (the masks are deltakern's, not PEFT's).

    Returns:
        A :class:`PatchReport`; ``str()`` of it reads as a sentence.

    Raises:
        ValueError: the model has no PEFT LoRA layer, or peft is not installed.
    """
    linear_cls, _ = _peft_classes("deltakern.patch")
    report = PatchReport()
    for name, layer in _lora_layers(peft_model, "deltakern.patch"):
        reason = _skip_reason(layer, linear_cls)
        if reason is None:
            # A partial, not a bound method: pickle (torch.save of the whole model) can rebuild it.
            layer.forward = functools.partial(_fused_forward, layer)
            report.patched.append(name)
        else:
            report.skipped.append((name, reason))
    return report


def unpatch(model: nn.Module) -> nn.Module:
    """Put every LoRA layer that :func:`patch` changed back on PEFT's own forward; returns ``model``.

    Raises:
        ValueError: the model has no PEFT LoRA layer, or peft is not installed.
    """
    for _, layer in _lora_layers(model, "deltakern.unpatch"):
        if _is_patched(layer):
            del layer.__dict__["forward"]
        layer.__dict__.pop(_SQNORM_CACHE, None)
    return model
