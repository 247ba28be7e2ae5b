"""``add_lora`` and ``merge_lora``: LoRA on a plain model through ``LoRALinear``, and the LoRA side
of ``deltakern.save`` / ``deltakern.load`` (PEFT's ``adapter_config.json`` and key names).

Targets are chosen as PEFT chooses them: ``"all-linear"`` is every ``nn.Linear`` and transformers
``Conv1D`` except the output layer, and a name in a list matches a module whose qualified name
equals it or ends with ``"." + name``. None of this depends on the family table: any model works.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..nn import LoRALinear
from ..nn.wrapped_linear import is_conv1d
from ..registry import E2EProviders, MethodSpec, PeftFormat, register_method
from .common import DELTA_MODULES, freeze_base, peft_config_fields, peft_task_type, replace_submodule

ALL_LINEAR = "all-linear"
# PEFT's prefix of every key in a saved LoRA state dict (PeftModel.base_model is a LoraModel whose
# .model is the wrapped model); the adapter name ("default") is not part of saved keys.
PEFT_KEY_PREFIX = "base_model.model."
# Classification heads PEFT leaves out of "all-linear" when a model has no output embeddings
# (PEFT's SEQ_CLS_HEAD_NAMES).
_CLASSIFIER_HEADS = ("score", "classifier")
# How many linear layer names an error message lists.
_LISTED = 8


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the ``nn.Linear`` / ``Conv1D`` layers of ``model`` that are not inside a
    deltakern delta module: no LoRA on LoRA, on an adapter's projections or a prefix encoder's MLP."""
    inside = {id(sub) for m in model.modules() if isinstance(m, DELTA_MODULES) for sub in m.modules()}
    return [name for name, module in model.named_modules() if _is_linear(module) and id(module) not in inside]


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
    shown = ", ".join(names[:_LISTED])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > _LISTED else shown or "none"


def _resolve_targets(model: nn.Module, target_modules, exclude_modules, caller: str, strict: bool) -> list[str]:
    """Qualified names of the linear layers ``target_modules`` selects, in module order.

    ``target_modules``: ``"all-linear"``, a list of name suffixes, or (``strict=False``, for PEFT
    configs) another string, a regular expression the whole name must match. ``strict``: every
    suffix must match a linear layer (``add_lora``); otherwise at least one layer must match
    (PEFT's rule when loading). ``exclude_modules``: None, a list of suffixes or a regex string.
    """
    linear = _linear_names(model)
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


