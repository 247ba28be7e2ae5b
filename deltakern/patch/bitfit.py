"""``add_bitfit``: BitFit (Ben Zaken et al.), training the bias terms of a model and nothing else
of its base.

What counts as a bias
---------------------
Every parameter registered under the name ``bias`` on a module of the base model: the biases of
``nn.Linear`` and transformers' ``Conv1D`` layers, of LayerNorms (their β), BERT's output bias
``cls.predictions.bias`` (tied to ``cls.predictions.decoder.bias``, one parameter), and the same
name on any other module. Not biases in this sense: parameters with other names (T5's
``relative_attention_bias`` is an embedding table, ``nn.MultiheadAttention`` keeps
``in_proj_bias``), and the parameters inside deltakern's own delta modules (an adapter's
``down.bias`` belongs to the adapter and trains with it).

``add_missing_biases=True`` gives every ``nn.Linear`` without a bias (all of Llama's and T5's,
the LM head included) a zero ``[out]`` bias, so the model computes what it computed before.
Norms without a bias (RMSNorm) get none: only linear layers.

The marker
----------
Each module whose ``bias`` BitFit trains carries the attribute ``_deltakern_bitfit`` (``"existing"``
or ``"added"``). A module attribute survives ``copy.deepcopy``, pickling and ``.to()``, and stays on
the module when ``add_lora`` or ``add_adapters`` later wrap it (the bias parameter object is
unchanged, so ``LoRALinear`` hands it to its fused op, which computes its gradient in the same
pass as the LoRA gradients). ``freeze_base`` keeps such biases trainable when another method is
added after BitFit.

Checkpoint (ours; PEFT has no BitFit): ``deltakern_bitfit.json`` with the format, its version and
the names of the layers whose bias BitFit added, and ``deltakern_bitfit.safetensors`` with every
trained bias by its qualified name in the plain model (deltakern wrappers' ``.base_layer`` left
out, so a checkpoint loads whether LoRA or adapters are present or not, in either order).
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import E2EProviders, MethodSpec, OwnFormat, register_method
from .common import check_config, delta_parameter_ids, load_checked

MARKER = "_deltakern_bitfit"
EXISTING, ADDED = "existing", "added"
FORMAT = "deltakern-bitfit"
FORMAT_VERSION = 1
_CONFIG_KEYS = ("format", "format_version", "added_biases")


def _has_own_bias(module: nn.Module) -> bool:
    return isinstance(module._parameters.get("bias"), nn.Parameter)


def _marker(module: nn.Module) -> str | None:
    # Read from the module's own __dict__: adapter wrappers forward unknown attributes to their
    # base layer, and must not report its marker as theirs.
    return module.__dict__.get(MARKER)


def _base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every module of ``model`` that holds no delta parameter of
    its own: not an adapter's or a prompt/prefix encoder's layers, while a ``LoRALinear``'s base
    layer is part of the base model. A bias BitFit marked does not count as delta here, so the
    answer is the same whether ``delta_parameter_ids`` lists BitFit's biases or not."""
    delta = delta_parameter_ids(model)

    def owns_delta(module: nn.Module) -> bool:
        return any(id(p) in delta for key, p in module._parameters.items()
                   if p is not None and not (key == "bias" and _marker(module)))

    return [(name, module) for name, module in model.named_modules() if not owns_delta(module)]


def plain_name(model: nn.Module, name: str) -> str:
    """``name`` (a qualified module or parameter name in ``model``) with the ``base_layer`` steps of
    deltakern's LoRA and adapter wrappers left out: the name the same object has in the plain model."""
    if not name:
        return name
    kept, module = [], model
    for part in name.split("."):
        # Every deltakern wrapper (LoRALinear, the adapter wrappers) keeps the module it replaced
        # as its child "base_layer".
        if not (part == "base_layer" and type(module).__module__.startswith("deltakern.")):
            kept.append(part)
        module = getattr(module, part)
    return ".".join(kept)


def _add_zero_bias(layer: nn.Linear) -> None:
    weight = layer.weight
    layer.bias = nn.Parameter(torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype))
    setattr(layer, MARKER, ADDED)


def _set_trainable(model: nn.Module) -> None:
    """Only delta parameters and the marked biases require grad (``freeze_base`` plus the marker)."""
    trainable = delta_parameter_ids(model) | {id(p) for p in bitfit_biases(model).values()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trainable)


def add_bitfit(model: nn.Module, add_missing_biases: bool = False) -> nn.Module:
    """Make the biases of ``model`` its only trainable base parameters (BitFit), in place.

    Every parameter named ``bias`` of a module of the base model (see the module docstring) is
    marked and requires grad; every other base parameter is frozen; parameters of deltakern delta
    modules already present (LoRA, prefix, adapters) stay trainable. Calling it again is harmless.

    Args:
        model: any module.
        add_missing_biases: give each ``nn.Linear`` that has no bias a zero ``[out]`` bias (same
            device and dtype as its weight) first; outputs are unchanged at initialisation.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: ``add_missing_biases`` is not a bool, or the model ends up with no bias to train
            (e.g. Llama or T5 without ``add_missing_biases=True``).
    """
    if not isinstance(add_missing_biases, bool):
        raise ValueError(f"deltakern.add_bitfit: add_missing_biases must be a bool, got {add_missing_biases!r}")
    for _, module in _base_modules(model):
        if add_missing_biases and isinstance(module, nn.Linear) and module.bias is None:
            _add_zero_bias(module)
        elif _has_own_bias(module) and _marker(module) is None:
            setattr(module, MARKER, EXISTING)
    if not bitfit_biases(model):
        raise ValueError(
            f"deltakern.add_bitfit: {type(model).__name__} has no parameter named 'bias' to train; "
            f"pass add_missing_biases=True to give its nn.Linear layers zero biases"
        )
    _set_trainable(model)
    return model


