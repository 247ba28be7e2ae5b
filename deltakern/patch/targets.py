"""Which linear layers of a model a method targets: ``"all-linear"`` as PEFT reads it, lists of
name suffixes, regular expressions (PEFT configs), exclusions; shared by the methods that wrap
linear layers."""

from __future__ import annotations

import re

from torch import nn

from ..nn.delta import DeltaModule
from ..nn.nf4_linear import NF4Linear
from ..nn.wrapped_linear import is_conv1d

ALL_LINEAR = "all-linear"
# Classification heads PEFT leaves out of "all-linear" when a model has no output embeddings
# (PEFT's SEQ_CLS_HEAD_NAMES).
_CLASSIFIER_HEADS = ("score", "classifier")
# How many linear layer names an error message lists.
LISTED = 8


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, NF4Linear)) or is_conv1d(module)


def _linear_names(model: nn.Module, wrapped: tuple[type, ...] = ()) -> list[str]:
    """Qualified names of the ``nn.Linear`` / ``Conv1D`` layers of ``model`` that are not inside a
    deltakern delta module: no LoRA on LoRA, on an adapter's projections or a prefix encoder's MLP.
    A delta module of a type in ``wrapped`` counts as the linear layer it wraps, at its own name
    (named LoRA adapters go into layers that already hold LoRA)."""
    # Modules strictly inside a delta module (a delta module itself is not inside itself).
    inside = {id(sub) for m in model.modules() if isinstance(m, DeltaModule) for sub in m.modules() if sub is not m}
    return [name for name, module in model.named_modules() if id(module) not in inside
            and ((_is_linear(module) and not isinstance(module, DeltaModule)) or isinstance(module, wrapped))]


def _output_layer_names(model: nn.Module) -> set[str]:
    """The layers PEFT's "all-linear" leaves out of a transformers model: the output embeddings (LM
    head) or, for a model without them, the classification head ``score`` / ``classifier`` (as PEFT
    does with task_type SEQ_CLS)."""
    get_output = getattr(model, "get_output_embeddings", None)
    if not callable(get_output):  # not a transformers model: PEFT leaves nothing out either
        return set()
    head = get_output()
    if head is None:
        head = next((getattr(model, n) for n in _CLASSIFIER_HEADS if getattr(model, n, None) is not None), None)
    return {name for name, module in model.named_modules() if head is not None and module is head}


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _some_linear(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > LISTED else shown or "none"


def resolve_targets(model: nn.Module, target_modules, exclude_modules, caller: str, strict: bool,
                    wrapped: tuple[type, ...] = ()) -> list[str]:
    """Qualified names of the linear layers ``target_modules`` selects, in module order.

    ``target_modules``: ``"all-linear"``, a list of name suffixes, or (``strict=False``, for PEFT
    configs) another string, a regular expression the whole name must match. ``strict``: every
    suffix must match a linear layer (``add_lora``); otherwise at least one layer must match
    (PEFT's rule when loading). ``exclude_modules``: None, a list of suffixes or a regex string.
    ``wrapped``: delta module types that count as the linear layer they wrap (see ``_linear_names``).
    """
    linear = _linear_names(model, wrapped)
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            excluded = _output_layer_names(model)
            chosen = [n for n in linear if n not in excluded]
        elif strict:
            raise ValueError(
                f"{caller}: target_modules must be {ALL_LINEAR!r} or a list of module name suffixes, "
                f"got the string {target_modules!r}"
            )
        else:
            chosen = [n for n in linear if re.fullmatch(target_modules, n)]
    elif isinstance(target_modules, (list, tuple, set)) and target_modules and all(isinstance(t, str) for t in target_modules):
        targets = list(target_modules)
        unmatched = [t for t in targets if not any(_matches(n, t) for n in linear)]
        if strict and unmatched:
            raise ValueError(
                f"{caller}: target_modules {unmatched} match no nn.Linear or Conv1D layer of {type(model).__name__}; "
                f"its linear layers are: {_some_linear(linear)}"
            )
        chosen = [n for n in linear if any(_matches(n, t) for t in targets)]
    else:
        raise ValueError(
            f"{caller}: target_modules must be {ALL_LINEAR!r} or a non-empty list of module name suffixes, "
            f"got {target_modules!r}"
        )
    if isinstance(exclude_modules, str):
        chosen = [n for n in chosen if not re.fullmatch(exclude_modules, n)]
    elif exclude_modules:
        chosen = [n for n in chosen if not any(_matches(n, e) for e in exclude_modules)]
    if not chosen:
        raise ValueError(
            f"{caller}: target_modules {target_modules!r} select no nn.Linear or Conv1D layer of "
            f"{type(model).__name__}; its linear layers are: {_some_linear(linear)}"
        )
    return chosen