def _wrap(model: nn.Module, names: list[str], r: int, alpha: float, dropout: float, use_rslora: bool) -> None:
    for name in names:
        replace_submodule(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout, use_rslora))
    freeze_base(model)


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
             target_modules: str | list[str] = "all-linear", use_rslora: bool = False) -> nn.Module:
    """Replace the targeted linear layers of ``model`` in place by ``LoRALinear`` and freeze the rest.

    Each ``nn.Linear`` (weight ``[out, in]``) or transformers ``Conv1D`` (weight ``[in, out]``)
    selected by ``target_modules`` gets ``lora_A [r, in]`` (kaiming-uniform) and ``lora_B [out, r]``
    (zeros), so the model's outputs are unchanged until training moves ``lora_B``. Afterwards only
    the LoRA parameters (and those of other deltakern delta modules) require grad.

    Args:
        model: any module; Hugging Face models additionally get their output layer left out of
            ``"all-linear"``.
        r: LoRA rank, >= 1.
        alpha: ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout probability on the LoRA branch's input (training mode only), in [0, 1).
        target_modules: ``"all-linear"`` (PEFT's rule: every linear layer except the output
            embeddings, or for a model without them its ``score`` / ``classifier`` head), or a list
            of names, each matching modules whose qualified name equals it or ends with ``"." + name``.
        use_rslora: rank-stabilised scaling.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: a target name matches no ``nn.Linear`` / ``Conv1D`` (the message lists the
            names and some of the model's linear layers), ``target_modules`` has the wrong type,
            or ``r`` / ``dropout`` are out of range.
    """
    names = _resolve_targets(model, target_modules, None, "deltakern.add_lora", strict=True)
    _wrap(model, names, r, alpha, dropout, use_rslora)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every ``LoRALinear`` of ``model`` into its base layer (``W += scaling · B A``,
    transposed for a ``Conv1D``) and put the plain base layer back at the same name. The merged
    model computes what the LoRA model computes in eval mode. Returns ``model``.

    Raises:
        ValueError: the model has no ``LoRALinear``.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError(f"deltakern.merge_lora: {type(model).__name__} has no LoRALinear layer to merge")
    for name, layer in layers:
        replace_submodule(model, name, layer.merged_base())
    return model


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds a deltakern ``LoRALinear``."""
    return any(isinstance(m, LoRALinear) for m in model.modules())


def peft_lora_checkpoint(model: nn.Module) -> tuple[dict, dict]:
    """PEFT's ``adapter_config.json`` contents and ``adapter_model.safetensors`` state dict for the
    LoRA layers of ``model``, as ``PeftModel.save_pretrained`` writes them.

    The config names every LoRA layer by its full qualified name in ``target_modules`` (what PEFT
    writes for ``"all-linear"``). State keys: ``base_model.model.<name>.lora_A.weight`` ``[r, in]``
    and ``base_model.model.<name>.lora_B.weight`` ``[out, r]``.

    Raises:
        ValueError: the model has no ``LoRALinear``.
        NotImplementedError: the layers differ in r, alpha, dropout or rsLoRA (PEFT would need
            ``rank_pattern`` / ``alpha_pattern``).
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError(f"deltakern.save: {type(model).__name__} has no LoRALinear layer")
    settings = {(m.r, m.alpha, m.dropout, m.scaling) for _, m in layers}
    if len(settings) > 1:
        raise NotImplementedError(
            f"deltakern.save: the LoRA layers differ in (r, alpha, dropout, scaling): {sorted(settings)}; "
            "the checkpoint holds one setting for all layers"
        )
    first = layers[0][1]
    use_rslora = first.scaling != first.alpha / first.r
    config = {
        **peft_config_fields(model, "LORA", peft_task_type(model)),
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout,
        "target_modules": sorted(name for name, _ in layers),
        "exclude_modules": None,
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in layers),
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layer_replication": None,
    }
    state = {}
    for name, layer in layers:
        state[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach()
        state[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach()
    return config, state


# LoraConfig options deltakern cannot reproduce, with the value each must have.
_UNSUPPORTED = {
    "use_dora": (False, "DoRA"),
    "lora_bias": (False, "a bias on lora_B"),
    "bias": ("none", "trained base biases"),
    "modules_to_save": (None, "fully trained extra modules"),
    "rank_pattern": ({}, "per-layer ranks"),
    "alpha_pattern": ({}, "per-layer alphas"),
    "layers_to_transform": (None, "a layer subset"),
    "layers_pattern": (None, "a layer subset"),
    "layer_replication": (None, "layer replication"),
    "target_parameters": (None, "LoRA on parameters"),
    "trainable_token_indices": (None, "trainable tokens"),
    "use_qalora": (False, "QA-LoRA"),
    "alora_invocation_tokens": (None, "activated LoRA"),
    "arrow_config": (None, "Arrow routing"),
    "use_bdlora": (None, "BD-LoRA"),
    "velora_config": (None, "VeLoRA"),
    "monteclora_config": (None, "MonteCLoRA"),
    "kasa_config": (None, "KaSA"),
}
# init_lora_weights values after which the base weights are those of the plain model (others,
# like "pissa" or "loftq", change the base weights at initialisation).
_PLAIN_INITS = (True, False, "gaussian")


def _check_config(config: dict) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"deltakern.load: expected a PEFT config with peft_type 'LORA', got {config.get('peft_type')!r}")
    for option, (plain, meaning) in _UNSUPPORTED.items():
        value = config.get(option, plain)
        if value != plain and value not in (None, False, {}, []):
            raise NotImplementedError(
                f"deltakern.load: the LoRA checkpoint sets {option}={value!r} ({meaning}); deltakern loads plain "
                f"LoRA only, with {option}={plain!r}"
            )
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise NotImplementedError(
            f"deltakern.load: the LoRA checkpoint sets init_lora_weights={init!r}, which changes the base weights; "
            f"deltakern loads checkpoints with init_lora_weights in {_PLAIN_INITS}"
        )
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"deltakern.load: the LoRA checkpoint's r must be an int >= 1, got {r!r}")