def bitfit_biases(model: nn.Module) -> dict[str, nn.Parameter]:
    """Plain qualified name → parameter of every bias BitFit trains in ``model`` (a tied bias once,
    under its first name), in module order; empty without BitFit."""
    found: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, module in _base_modules(model):
        if _marker(module) and _has_own_bias(module) and id(module.bias) not in seen:
            seen.add(id(module.bias))
            found[plain_name(model, f"{name}.bias" if name else "bias")] = module.bias
    return found


def has_bitfit(model: nn.Module) -> bool:
    """Whether ``add_bitfit`` marked biases of ``model``."""
    return bool(bitfit_biases(model))


def bitfit_checkpoint(model: nn.Module) -> tuple[dict, dict]:
    """The BitFit delta of ``model`` as ``(config, state)``.

    ``config``: json-able ``{"format": "deltakern-bitfit", "format_version": 1, "added_biases":
    [plain names of the nn.Linear layers whose bias BitFit added, sorted]}``. ``state``: plain
    qualified name (``<module>.bias``) → the bias tensor ``[features]``, for every trained bias.

    Raises:
        ValueError: the model has no BitFit biases.
    """
    biases = bitfit_biases(model)
    if not biases:
        raise ValueError(f"deltakern.save: {type(model).__name__} has no BitFit biases (call deltakern.add_bitfit first)")
    added = sorted(plain_name(model, name) for name, module in _base_modules(model)
                   if _marker(module) == ADDED)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "added_biases": added}
    return config, {name: bias.detach() for name, bias in biases.items()}


def load_bitfit(model: nn.Module, config: dict, state: dict) -> nn.Module:
    """Apply BitFit to ``model`` as ``config`` describes and load the biases in ``state``.

    Zero biases are added to exactly the layers ``config["added_biases"]`` names, every other bias
    is marked as ``add_bitfit`` marks it, and each tensor of ``state`` is copied into the bias of
    the same plain name. LoRA or adapters may be present already (names are matched without their
    ``base_layer`` steps). Returns ``model``.

    Raises:
        ValueError: a config key is missing or the format is another one; a named layer is not an
            ``nn.Linear`` without a bias; ``state`` lacks a bias the model has, holds a name the
            model has no bias for, or a tensor of the wrong shape (each named).
    """
    caller = "deltakern.load"
    check_config(caller, "BitFit", config, _CONFIG_KEYS, FORMAT, FORMAT_VERSION)
    layers = {plain_name(model, name): module for name, module in _base_modules(model)}
    for name in config["added_biases"]:
        layer = layers.get(name)
        if not isinstance(layer, nn.Linear) or layer.bias is not None:
            what = "no such module" if layer is None else f"a {type(layer).__name__}" + (
                " that already has a bias" if isinstance(layer, nn.Linear) else "")
            raise ValueError(f"{caller}: the BitFit checkpoint adds a bias to {name!r}, which must be an nn.Linear "
                             f"without a bias in {type(model).__name__}; found {what}")
        _add_zero_bias(layer)
    add_bitfit(model)
    load_checked(caller, "BitFit", bitfit_biases(model), state)
    return model


# ---------------------------------------------------------------------------------------------
# The method's declaration
# ---------------------------------------------------------------------------------------------

def _e2e_reference(base: nn.Module) -> nn.Module:
    """PEFT has no BitFit: a zero bias added to every bias-less ``nn.Linear`` (all of Llama's, the
    LM head included), the biases trainable and nothing else, in plain torch."""
    base.requires_grad_(False)
    for module in base.modules():
        if isinstance(module, nn.Linear) and module.bias is None:
            weight = module.weight
            module.bias = nn.Parameter(torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype))
    return base


# BitFit names its biases without the wrappers' ".base_layer", so it loads into any structure:
# after PEFT's part and the adapters.
register_method(MethodSpec(
    name="bitfit", label="BitFit biases", present=has_bitfit,
    checkpoint=OwnFormat("deltakern_bitfit", save=bitfit_checkpoint, load=load_bitfit, load_order=1),
    e2e=E2EProviders(
        reference=_e2e_reference,
        deltakern=lambda base: add_bitfit(base, add_missing_biases=True),
        # BitFit's biases stay zero on both sides, as add_bitfit adds them.
        pairs=lambda reference, ours: [(f"{name}.bias", module.bias, ours.get_submodule(name).bias)
                                       for name, module in reference.named_modules() if isinstance(module, nn.Linear)])))
