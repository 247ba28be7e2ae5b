"""``save`` and ``load``: the checkpoint format each delta method declares (its ``MethodSpec``):
PEFT's adapter format for LoRA, (IA)³, prefix tuning, prompt tuning and P-tuning, deltakern's own
for adapters and BitFit.

A directory written by :func:`save` holds
  - ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's files, PEFT's key names) when
    the model has a method in PEFT's format; PEFT's format holds one method per checkpoint;
  - ``<stem>.json`` + ``<stem>.safetensors`` for each method in a format of deltakern's own
    (``deltakern_adapters``, ``deltakern_bitfit``).

A model sharded with FSDP2's ``fully_shard`` (or holding other DTensor parameters) is saved as
the unsharded model would be: :func:`save` all-gathers the delta tensors on every rank of the
parameters' device mesh and the mesh's first rank writes the files.
"""

from __future__ import annotations

import contextlib
import json
import os

from torch import nn

from ..ops._common import is_dtensor
from ..registry import MethodSpec, OwnFormat, PeftFormat, methods
from .common import delta_parameter_ids

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def _formats() -> tuple[list[MethodSpec], list[MethodSpec]]:
    """The methods saved in PEFT's format, and those in their own files in load order."""
    saved = [m for m in methods().values() if m.checkpoint is not None]
    peft = [m for m in saved if isinstance(m.checkpoint, PeftFormat)]
    own = sorted((m for m in saved if isinstance(m.checkpoint, OwnFormat)), key=lambda m: m.checkpoint.load_order)
    return peft, own


def _device_mesh(model: nn.Module):
    """The device mesh of the model's first DTensor parameter (FSDP2 shards every parameter over
    one mesh), or None for a model without DTensor parameters."""
    return next((p.device_mesh for p in model.parameters() if is_dtensor(p)), None)


@contextlib.contextmanager
def _whole_delta_parameters(model: nn.Module):
    """Within the block, each delta parameter of ``model`` that is a DTensor (sharded by FSDP2's
    ``fully_shard``) is replaced by its whole tensor, so the methods' checkpoint functions read and
    compute (a prefix's projection, a P-tuning encoder) exactly what they read unsharded. Each is
    all-gathered: every rank of the mesh must enter, and does so in the same (module) order. The
    frozen base stays sharded."""
    delta = delta_parameter_ids(model)
    swapped = []
    try:
        for module in model.modules():
            for name, parameter in list(module._parameters.items()):
                if parameter is not None and id(parameter) in delta and is_dtensor(parameter):
                    whole = nn.Parameter(parameter.detach().full_tensor(), requires_grad=parameter.requires_grad)
                    module._parameters[name] = whole
                    swapped.append((module, name, parameter))
        yield
    finally:
        for module, name, parameter in reversed(swapped):
            module._parameters[name] = parameter


def _write(directory: str, config_name: str, weights_name: str, config: dict, state: dict, writes: bool = True) -> None:
    """Write ``config`` and ``state``; a DTensor left in ``state`` (a base tensor a method saves,
    e.g. prompt tuning's classification head) is all-gathered first, on every rank, and only a
    rank with ``writes`` writes."""
    from safetensors.torch import save_file

    state = {k: (v.detach().full_tensor() if is_dtensor(v) else v.detach()).contiguous().cpu()
             for k, v in state.items()}
    if not writes:
        return
    with open(os.path.join(directory, config_name), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(state, os.path.join(directory, weights_name))


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

    FSDP2: on a model sharded with ``fully_shard`` (DTensor parameters), call ``save`` on every rank
    of the mesh with the same arguments: each delta tensor is all-gathered (the frozen base is not),
    the mesh's first rank (rank 0 of a 1-D mesh) writes exactly the files ``save`` writes for the
    unsharded model, the other ranks write nothing, and no rank returns before the files are
    written. Calling it on one rank only hangs in the all-gather (up to the process group's timeout).
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
    mesh = _device_mesh(model)
    coordinate = mesh.get_coordinate() if mesh is not None else None
    writes = mesh is None or (coordinate is not None and not any(coordinate))
    if writes:
        os.makedirs(path, exist_ok=True)
    with _whole_delta_parameters(model):
        for method in peft_present:
            adapters = named.get(method.name)
            if not adapters:
                _write(path, PEFT_CONFIG, PEFT_WEIGHTS, *method.checkpoint.save(model), writes=writes)
                continue
            for adapter in adapters if selected_adapters is None else [a for a in adapters if a in selected_adapters]:
                directory = path if adapter == "default" else os.path.join(path, adapter)  # PEFT's layout
                if writes:
                    os.makedirs(directory, exist_ok=True)
                _write(directory, PEFT_CONFIG, PEFT_WEIGHTS, *method.checkpoint.save_adapter(model, adapter),
                       writes=writes)
        for method in own_present:
            stem = method.checkpoint.stem
            _write(path, f"{stem}.json", f"{stem}.safetensors", *method.checkpoint.save(model), writes=writes)
    if coordinate is not None:
        import torch.distributed as dist

        # The writer enters the first barrier after writing; with one barrier per mesh dimension,
        # in order, every rank of the mesh waits for a rank that has waited for the writer.
        for dim in range(mesh.ndim):
            dist.barrier(group=mesh.get_group(dim))


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

    FSDP2: load into the unsharded base model on every rank, then call ``fully_shard``; the sharded
    model computes what the saved model computed (sharded or not). A model that is sharded already
    (DTensor parameters) is a ``ValueError``: delta modules added after ``fully_shard`` would not
    be part of FSDP2's parameter groups.
    """
    if _device_mesh(model) is not None:
        raise ValueError("deltakern.load: the model has DTensor parameters (sharded with fully_shard?); load the "
                         "checkpoint into the unsharded model on every rank, then call fully_shard")
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
