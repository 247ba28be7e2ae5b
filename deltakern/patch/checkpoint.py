"""``save`` and ``load``: PEFT's adapter format for LoRA, (IA)³, prefix tuning, prompt tuning and
P-tuning, our own for adapters and BitFit.

A directory written by :func:`save` holds
  - ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's files, PEFT's key names) when
    the model has LoRA, (IA)³, a prefix or a prompt; PEFT's format holds one method per checkpoint;
  - ``deltakern_adapters.json`` + ``deltakern_adapters.safetensors`` when it has bottleneck adapters;
  - ``deltakern_bitfit.json`` + ``deltakern_bitfit.safetensors`` when it trains biases (BitFit).
"""

from __future__ import annotations

import json
import os

from torch import nn

from . import adapters as adapters_method
from . import bitfit as bitfit_method
from . import ia3 as ia3_method
from . import lora as lora_method
from . import prefix as prefix_method
from . import prompt as prompt_method

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
ADAPTERS_CONFIG = "deltakern_adapters.json"
ADAPTERS_WEIGHTS = "deltakern_adapters.safetensors"
BITFIT_CONFIG = "deltakern_bitfit.json"
BITFIT_WEIGHTS = "deltakern_bitfit.safetensors"

# PEFT types that deltakern.load reads, and how.
_PEFT_LOADERS = {"LORA": lora_method.load_peft_lora, "IA3": ia3_method.load_peft_ia3,
                 "PREFIX_TUNING": prefix_method.load_peft_prefix, "PROMPT_TUNING": prompt_method.load_peft_prompt,
                 "P_TUNING": prompt_method.load_peft_prompt}


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


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the delta of ``model`` (not the base weights) to directory ``path``.

    LoRA, (IA)³, prefix tuning, prompt tuning or P-tuning (the encoder's output, as PEFT saves it)
    go to PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``, so
    ``PeftModel.from_pretrained(base, path)`` loads them; adapters go to
    ``deltakern_adapters.json`` + ``deltakern_adapters.safetensors``.
    """
    has_lora, has_prefix = lora_method.has_lora(model), prefix_method.has_prefix(model)
    has_prompt, has_adapters = prompt_method.has_prompt(model), adapters_method.has_adapters(model)
    has_bitfit, has_ia3 = bitfit_method.has_bitfit(model), ia3_method.has_ia3(model)
    peft_methods = [name for name, present in (("LoRA", has_lora), ("(IA)³", has_ia3), ("a prefix", has_prefix),
                                               ("a prompt", has_prompt)) if present]
    if len(peft_methods) > 1:
        both = "both " if len(peft_methods) == 2 else ""
        raise NotImplementedError(f"deltakern.save: the model has {both}{' and '.join(peft_methods)}; PEFT's format "
                                  f"holds one method per checkpoint")
    if not (peft_methods or has_adapters or has_bitfit):
        raise ValueError("deltakern.save: the model has no deltakern LoRA, (IA)³, prefix, prompt, adapters or BitFit "
                         "biases to save")
    os.makedirs(path, exist_ok=True)
    if has_lora:
        _write(path, PEFT_CONFIG, PEFT_WEIGHTS, *lora_method.peft_lora_checkpoint(model))
    if has_ia3:
        _write(path, PEFT_CONFIG, PEFT_WEIGHTS, *ia3_method.peft_ia3_checkpoint(model))
    if has_prefix:
        _write(path, PEFT_CONFIG, PEFT_WEIGHTS, *prefix_method.peft_prefix_checkpoint(model))
    if has_prompt:
        _write(path, PEFT_CONFIG, PEFT_WEIGHTS, *prompt_method.peft_prompt_checkpoint(model))
    if has_adapters:
        _write(path, ADAPTERS_CONFIG, ADAPTERS_WEIGHTS, *adapters_method.adapters_checkpoint(model))
    if has_bitfit:
        _write(path, BITFIT_CONFIG, BITFIT_WEIGHTS, *bitfit_method.bitfit_checkpoint(model))


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Add the delta modules a checkpoint at ``path`` describes to the plain base ``model``, load
    their weights and return the model, ready to run (in eval mode, base frozen).

    Reads PEFT's LoRA, IA3, prefix-tuning, prompt-tuning and P-tuning checkpoints (written by PEFT or by
    :func:`save`) and deltakern's adapter and BitFit files. Another PEFT type raises
    ``ValueError`` naming it.
    """
    peft_config_path = os.path.join(path, PEFT_CONFIG)
    adapters_config_path = os.path.join(path, ADAPTERS_CONFIG)
    bitfit_config_path = os.path.join(path, BITFIT_CONFIG)
    if not any(os.path.isfile(p) for p in (peft_config_path, adapters_config_path, bitfit_config_path)):
        raise ValueError(f"deltakern.load: {os.fspath(path)!r} holds none of {PEFT_CONFIG}, {ADAPTERS_CONFIG}, "
                         f"{BITFIT_CONFIG}")
    peft_loader = None
    if os.path.isfile(peft_config_path):
        config, state = _read(path, PEFT_CONFIG, PEFT_WEIGHTS)
        peft_type = config.get("peft_type")
        if peft_type not in _PEFT_LOADERS:
            raise ValueError(
                f"deltakern.load: {os.fspath(path)!r} is a PEFT checkpoint of type {peft_type!r}; "
                f"deltakern.load reads {', '.join(_PEFT_LOADERS)}"
            )
        peft_loader = _PEFT_LOADERS[peft_type]
    # Adapters first: their wrappers are what LoRA names refer to when both are present (a LoRA
    # layer inside an adapter wrapper is saved as "<module>.base_layer"), whichever was added first.
    if os.path.isfile(adapters_config_path):
        model = adapters_method.load_adapters(model, *_read(path, ADAPTERS_CONFIG, ADAPTERS_WEIGHTS))
    if peft_loader is not None:
        model = peft_loader(model, config, state)
    # BitFit names its biases without the wrappers' ".base_layer", so it loads into any structure.
    if os.path.isfile(bitfit_config_path):
        model = bitfit_method.load_bitfit(model, *_read(path, BITFIT_CONFIG, BITFIT_WEIGHTS))
    return model.eval()