def load_peft_lora(model: nn.Module, config: dict, state: dict) -> nn.Module:
    """Add the LoRA layers a PEFT ``adapter_config.json`` describes to the plain ``model`` and load
    their weights from ``state`` (keys ``base_model.model.<name>.lora_A.weight`` ``[r, in]`` and
    ``...lora_B.weight`` ``[out, r]``). Targets are matched as PEFT matches them (a list of names or
    a regular expression, minus ``exclude_modules``). Returns ``model`` with the base frozen.

    Raises:
        NotImplementedError: the config uses an option deltakern does not reproduce (DoRA,
            lora_bias, modules_to_save, rank_pattern, ...); the message names it.
        ValueError: no layer matches, or the state dict lacks keys, has extra keys or wrong shapes.
    """
    _check_config(config)
    target_modules = config.get("target_modules")
    names = _resolve_targets(model, target_modules, config.get("exclude_modules"), "deltakern.load", strict=False)
    _wrap(model, names, config["r"], config.get("lora_alpha", 8), config.get("lora_dropout", 0.0),
          bool(config.get("use_rslora", False)))
    expected = {}
    for name in names:
        layer = model.get_submodule(name)
        expected[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A
        expected[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"deltakern.load: the LoRA weights do not fit the layers the config targets; "
            f"missing keys: {missing[:_LISTED]}, unexpected keys: {unexpected[:_LISTED]}"
        )
    with torch.no_grad():
        for key, parameter in expected.items():
            if state[key].shape != parameter.shape:
                raise ValueError(
                    f"deltakern.load: {key} has shape {tuple(state[key].shape)}, the model's layer expects "
                    f"{tuple(parameter.shape)}"
                )
            parameter.copy_(state[key])
    return model


# ---------------------------------------------------------------------------------------------
# The method's declaration: PEFT's checkpoint format, and deltakern bench's end-to-end step
# ---------------------------------------------------------------------------------------------

# The end-to-end step trains r=16, alpha=32, dropout 0.05 on every linear layer. LoRA's B starts
# at zero (PEFT and deltakern alike), which would make the LoRA path's output and A's gradient
# zero; the benchmark draws B like the base layers (HF's initializer_range).
E2E_R, E2E_ALPHA, E2E_DROPOUT, E2E_B_STD = 16, 32, 0.05, 0.02


def _e2e_reference(base: nn.Module) -> nn.Module:
    """PEFT's ``get_peft_model`` with ``LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
    target_modules="all-linear")``, B drawn from N(0, 0.02²)."""
    import peft

    config = peft.LoraConfig(task_type="CAUSAL_LM", r=E2E_R, lora_alpha=E2E_ALPHA, lora_dropout=E2E_DROPOUT,
                             target_modules=ALL_LINEAR)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, E2E_B_STD)
    return model


def _e2e_pairs(reference: nn.Module, ours: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    from peft.tuners.lora import LoraLayer

    pairs = []
    for name, layer in reference.get_base_model().named_modules():
        if isinstance(layer, LoraLayer):
            mine = ours.get_submodule(name)
            pairs.append((f"{name}.lora_A", layer.lora_A["default"].weight, mine.lora_A))
            pairs.append((f"{name}.lora_B", layer.lora_B["default"].weight, mine.lora_B))
    return pairs


register_method(MethodSpec(
    name="lora", label="LoRA", present=has_lora,
    checkpoint=PeftFormat(("LORA",), save=peft_lora_checkpoint, load=load_peft_lora),
    e2e=E2EProviders(
        reference=_e2e_reference,
        deltakern=lambda base: add_lora(base, r=E2E_R, alpha=E2E_ALPHA, dropout=E2E_DROPOUT, target_modules=ALL_LINEAR),
        pairs=_e2e_pairs)))
