"""``add_lora`` and ``merge_lora``: LoRA on a plain Hugging Face model, through ``LoRALinear``.
(Being written: see the helper's task.)"""

from __future__ import annotations

from torch import nn


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
             target_modules: str | list[str] = "all-linear", use_rslora: bool = False) -> nn.Module:
    raise NotImplementedError


def merge_lora(model: nn.Module) -> nn.Module:
    raise NotImplementedError


def has_lora(model: nn.Module) -> bool:
    raise NotImplementedError


def peft_lora_checkpoint(model: nn.Module) -> tuple[dict, dict]:
    raise NotImplementedError


def load_peft_lora(model: nn.Module, config: dict, state: dict) -> nn.Module:
    raise NotImplementedError
