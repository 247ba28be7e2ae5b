"""``add_ia3``: (IA)³ on a plain model through ``IA3Linear``, and the (IA)³ side of
``deltakern.save`` / ``deltakern.load`` (PEFT's IA3 ``adapter_config.json`` and key names).

Targets are chosen as PEFT chooses them: a list of names selects the ``nn.Linear`` / ``Conv1D``
layers whose qualified name equals an entry or ends with ``"." + entry``; ``"all-linear"`` is every
linear layer except the output layer. A targeted layer is a *feedforward* layer (its input is
scaled, not its output) when its qualified name ends with an entry of ``feedforward_modules``
(PEFT's test: a plain suffix, no ``"."`` boundary) or, for a string, fully matches it as a regular
expression. For BERT and RoBERTa, whose default feedforward entry is ``"output.dense"``, this makes
both the FFN's ``output.dense`` and the attention's ``attention.output.dense`` feedforward layers,
as in PEFT.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..nn import IA3Linear
from ..registry import E2EProviders, MethodSpec, PeftFormat, register_method
from .common import (
    PEFT_KEY_PREFIX,
    freeze_base,
    peft_config_fields,
    peft_model_drawn,
    peft_task_type,
    replace_submodule,
)
from .targets import resolve_targets

# PEFT's default (IA)³ targets and feedforward layers for the model types of deltakern's families
# (``model.config.model_type``): keys and values, and the FFN's down projection. T5's default
# follows PEFT's table, which lists ``wo`` and no ``q``.
DEFAULT_TARGETS = {
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bert": ["key", "value", "output.dense"],
    "roberta": ["key", "value", "output.dense"],
    "t5": ["k", "v", "wo"],
}
DEFAULT_FEEDFORWARD = {
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "qwen2": ["down_proj"],
    "gpt2": ["mlp.c_proj"],
    "bert": ["output.dense"],
    "roberta": ["output.dense"],
    "t5": ["wo"],
}

# IA3Config options deltakern cannot reproduce, with the value each must have.
_UNSUPPORTED = {
    "modules_to_save": (None, "fully trained extra modules"),
    "init_ia3_weights": (True, "random initial vectors"),
}


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _is_feedforward(name: str, feedforward_modules) -> bool:
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(entry) for entry in feedforward_modules)


def _with_defaults(caller: str, model: nn.Module, target_modules, feedforward_modules) -> tuple:
    """``(target_modules, feedforward_modules)`` with PEFT's defaults for the model type in place
    of None (as PEFT fills them in)."""
    model_type = _model_type(model)
    chosen = []
    for argument, value, table in (("target_modules", target_modules, DEFAULT_TARGETS),
                                   ("feedforward_modules", feedforward_modules, DEFAULT_FEEDFORWARD)):
        if value is None:
            if model_type not in table:
                raise ValueError(
                    f"{caller}: no default {argument} for {type(model).__name__} (model type {model_type!r}); "
                    f"defaults exist for model types {', '.join(sorted(table))}; give {argument}"
                )
            value = table[model_type]
        elif not (isinstance(value, str) or (isinstance(value, (list, tuple, set))
                                             and all(isinstance(v, str) for v in value))):
            raise ValueError(f"{caller}: {argument} must be a list of module names or a string, got {value!r}")
        chosen.append(value)
    return tuple(chosen)


def _wrap(model: nn.Module, names: list[str], feedforward_modules) -> None:
    for name in names:
        replace_submodule(model, name, IA3Linear(model.get_submodule(name), _is_feedforward(name, feedforward_modules)))
    freeze_base(model)


def add_ia3(model: nn.Module, target_modules: str | list[str] | None = None,
            feedforward_modules: str | list[str] | None = None) -> nn.Module:
    """Replace the targeted linear layers of ``model`` in place by ``IA3Linear`` and freeze the rest.

    Each targeted ``nn.Linear`` / ``Conv1D`` gets a vector ``ia3_l`` of ones: ``[out]`` scaling its
    output (keys, values), or ``[in]`` scaling its input for a feedforward layer (the FFN's down
    projection, whose input is the FFN intermediate). The model's outputs are unchanged until
    training moves the vectors; afterwards only the vectors (and the parameters of other deltakern
    delta modules) require grad.

    Args:
        model: any module; without ``target_modules`` / ``feedforward_modules`` a transformers model
            whose ``config.model_type`` is one of ``DEFAULT_TARGETS`` (llama, mistral, qwen2, gpt2,
            bert, roberta, t5), which gets PEFT's defaults for that type.
        target_modules: a list of names (matching layers whose qualified name equals an entry or
            ends with ``"." + entry``; each entry must match a linear layer) or ``"all-linear"``.
        feedforward_modules: a list of name suffixes or a regular expression (see the module
            docstring); every entry of a list must be the suffix of a targeted layer.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: the model type has no default and the argument is missing (the message names
            the model type), a name matches no linear layer, a feedforward entry matches no
            targeted layer, or an argument has the wrong type.
    """
    caller = "deltakern.add_ia3"
    given_feedforward = feedforward_modules is not None
    target_modules, feedforward_modules = _with_defaults(caller, model, target_modules, feedforward_modules)
    names = resolve_targets(model, target_modules, None, caller, strict=True)
    # PEFT's default feedforward layers may lie outside a target list the caller chose (then no
    # layer is feedforward); entries the caller wrote must each name a targeted layer.
    if given_feedforward and not isinstance(feedforward_modules, str):
        unmatched = [entry for entry in feedforward_modules if not any(n.endswith(entry) for n in names)]
        if unmatched:
            raise ValueError(f"{caller}: feedforward_modules {unmatched} match none of the targeted layers: "
                             f"{', '.join(names)}")
    _wrap(model, names, feedforward_modules)
    return model


def _layers(model: nn.Module) -> list[tuple[str, IA3Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, IA3Linear)]


def has_ia3(model: nn.Module) -> bool:
    """Whether ``model`` holds a deltakern ``IA3Linear``."""
    return bool(_layers(model))


def _peft_shape(layer: IA3Linear) -> tuple[int, int]:
    # PEFT keeps the vector as a column [out, 1] for keys/values and a row [1, in] for
    # feedforward layers.
    return (1, layer.in_features) if layer.feedforward else (layer.out_features, 1)


def peft_ia3_checkpoint(model: nn.Module) -> tuple[dict, dict]:
    """PEFT's ``adapter_config.json`` contents and ``adapter_model.safetensors`` state dict for the
    (IA)³ layers of ``model``, as ``PeftModel.save_pretrained`` writes them for an IA3 model.

    The config names every (IA)³ layer by its full qualified name in ``target_modules`` and every
    feedforward one in ``feedforward_modules``. State keys: ``base_model.model.<name>.ia3_l``,
    ``[out, 1]`` for keys/values and ``[1, in]`` for feedforward layers.

    Raises:
        ValueError: the model has no ``IA3Linear``.
    """
    layers = _layers(model)
    if not layers:
        raise ValueError(f"deltakern.save: {type(model).__name__} has no IA3Linear layer")
    config = {
        **peft_config_fields(model, "IA3", peft_task_type(model)),
        "target_modules": sorted(name for name, _ in layers),
        "exclude_modules": None,
        "feedforward_modules": sorted(name for name, m in layers if m.feedforward),
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in layers),
        "modules_to_save": None,
        "init_ia3_weights": True,
    }
    state = {f"{PEFT_KEY_PREFIX}{name}.ia3_l": m.ia3_l.detach().reshape(_peft_shape(m)) for name, m in layers}
    return config, state


def load_peft_ia3(model: nn.Module, config: dict, state: dict) -> nn.Module:
    """Add the (IA)³ layers a PEFT IA3 ``adapter_config.json`` describes to the plain ``model`` and
    load their vectors from ``state`` (keys ``base_model.model.<name>.ia3_l``, ``[out, 1]`` or
    ``[1, in]``). Targets and feedforward layers are matched as PEFT matches them (lists or regular
    expressions, minus ``exclude_modules``; PEFT's defaults for the model type when the config has
    none). Returns ``model`` with the base frozen.

    Raises:
        NotImplementedError: the config sets ``modules_to_save`` or ``init_ia3_weights=False``.
        ValueError: the config is not IA3, no layer matches, or the state dict lacks keys, has extra
            keys or wrong shapes (each named).
    """
    caller = "deltakern.load"
    if config.get("peft_type") != "IA3":
        raise ValueError(f"{caller}: expected a PEFT config with peft_type 'IA3', got {config.get('peft_type')!r}")
    for option, (plain, meaning) in _UNSUPPORTED.items():
        value = config.get(option, plain)
        if value != plain:
            raise NotImplementedError(f"{caller}: the IA3 checkpoint sets {option}={value!r} ({meaning}); deltakern "
                                      f"loads IA3 checkpoints with {option}={plain!r}")
    target_modules, feedforward_modules = _with_defaults(caller, model, config.get("target_modules"),
                                                         config.get("feedforward_modules"))
    names = resolve_targets(model, target_modules, config.get("exclude_modules"), caller, strict=False)
    _wrap(model, names, feedforward_modules)
    expected = {f"{PEFT_KEY_PREFIX}{name}.ia3_l": model.get_submodule(name) for name in names}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{caller}: the IA3 vectors do not fit the layers the config targets; missing keys: "
                         f"{missing}, unexpected keys: {unexpected}")
    for key, layer in expected.items():
        if tuple(state[key].shape) != _peft_shape(layer):
            raise ValueError(f"{caller}: {key} has shape {tuple(state[key].shape)}, the model's "
                             f"{'feedforward ' if layer.feedforward else ''}layer expects {_peft_shape(layer)}")
    with torch.no_grad():
        for key, layer in expected.items():
            layer.ia3_l.copy_(state[key].reshape(layer.ia3_l.shape))
    return model


# ---------------------------------------------------------------------------------------------
# The method's declaration
# ---------------------------------------------------------------------------------------------

# The (IA)³ vectors start at one (PEFT and deltakern alike); the end-to-end step draws them from
# N(1, 0.1²) so that a missing scale shows.
E2E_SCALE_STD = 0.1


def _e2e_reference(base: nn.Module) -> nn.Module:
    """PEFT's ``get_peft_model`` with ``IA3Config`` and its Llama defaults (output scales on
    ``k_proj`` and ``v_proj``, an input scale on ``down_proj``), the vectors drawn around 1."""
    import peft

    return peft_model_drawn(base, peft.IA3Config(task_type="CAUSAL_LM"), "ia3_l", 1.0, E2E_SCALE_STD)


def _e2e_pairs(reference: nn.Module, ours: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """PEFT keeps the vectors ``[out, 1]`` or ``[1, in]``, deltakern 1-D."""
    from peft.tuners.ia3 import IA3Layer

    return [(f"{name}.ia3_l", layer.ia3_l["default"], ours.get_submodule(name).ia3_l)
            for name, layer in reference.get_base_model().named_modules() if isinstance(layer, IA3Layer)]


register_method(MethodSpec(
    name="ia3", label="(IA)³", present=has_ia3,
    checkpoint=PeftFormat(("IA3",), save=peft_ia3_checkpoint, load=load_peft_ia3),
    e2e=E2EProviders(reference=_e2e_reference, deltakern=add_ia3, pairs=_e2e_pairs)))
