"""``patch`` and ``unpatch``: route a PEFT model's LoRA layers through ``lora_linear`` in place.

A patched layer keeps its class, its parameters and their names (so ``save_pretrained``,
``PeftModel.from_pretrained`` and optimizers see nothing new); only the instance's ``forward`` is
replaced by one that calls ``lora_linear`` on the base weight and the active adapter's
``lora_A`` / ``lora_B`` (``dora_linear`` with its ``lora_magnitude_vector`` for a DoRA adapter).
Every call first checks that the layer is still fusable (not merged, one active adapter, adapters
enabled, no extra forward arguments, input dtype = weight dtype) and otherwise runs PEFT's own
forward, so merging or switching adapters after ``patch`` stays correct.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nf4 import NF4Weight
from ..nn.wrapped_linear import is_conv1d
from ..ops.dora_linear import RowSqNormCache, dora_linear
from ..ops.lora_linear import lora_linear
from ..ops.qlora_linear import qlora_linear

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


def _is_nf4_base(base: nn.Module) -> bool:
    """Whether ``base`` is a bitsandbytes ``Linear4bit`` holding an NF4-quantised weight."""
    state = getattr(base.weight, "quant_state", None)
    return _is_linear4bit(base) and state is not None and state.quant_type == "nf4"


def _is_linear4bit(module: nn.Module) -> bool:
    # A model holding one has imported bitsandbytes already; deltakern never imports it.
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _base_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the base layer computes in: its weight's, or a 4-bit layer's compute dtype."""
    if _is_nf4_base(base):
        return base.compute_dtype or base.weight.quant_state.dtype
    return base.weight.dtype


def _lora_layers(model: nn.Module, caller: str) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every PEFT LoRA layer, names relative to the wrapped base model."""
    linear_cls, layer_cls = _peft_classes(caller)
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


def _state_reason(layer: nn.Module) -> str | None:
    """Why the layer's current adapter state cannot run as one ``lora_linear`` (or
    ``dora_linear``) call, or None. Checked at patch time and again on every call (the state can
    change after patching)."""
    if layer.merged:
        return "merged weights"
    active = layer.active_adapters
    if len(active) != 1:
        return "several active adapters" if active else "no active adapter"
    adapter = active[0]
    if adapter not in layer.lora_A:
        return f"active adapter {adapter!r} is not in this layer"
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
    if dora and layer.lora_magnitude_vector[adapter].weight.dtype != layer.lora_A[adapter].weight.dtype:
        return (f"DoRA magnitude in {layer.lora_magnitude_vector[adapter].weight.dtype}, LoRA weights in "
                f"{layer.lora_A[adapter].weight.dtype}")
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


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``base(x) + scaling · B(A(drop(x)))`` for the single active adapter, by ``lora_linear``
    (``qlora_linear`` over a bitsandbytes NF4 ``Linear4bit``; ``dora_linear`` for a DoRA adapter,
    with ‖W‖²_row cached on the layer); PEFT's forward when the layer's state or the call does not
    allow that. x ``[..., in]`` → ``[..., out]``."""
    base = self.base_layer
    if args or kwargs or self.disable_adapters or x.dtype != _base_dtype(base) or _state_reason(self) is not None:
        # PEFT's merge and unmerge write the base weight through .data, unseen by its version
        # counter: a DoRA layer recomputes ‖W‖²_row once it is fusable again.
        self.__dict__.pop(_SQNORM_CACHE, None)
        return type(self).forward(self, x, *args, **kwargs)
    adapter = self.active_adapters[0]
    dropout = self.lora_dropout[adapter]
    # PEFT's dropout module follows the model's train/eval mode; so does its probability here.
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    dora = _is_dora(self, adapter)
    if _is_nf4_base(base) and not dora:  # bitsandbytes' Params4bit, read in place
        return qlora_linear(x, base.weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                            self.scaling[adapter], p)
    if _is_nf4_base(base):
        # QDoRA: the NF4 weight dequantised to x's dtype on every call (bit for bit bitsandbytes'
        # dequantize_4bit), as PEFT's DoRA does over a Linear4bit; not fused yet.
        weight = NF4Weight.from_bnb(base.weight).dequantize(x.dtype)
        return dora_linear(x, weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                           self.lora_magnitude_vector[adapter].weight, self.scaling[adapter], p)
    weight = base.weight.t() if is_conv1d(base) else base.weight  # Conv1D stores [in, out]
    if dora:
        # Created on first use: an adapter can become DoRA (add_adapter, set_adapter) after patch.
        sqnorm = self.__dict__.setdefault(_SQNORM_CACHE, RowSqNormCache())(weight)
        return dora_linear(x, weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                           self.lora_magnitude_vector[adapter].weight, self.scaling[adapter], p, weight_sqnorm=sqnorm)
    return lora_linear(x, weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                       self.scaling[adapter], p)


def _is_patched(layer: nn.Module) -> bool:
    forward = layer.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _fused_forward


def patch(peft_model: nn.Module) -> PatchReport:
    """Route the LoRA layers of ``peft_model`` through ``lora_linear``, in place.

    Each ``peft.tuners.lora.Linear`` over an ``nn.Linear`` or a ``Conv1D`` (PEFT's
    ``fan_in_fan_out``), and each LoRA layer over a bitsandbytes NF4 ``Linear4bit`` (QLoRA, run
    by ``qlora_linear`` on the ``Params4bit`` in place), with one active plain-LoRA adapter gets a
    fused forward; so does a layer whose active adapter is DoRA (``use_dora=True``, run by
    ``dora_linear`` with PEFT's ``lora_magnitude_vector``; ‖W‖²_row is cached on the layer and
    recomputed when the base weight changes; over an NF4 ``Linear4bit`` (QDoRA) the weight is
    dequantised on each call, as PEFT does, not fused yet). Parameters and their names are
    untouched. Layers left on PEFT's path, with the reason in the report: LoRA variants other
    than DoRA, several active adapters, merged weights,
    ``lora_bias``, LoRA weights (or a DoRA magnitude) in another dtype than the base computes in,
    FP4 bases, other layer types (Embedding, Conv2d, 8-bit layers, ...). Dropout: the adapter's
    ``lora_dropout`` probability, in training mode only (the masks are deltakern's, not PEFT's).

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
            layer.forward = types.MethodType(_fused_forward, layer)
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
