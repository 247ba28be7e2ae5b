"""What every model-surgery function shares: freezing the base model, counting parameters,
swapping a submodule by its qualified name."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..nn import Adapter, LoRALinear, PrefixEncoder, PromptEncoder

# The parameters of these modules are the delta; everything else in a patched model is the
# frozen base. LoRALinear's base layer is part of the base.
DELTA_MODULES = (LoRALinear, PrefixEncoder, Adapter, PromptEncoder)


def delta_parameter_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoRALinear):
            ids.update((id(module.lora_A), id(module.lora_B)))
        elif isinstance(module, (PrefixEncoder, Adapter, PromptEncoder)):
            ids.update(id(p) for p in module.parameters())
        # A bias add_bitfit trains; the marker is on the owning module (it survives deepcopy, a
        # parameter attribute does not) and read from __dict__ (adapter wrappers forward getattr).
        if module.__dict__.get("_deltakern_bitfit"):
            ids.add(id(module.bias))
    return ids


def freeze_base(model: nn.Module) -> None:
    """Make every parameter that is not part of a deltakern delta module non-trainable, and every
    delta parameter trainable (so methods can be stacked: add_lora then add_adapters)."""
    delta = delta_parameter_ids(model)
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in delta)


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@dataclass(frozen=True)
class TrainableParameters:
    """``trainable`` and ``total`` parameter counts (shared parameters counted once)."""

    trainable: int
    total: int

    @property
    def share(self) -> float:
        """trainable / total, in [0, 1]."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.trainable:,} of {self.total:,} parameters are trainable ({100 * self.share:.4f}%)"


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Count the trainable and all parameters of ``model``; ``str()`` of the result reads as a sentence."""
    trainable = total = 0
    for parameter in model.parameters():  # named_parameters de-duplicates tied weights
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return TrainableParameters(trainable, total)
