"""``add_lora`` and ``merge_lora``: LoRA (and its QLoRA and DoRA variants) on a plain model through
``LoRALinear``, and the LoRA side of ``deltakern.save`` / ``deltakern.load`` (PEFT's
``adapter_config.json`` and key names, DoRA's magnitude included).

Targets are chosen as PEFT chooses them: ``"all-linear"`` is every ``nn.Linear`` and transformers
``Conv1D`` except the output layer, and a name in a list matches a module whose qualified name
equals it or ends with ``"." + name``. None of this depends on the family table: any model works.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nf4 import bnb_linear4bit
from ..nn import LoRALinear, MultiLoRALinear, NF4Linear
from ..registry import E2EProviders, MethodSpec, PeftFormat, register_method
from .common import (
    PEFT_KEY_PREFIX,
    freeze_base,
    load_checked,
    peft_config_fields,
    peft_model_drawn,
    peft_task_type,
    replace_submodule,
)
from .multi_lora import adapter_names, add_named_lora, has_named_lora
from .targets import ALL_LINEAR, LISTED, resolve_targets

# PEFT's key suffix of DoRA's magnitude vector in a saved state dict (no ".weight": PEFT strips the
# adapter name and the DoraLinearLayer's parameter name together).
_MAGNITUDE_KEY = "lora_magnitude_vector"


def _wrap(model: nn.Module, names: list[str], r: int, alpha: float, dropout_p: float, use_rslora: bool,
          use_dora: bool) -> None:
    for name in names:
        replace_submodule(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout_p, use_rslora, use_dora))
    freeze_base(model)


def quantize(model: nn.Module, target_modules: str | list[str] = "all-linear", blocksize: int = 64,
             nested: bool = False) -> nn.Module:
    """Replace the targeted linear layers of ``model`` in place by :class:`~deltakern.nn.NF4Linear`
    (4-bit NF4 weights, byte-identical to bitsandbytes' ``quantize_4bit``; bitsandbytes is not
    needed). Targets are chosen as by :func:`add_lora`; layers already in NF4 are left as they are.

    Args:
        blocksize: values per absmax block, one of ``deltakern.nf4.BLOCKSIZES`` (bitsandbytes' 64
            by default).
        nested: also quantise the block scales to 8 bits (bitsandbytes' ``compress_statistics``,
            QLoRA's "double quantisation").

    Layers the model class keeps in full precision (transformers' ``_keep_in_fp32_modules``: T5's
    ``wo``, whose forward casts its input to ``wo.weight.dtype``) stay dense, as transformers keeps
    them when it loads a model in 4 bits; ``add_lora`` puts plain LoRA on them.

    Returns ``model``; its base stays frozen (NF4 codes are frozen uint8 parameters, never trained).
    """
    names = resolve_targets(model, target_modules, None, "deltakern.quantize", strict=True)
    keep_dense = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name in names:
        if keep_dense.intersection(name.split(".")):
            continue
        layer = model.get_submodule(name)
        if not isinstance(layer, NF4Linear):
            replace_submodule(model, name, NF4Linear.from_linear(layer, blocksize, nested))
    return model


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout_p: float = 0.0,
             target_modules: str | list[str] = "all-linear", use_rslora: bool = False,
             quantize_base: str | None = None, use_dora: bool = False, adapter_name: str | None = None) -> nn.Module:
    """Replace the targeted linear layers of ``model`` in place by ``LoRALinear`` and freeze the rest.

    Each ``nn.Linear`` (weight ``[out, in]``) or transformers ``Conv1D`` (weight ``[in, out]``)
    selected by ``target_modules`` gets ``lora_A [r, in]`` (kaiming-uniform) and ``lora_B [out, r]``
    (zeros), so the model's outputs are unchanged until training moves ``lora_B``. Afterwards only
    the LoRA parameters (and those of other deltakern delta modules) require grad. With
    ``use_dora`` each layer also gets DoRA's magnitude ``lora_magnitude [out]`` (``‖W‖`` per row,
    PEFT's initialisation, so the outputs are again unchanged) and runs DoRA's fused op.

    Args:
        model: any module; Hugging Face models additionally get their output layer left out of
            ``"all-linear"``.
        r: LoRA rank, >= 1.
        alpha: ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout_p: dropout probability on the LoRA branch's input (training mode only), in [0, 1).
        target_modules: ``"all-linear"`` (PEFT's rule: every linear layer except the output
            embeddings, or for a model without them its ``score`` / ``classifier`` head), or a list
            of names, each matching modules whose qualified name equals it or ends with ``"." + name``.
        use_rslora: rank-stabilised scaling.
        quantize_base: ``"nf4"`` for QLoRA: the targeted layers' weights are first quantised to
            NF4 (:func:`quantize`, block size 64, no nesting) and the LoRA layers run
            ``qlora_linear``. Layers that are already ``NF4Linear`` get QLoRA either way.
        use_dora: DoRA (PEFT's ``use_dora=True``); over NF4 layers (QDoRA) the weight is
            dequantised on each forward (not fused yet, see :class:`~deltakern.nn.LoRALinear`).
        adapter_name: add a named adapter (PEFT's ``add_adapter``); call again with other names
            (and their own r, alpha, dropout_p, targets, rsLoRA) for several. The targeted layers
            become :class:`~deltakern.nn.MultiLoRALinear` (parameters ``lora_A.<name>`` /
            ``lora_B.<name>``); a layer an adapter does not target has no factors of it. The first
            adapter is active (:func:`deltakern.set_adapter` changes that), and ``model(...,
            adapter_names=[...])`` / ``model.generate(..., adapter_names=[...])`` pick one adapter
            per sequence (``"__base__"``: none). A model with unnamed LoRA keeps it as the adapter
            ``"default"`` (same parameter objects). Not with ``use_dora`` or NF4 bases yet
            (NotImplementedError). Without ``adapter_name`` everything is as before: ``LoRALinear``
            layers with ``lora_A`` / ``lora_B``.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: a target name matches no ``nn.Linear`` / ``Conv1D`` (the message lists the
            names and some of the model's linear layers), ``target_modules`` has the wrong type,
            or ``r`` / ``dropout_p`` / ``use_dora`` are out of range or of the wrong type.
    """
    if quantize_base not in (None, "nf4"):
        raise ValueError(f"deltakern.add_lora: quantize_base must be None or 'nf4', got {quantize_base!r}")
    if adapter_name is not None:
        if use_dora or quantize_base is not None:
            option = "use_dora=True" if use_dora else f"quantize_base={quantize_base!r}"
            raise NotImplementedError(f"deltakern.add_lora: named adapters (adapter_name={adapter_name!r}) do not "
                                      f"support {option} yet; add DoRA / QLoRA without adapter_name")
        return add_named_lora(model, adapter_name, r, alpha, dropout_p, target_modules, use_rslora)
    if has_named_lora(model):
        raise ValueError(f"deltakern.add_lora: the model has named LoRA adapters {adapter_names(model)}; give the "
                         f"new one an adapter_name")
    names = resolve_targets(model, target_modules, None, "deltakern.add_lora", strict=True)
    if quantize_base == "nf4":
        quantize(model, names)
    _wrap(model, names, r, alpha, dropout_p, use_rslora, use_dora)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every ``LoRALinear`` of ``model`` into its base layer (``W += scaling · B A``,
    transposed for a ``Conv1D``; DoRA's ``W ← (m / ‖W + scaling · B A‖) ⊙ (W + scaling · B A)``
    per row, as PEFT merges it) and put the plain base layer back at the same name. The merged
    model computes what the LoRA model computes in eval mode. Returns ``model``.

    An NF4 (QLoRA) base is dequantised, merged and quantised to NF4 again (as PEFT merges into
    bitsandbytes' 4-bit layers): the merged layer stays 4-bit and differs from the LoRA layer by
    that second rounding, at most half an NF4 step of its block's scale per weight.

    Raises:
        ValueError: the model has no ``LoRALinear``.
    """
    if has_named_lora(model):
        raise NotImplementedError("deltakern.merge_lora: merging named adapters (MultiLoRALinear) is not "
                                  "supported yet")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError(f"deltakern.merge_lora: {type(model).__name__} has no LoRALinear layer to merge")
    for name, layer in layers:
        replace_submodule(model, name, layer.merged_base())
    return model


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds a deltakern ``LoRALinear`` or named adapters (``MultiLoRALinear``)."""
    return any(isinstance(m, (LoRALinear, MultiLoRALinear)) for m in model.modules())


def peft_lora_checkpoint(model: nn.Module) -> tuple[dict, dict]:
    """PEFT's ``adapter_config.json`` contents and ``adapter_model.safetensors`` state dict for the
    LoRA layers of ``model``, as ``PeftModel.save_pretrained`` writes them.

    The config names every LoRA layer by its full qualified name in ``target_modules`` (what PEFT
    writes for ``"all-linear"``). State keys: ``base_model.model.<name>.lora_A.weight`` ``[r, in]``
    and ``base_model.model.<name>.lora_B.weight`` ``[out, r]``, and for DoRA (``use_dora: true``)
    ``base_model.model.<name>.lora_magnitude_vector`` ``[out]``.

    Raises:
        ValueError: the model has no ``LoRALinear``.
        NotImplementedError: the layers differ in r, alpha, dropout_p, rsLoRA or DoRA (PEFT would
            need ``rank_pattern`` / ``alpha_pattern``; its config has one ``use_dora``).
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError(f"deltakern.save: {type(model).__name__} has no LoRALinear layer")
    settings = {(m.r, m.alpha, m.dropout_p, m.scaling, m.use_dora) for _, m in layers}
    if len(settings) > 1:
        raise NotImplementedError(
            f"deltakern.save: the LoRA layers differ in (r, alpha, dropout_p, scaling, use_dora): {sorted(settings)}; "
            "the checkpoint holds one setting for all layers"
        )
    first = layers[0][1]
    use_rslora = first.scaling != first.alpha / first.r
    config = _peft_config(model, first.r, first.alpha, first.dropout_p, use_rslora, first.use_dora, layers)
    state = {}
    for name, layer in layers:
        state[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach()
        state[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach()
        if layer.use_dora:
            state[f"{PEFT_KEY_PREFIX}{name}.{_MAGNITUDE_KEY}"] = layer.lora_magnitude.detach()
    return config, state


def _peft_config(model: nn.Module, r: int, alpha: float, dropout_p: float, use_rslora: bool, use_dora: bool,
                 layers: list[tuple[str, nn.Module]]) -> dict:
    """PEFT's ``adapter_config.json`` of one LoRA adapter on the named ``layers``."""
    return {
        **peft_config_fields(model, "LORA", peft_task_type(model)),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout_p,
        "target_modules": sorted(name for name, _ in layers),
        "exclude_modules": None,
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in layers),
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "lora_bias": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layer_replication": None,
    }


def peft_lora_adapter_checkpoint(model: nn.Module, adapter_name: str) -> tuple[dict, dict]:
    """PEFT's ``adapter_config.json`` contents and state dict for the named adapter
    ``adapter_name`` of ``model`` (what ``PeftModel.save_pretrained`` writes for one adapter: keys
    ``base_model.model.<name>.lora_A.weight`` / ``lora_B.weight``, the adapter name left out).

    Raises:
        ValueError: no layer holds the adapter.
        NotImplementedError: the adapter's layers differ in r, alpha or dropout (add_lora never
            makes such an adapter).
    """
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, MultiLoRALinear) and adapter_name in m.adapter_names]
    if not layers:
        raise ValueError(f"deltakern.save: no layer of {type(model).__name__} holds the adapter {adapter_name!r}; "
                         f"its adapters are {adapter_names(model)}")
    settings = {(m.r[adapter_name], m.alpha[adapter_name], m.dropout_p[adapter_name], m.scaling[adapter_name])
                for _, m in layers}
    if len(settings) > 1:
        raise NotImplementedError(f"deltakern.save: the layers of adapter {adapter_name!r} differ in "
                                  f"(r, alpha, dropout_p, scaling): {sorted(settings)}")
    r, alpha, dropout_p, scaling = settings.pop()
    config = _peft_config(model, r, alpha, dropout_p, scaling != alpha / r, False, layers)
    state = {}
    for name, layer in layers:
        state[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].detach()
        state[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].detach()
    return config, state


def load_peft_lora_adapter(model: nn.Module, config: dict, state: dict, adapter_name: str) -> nn.Module:
    """Add the LoRA adapter a PEFT ``adapter_config.json`` describes to ``model`` as the named
    adapter ``adapter_name`` (PEFT's ``load_adapter``) and load its weights from ``state``.

    Raises:
        NotImplementedError: the config uses an option deltakern does not reproduce, or DoRA
            (named adapters are plain LoRA).
        ValueError: no layer matches, the name is taken, or the state dict lacks keys, has extra
            keys or wrong shapes (nothing is added then).
    """
    _check_config(config)
    if config.get("use_dora"):
        raise NotImplementedError("deltakern.load: named adapters do not support DoRA yet; load this checkpoint "
                                  "without adapter_name")
    names = resolve_targets(model, config.get("target_modules"), config.get("exclude_modules"), "deltakern.load",
                            strict=False, wrapped=(MultiLoRALinear, LoRALinear))
    expected = {f"{PEFT_KEY_PREFIX}{name}.lora_{part}.weight" for name in names for part in "AB"}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"deltakern.load: the LoRA weights do not fit the layers the config targets; "
            f"missing keys: {missing[:LISTED]}, unexpected keys: {unexpected[:LISTED]}"
        )
    add_named_lora(model, adapter_name, config["r"], config.get("lora_alpha", 8), config.get("lora_dropout", 0.0),
                   names, bool(config.get("use_rslora", False)))
    targets = {}
    for name in names:
        layer = model.get_submodule(name)
        targets[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name]
        targets[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name]
    load_checked("deltakern.load", "LoRA", targets, state)
    return model


# LoraConfig options deltakern cannot reproduce, with the value each must have.
_UNSUPPORTED = {
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
                f"deltakern.load: the LoRA checkpoint sets {option}={value!r} ({meaning}); deltakern loads LoRA "
                f"and DoRA with {option}={plain!r} only"
            )
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise NotImplementedError(
            f"deltakern.load: the LoRA checkpoint sets init_lora_weights={init!r}, which changes the base weights; "
            f"deltakern loads checkpoints with init_lora_weights in {_PLAIN_INITS}"
        )
    if config.get("use_dora", False) not in (True, False, None):
        raise ValueError(f"deltakern.load: the LoRA checkpoint's use_dora must be true or false, "
                         f"got {config['use_dora']!r}")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"deltakern.load: the LoRA checkpoint's r must be an int >= 1, got {r!r}")


def load_peft_lora(model: nn.Module, config: dict, state: dict) -> nn.Module:
    """Add the LoRA layers a PEFT ``adapter_config.json`` describes to the plain ``model`` and load
    their weights from ``state`` (keys ``base_model.model.<name>.lora_A.weight`` ``[r, in]`` and
    ``...lora_B.weight`` ``[out, r]``, with ``use_dora`` also ``...lora_magnitude_vector``
    ``[out]``). Targets are matched as PEFT matches them (a list of names or a regular expression,
    minus ``exclude_modules``). Returns ``model`` with the base frozen.

    Raises:
        NotImplementedError: the config uses an option deltakern does not reproduce (lora_bias,
            modules_to_save, rank_pattern, ...); the message names it.
        ValueError: no layer matches, or the state dict lacks keys, has extra keys or wrong shapes.
    """
    _check_config(config)
    target_modules = config.get("target_modules")
    names = resolve_targets(model, target_modules, config.get("exclude_modules"), "deltakern.load", strict=False)
    _wrap(model, names, config["r"], config.get("lora_alpha", 8), config.get("lora_dropout", 0.0),
          bool(config.get("use_rslora", False)), bool(config.get("use_dora", False)))
    expected = {}
    for name in names:
        layer = model.get_submodule(name)
        expected[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A
        expected[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B
        if layer.use_dora:
            expected[f"{PEFT_KEY_PREFIX}{name}.{_MAGNITUDE_KEY}"] = layer.lora_magnitude
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"deltakern.load: the LoRA weights do not fit the layers the config targets; "
            f"missing keys: {missing[:LISTED]}, unexpected keys: {unexpected[:LISTED]}"
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
E2E_R, E2E_ALPHA, E2E_DROPOUT_P, E2E_B_STD = 16, 32, 0.05, 0.02


def _e2e_reference(base: nn.Module, use_dora: bool = False) -> nn.Module:
    """PEFT's ``get_peft_model`` with ``LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
    target_modules="all-linear", use_dora=use_dora)``, B drawn from N(0, 0.02²)."""
    import peft

    config = peft.LoraConfig(task_type="CAUSAL_LM", r=E2E_R, lora_alpha=E2E_ALPHA, lora_dropout=E2E_DROPOUT_P,
                             target_modules=ALL_LINEAR, use_dora=use_dora)
    return peft_model_drawn(base, config, "lora_B", 0.0, E2E_B_STD)


def _e2e_pairs(reference: nn.Module, ours: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """lora_A and lora_B of each PEFT LoRA layer with the deltakern layer's, and with DoRA the
    magnitude (PEFT's ``lora_magnitude_vector["default"].weight``) with ``lora_magnitude``."""
    from peft.tuners.lora import LoraLayer

    pairs = []
    for name, layer in reference.get_base_model().named_modules():
        if isinstance(layer, LoraLayer):
            mine = ours.get_submodule(name)
            pairs.append((f"{name}.lora_A", layer.lora_A["default"].weight, mine.lora_A))
            pairs.append((f"{name}.lora_B", layer.lora_B["default"].weight, mine.lora_B))
            if "default" in layer.lora_magnitude_vector:
                pairs.append((f"{name}.lora_magnitude", layer.lora_magnitude_vector["default"].weight,
                              mine.lora_magnitude))
    return pairs


register_method(MethodSpec(
    name="lora", label="LoRA", present=has_lora,
    checkpoint=PeftFormat(("LORA",), save=peft_lora_checkpoint, load=load_peft_lora, adapters=adapter_names,
                          save_adapter=peft_lora_adapter_checkpoint, load_adapter=load_peft_lora_adapter),
    e2e=E2EProviders(
        reference=_e2e_reference,
        deltakern=lambda base: add_lora(base, r=E2E_R, alpha=E2E_ALPHA, dropout_p=E2E_DROPOUT_P, target_modules=ALL_LINEAR),
        pairs=_e2e_pairs)))


# QLoRA's end-to-end step: the same LoRA over NF4 base weights (block size 64, every linear layer
# but the output layer; absmax kept in fp32 on both sides, as nested codes could differ, nf4.py).
# PEFT's side is what QLoRA users run: bitsandbytes' Linear4bit layers (quantised from the same
# dense weights, so the bytes are deltakern's) under get_peft_model. QLoRA's checkpoint is LoRA's
# (PEFT's format, the base stays the user's).


def _e2e_qlora_reference(base: nn.Module) -> nn.Module:
    """``base`` with its targeted linear layers as bitsandbytes NF4 ``Linear4bit`` (compute dtype
    the model's), marked as loaded in 4 bits, under PEFT's LoRA as in :func:`_e2e_reference`."""
    try:
        import bitsandbytes  # noqa: F401 (a clear error here, not inside the first layer)
    except ImportError as error:
        raise ValueError("the QLoRA end-to-end step compares against bitsandbytes' Linear4bit: "
                         "pip install 'deltakern[bench]' (or bitsandbytes)") from error

    for name in resolve_targets(base, ALL_LINEAR, None, "deltakern.bench", strict=True):
        dense = base.get_submodule(name)
        replace_submodule(base, name, bnb_linear4bit(dense))
    base.is_loaded_in_4bit = True  # what transformers sets: PEFT then wraps Linear4bit in its bnb LoRA layer
    return _e2e_reference(base)


register_method(MethodSpec(
    name="qlora", label="QLoRA",
    e2e=E2EProviders(
        reference=_e2e_qlora_reference,
        deltakern=lambda base: add_lora(base, r=E2E_R, alpha=E2E_ALPHA, dropout_p=E2E_DROPOUT_P, target_modules=ALL_LINEAR,
                                        quantize_base="nf4"),
        pairs=_e2e_pairs)))


# DoRA's end-to-end step: LoRA's, with PEFT's use_dora=True against add_lora(use_dora=True). Its
# magnitude starts at ‖W‖ on both sides (PEFT's init, before B is drawn), so with the drawn B the
# scale m / ‖W + s·B A‖ differs from 1 and the magnitude's path shows. DoRA's checkpoint is LoRA's
# (use_dora: true in PEFT's format), so the method declares none of its own.
register_method(MethodSpec(
    name="dora", label="DoRA",
    e2e=E2EProviders(
        reference=lambda base: _e2e_reference(base, use_dora=True),
        deltakern=lambda base: add_lora(base, r=E2E_R, alpha=E2E_ALPHA, dropout_p=E2E_DROPOUT_P, target_modules=ALL_LINEAR,
                                        use_dora=True),
        pairs=_e2e_pairs)))
