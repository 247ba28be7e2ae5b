"""``save`` and ``load``: the checkpoint format each delta method declares (its ``MethodSpec``):
PEFT's adapter format for LoRA, (IA)³, prefix tuning, prompt tuning and P-tuning, deltakern's own
for adapters and BitFit.

A directory written by :func:`save` holds
  - ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's files, PEFT's key names) when
    the model has a method in PEFT's format; PEFT's format holds one method per checkpoint;
  - ``<stem>.json`` + ``<stem>.safetensors`` for each method in a format of deltakern's own
    (``deltakern_adapters``, ``deltakern_bitfit``).
"""

from __future__ import annotations

import json
import os

from torch import nn

from ..registry import MethodSpec, OwnFormat, PeftFormat, methods

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def _formats() -> tuple[list[MethodSpec], list[MethodSpec]]:
    """The methods saved in PEFT's format, and those in their own files in load order."""
    saved = [m for m in methods().values() if m.checkpoint is not None]
    peft = [m for m in saved if isinstance(m.checkpoint, PeftFormat)]
    own = sorted((m for m in saved if isinstance(m.checkpoint, OwnFormat)), key=lambda m: m.checkpoint.load_order)
    return peft, own


def _write(directory: str, config_name: str, weights_name: str, config: dict, state: dict) -> None:
    from safetensors.torch import save_file

    with open(os.path.join(directory, config_name), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(directory, weights_name))


def _read(directory: str, config_name: str, weights_name: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    with open(os.path.join(directory, config_name)) as f:
        config = json.load(f)
    return config, load_file(os.path.join(directory, weights_name))


def save(model: nn.Module, path: str | os.PathLike, selected_adapters: list[str] | None = None) -> None:
    """Write the delta of ``model`` (not the base weights) to directory ``path``.

    LoRA, (IA)³, prefix tuning, prompt tuning or P-tuning (the encoder's output, as PEFT saves it)
    go to PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``, so
    ``PeftModel.from_pretrained(base, path)`` loads them; adapters go to
    ``deltakern_adapters.json`` + ``deltakern_adapters.safetensors``, BitFit biases to
    ``deltakern_bitfit.json`` + ``deltakern_bitfit.safetensors``.

    Named LoRA adapters (``add_lora(..., adapter_name=...)``) are written as PEFT's
    ``save_pretrained`` writes them: adapter ``"default"`` at ``path``, every other adapter in
    ``path/<name>/``, each a complete PEFT checkpoint (``PeftModel.from_pretrained(base,
    path/<name>, adapter_name=<name>)`` or ``load_adapter`` reads it). ``selected_adapters``: the
    adapters to write (default: all).
    """
    peft, own = _formats()
    peft_present = [m for m in peft if m.present(model)]
    own_present = [m for m in own if m.present(model)]
    if len(peft_present) > 1:
        both = "both " if len(peft_present) == 2 else ""
        raise NotImplementedError(f"deltakern.save: the model has {both}{' and '.join(m.label for m in peft_present)}; "
                                  f"PEFT's format holds one method per checkpoint")
    if not (peft_present or own_present):
        labels = [m.label.removeprefix("a ") for m in peft + own]
        raise ValueError(f"deltakern.save: the model has no deltakern {', '.join(labels[:-1])} or {labels[-1]} to save")
    named = {m.name: m.checkpoint.adapters(model) for m in peft_present if m.checkpoint.adapters is not None}
    if selected_adapters is not None:
        known = [a for adapters in named.values() for a in adapters]
        if not known:
            raise ValueError("deltakern.save: selected_adapters is given but the model has no named adapters")
        if isinstance(selected_adapters, str) or not set(selected_adapters) <= set(known) or not selected_adapters:
            raise ValueError(f"deltakern.save: selected_adapters must be a non-empty list of the model's adapters "
                             f"{known}, got {selected_adapters!r}")
    os.makedirs(path, exist_ok=True)
    for method in peft_present:
        adapters = named.get(method.name)
        if not adapters:
            _write(path, PEFT_CONFIG, PEFT_WEIGHTS, *method.checkpoint.save(model))
            continue
        for adapter in adapters if selected_adapters is None else [a for a in adapters if a in selected_adapters]:
            directory = path if adapter == "default" else os.path.join(path, adapter)  # PEFT's layout
            os.makedirs(directory, exist_ok=True)
            _write(directory, PEFT_CONFIG, PEFT_WEIGHTS, *method.checkpoint.save_adapter(model, adapter))
    for method in own_present:
        stem = method.checkpoint.stem
        _write(path, f"{stem}.json", f"{stem}.safetensors", *method.checkpoint.save(model))


def load(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> nn.Module:
    """Add the delta modules a checkpoint at ``path`` describes to the plain base ``model``, load
    their weights and return the model, ready to run (in eval mode, base frozen).

    Reads the formats the methods declare: PEFT checkpoints of the types they read (written by
    PEFT or by :func:`save`) and deltakern's own files, those that wrap base layers (adapters)
    first. Another PEFT type raises ``ValueError`` naming it and the types deltakern reads.

    ``adapter_name``: load the PEFT checkpoint at ``path`` as the named adapter ``adapter_name``
    (PEFT's ``load_adapter``), also into a model that has named adapters already; for a directory
    written with several adapters, load ``path`` as ``"default"`` and ``path/<name>`` as each
    other. Only methods with named adapters (LoRA) can be loaded so (NotImplementedError otherwise).
    """
    peft, own = _formats()
    own_found = [m for m in own if os.path.isfile(os.path.join(path, f"{m.checkpoint.stem}.json"))]
    has_peft = os.path.isfile(os.path.join(path, PEFT_CONFIG))
    if not (has_peft or own_found):
        names = [PEFT_CONFIG] + [f"{m.checkpoint.stem}.json" for m in own]
        raise ValueError(f"deltakern.load: {os.fspath(path)!r} holds none of {', '.join(names)}")
    loaders = []
    if has_peft:
        config, state = _read(path, PEFT_CONFIG, PEFT_WEIGHTS)
        readers = {peft_type: m.checkpoint.load for m in peft for peft_type in m.checkpoint.peft_types}
        peft_type = config.get("peft_type")
        if peft_type not in readers:
            raise ValueError(f"deltakern.load: {os.fspath(path)!r} is a PEFT checkpoint of type {peft_type!r}; "
                             f"deltakern.load reads {', '.join(readers)}")
        reader = readers[peft_type]
        if adapter_name is not None:
            named = {t: m.checkpoint.load_adapter for m in peft for t in m.checkpoint.peft_types
                     if m.checkpoint.load_adapter is not None}
            if peft_type not in named:
                raise NotImplementedError(f"deltakern.load: adapter_name is given, but {peft_type!r} checkpoints "
                                          f"load without names only; named adapters: {', '.join(named)}")

            def reader(model, config, state, load_adapter=named[peft_type]):
                return load_adapter(model, config, state, adapter_name)
        loaders.append((0, reader, config, state))
    elif adapter_name is not None:
        raise ValueError(f"deltakern.load: adapter_name is given but {os.fspath(path)!r} holds no {PEFT_CONFIG}")
    for method in own_found:
        stem = method.checkpoint.stem
        loaders.append((method.checkpoint.load_order, method.checkpoint.load,
                        *_read(path, f"{stem}.json", f"{stem}.safetensors")))
    for _, load_method, config, state in sorted(loaders, key=lambda entry: entry[0]):
        model = load_method(model, config, state)
    return model.eval()
