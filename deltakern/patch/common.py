"""What every model-surgery function shares: freezing the base model, counting parameters,
swapping a submodule by its qualified name."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.delta import DeltaModule

# PEFT's prefix of every key in a saved state dict (PeftModel.base_model is a tuner model whose
# .model is the wrapped model); the adapter name ("default") is not part of saved keys.
PEFT_KEY_PREFIX = "base_model.model."


def delta_parameter_ids(model: nn.Module) -> set[int]:
    """Ids of the delta parameters of ``model``: those of its delta modules (a wrapper's own, not
    its base layer's), and the biases BitFit trains; everything else is the frozen base."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, DeltaModule):
            ids.update(id(p) for p in module.delta_parameters())
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


def prompt_weight_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a prompt's or prefix's trainable weights over a model computing in
    ``model_dtype``: float32 over float16 and bfloat16 models, as PEFT keeps them (its prompt,
    P-tuning and prefix encoders are built in float32 and their outputs cast to the model's dtype
    where they are used; a bf16 P-tuning encoder lands 4x further from the fp32 step than PEFT's),
    else the model's own."""
    return torch.float32 if model_dtype in (torch.float16, torch.bfloat16) else model_dtype


def check_config(caller: str, what: str, config: dict, keys: tuple[str, ...], fmt: str, version: int) -> None:
    """A ``ValueError`` naming what is wrong when one of deltakern's own checkpoint configs lacks a
    key of ``keys`` or is of another format or version."""
    missing = [key for key in keys if key not in config]
    if missing:
        raise ValueError(f"{caller}: the {what} config lacks {', '.join(missing)}; got keys {sorted(config)}")
    if config["format"] != fmt or config["format_version"] != version:
        raise ValueError(f"{caller}: the {what} config must be of format {fmt!r} version {version}, "
                         f"got format {config['format']!r} version {config['format_version']!r}")


def load_checked(caller: str, what: str, expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Copy ``state[name]`` into each ``expected[name]`` after checking the keys and shapes: a key
    the model needs and the checkpoint lacks, a key the model has no place for, or a wrong shape is
    a ``ValueError`` naming it (``what`` names the checkpoint: "adapter", "BitFit"). Nothing is
    copied unless everything fits."""
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{caller}: the {what} checkpoint lacks {len(missing)} tensor(s) the model needs: "
                         f"{', '.join(missing)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{caller}: the {what} checkpoint has {len(unexpected)} tensor(s) the model has no place "
                         f"for: {', '.join(unexpected)}")
    for name, target in expected.items():
        if tuple(state[name].shape) != tuple(target.shape):
            raise ValueError(f"{caller}: {what} tensor {name!r} has shape {tuple(state[name].shape)} in the "
                             f"checkpoint, the model expects {tuple(target.shape)}")
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(state[name])


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def model_class(model: nn.Module) -> type:
    """The class of ``model`` as transformers made it: FSDP2's ``fully_shard`` swaps a module's class
    for a subclass ``FSDP<Name>`` of ``(FSDPModule, <Name>)``, which no auto-class table names."""
    cls = type(model)
    fsdp = sys.modules.get("torch.distributed.fsdp")  # imported by whoever called fully_shard
    fsdp_module = getattr(fsdp, "FSDPModule", None)
    if fsdp_module is not None and issubclass(cls, fsdp_module):
        own = [base for base in cls.__bases__ if base is not fsdp_module]
        if len(own) == 1:
            return own[0]
    return cls


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's task_type for a transformers model class (what PeftModelFor<task> wraps), from
    transformers' auto-class tables; None for a class no PEFT task covers (a masked LM, a non-HF model)."""
    try:
        from transformers.models.auto import modeling_auto as auto
    except ImportError:
        return None
    tables = (
        ("CAUSAL_LM", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
        ("SEQ_2_SEQ_LM", auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
        ("SEQ_CLS", auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
        ("TOKEN_CLS", auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
        ("QUESTION_ANS", auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES),
        ("FEATURE_EXTRACTION", auto.MODEL_MAPPING_NAMES),
    )
    name = model_class(model).__name__
    for task, table in tables:
        for classes in table.values():
            if name == classes or (isinstance(classes, (tuple, list)) and name in classes):
                return task
    return None


# Tasks whose head PEFT's prompt learning (prompt tuning, P-tuning, prefix tuning) trains and saves
# beside the prompt (its modules_to_save), and the top-level head names it looks for.
HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS")
HEADS = ("classifier", "score")


def task_head_checkpoint(model: nn.Module, task: str | None) -> tuple[list[str] | None, dict[str, torch.Tensor]]:
    """``(modules_to_save, state)`` of the task head as PEFT's prompt-learning checkpoints hold it:
    for sequence and token classification the head's tensors as ``base_model.<name>`` (PEFT insists
    on finding them), else ``(None, {})``."""
    if task not in HEAD_TASKS:
        return None, {}
    state = {f"base_model.{name}": parameter.detach().clone() for name, parameter in model.named_parameters()
             if name.split(".", 1)[0] in HEADS}
    return list(HEADS), state


def load_base_model_tensors(model: nn.Module, state: dict[str, torch.Tensor], caller: str) -> None:
    """Copy each ``base_model.<name>`` tensor of a PEFT checkpoint (a saved task head) into the
    model's parameter ``<name>``; one the model lacks, or of another shape, raises a ValueError
    before anything is copied (:func:`load_checked`)."""
    targets = {}
    for key in state:
        try:
            targets[key] = model.get_parameter(key.removeprefix("base_model."))
        except AttributeError:
            raise ValueError(f"{caller}: the checkpoint holds {key!r}, which {type(model).__name__} has no parameter for") from None
    load_checked(caller, "task head", targets, state)


def peft_config_fields(model: nn.Module, peft_type: str, task_type: str | None) -> dict:
    """The fields every PEFT ``adapter_config.json`` has, as PEFT writes them for ``model``:
    without a task type PEFT records the model class it wrapped in ``auto_mapping``."""
    auto_mapping = None
    if task_type is None:
        cls = model_class(model)
        auto_mapping = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    return {"peft_type": peft_type, "task_type": task_type, "auto_mapping": auto_mapping,
            "base_model_name_or_path": model.__dict__.get("name_or_path", None) or None, "revision": None,
            "inference_mode": True}


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


def trainable_parameters(model: nn.Module, adapter_name: str | None = None) -> TrainableParameters:
    """Count the trainable and all parameters of ``model``; ``str()`` of the result reads as a sentence.

    ``adapter_name``: count as trainable only the trainable parameters of that named LoRA adapter
    (``add_lora(..., adapter_name=...)``); ``total`` is still the whole model's. An unknown name is
    a ``ValueError`` listing the model's adapters."""
    selected = None
    if adapter_name is not None:
        from .multi_lora import adapter_parameters

        selected = {id(p) for p in adapter_parameters(model, adapter_name)}
    trainable = total = 0
    for parameter in model.parameters():  # named_parameters de-duplicates tied weights
        total += parameter.numel()
        if parameter.requires_grad and (selected is None or id(parameter) in selected):
            trainable += parameter.numel()
    return TrainableParameters(trainable, total)


def peft_model_drawn(base: nn.Module, config, name_part: str, mean: float, std: float) -> nn.Module:
    """PEFT's ``get_peft_model(base, config)`` with every parameter whose name contains
    ``name_part`` drawn from N(mean, std²), in place of PEFT's init (a zero LoRA B, all-ones (IA)³
    vectors) which would hide a path from the end-to-end benchmark's check."""
    import peft

    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name_part in name:
                parameter.normal_(mean, std)
    return model
