"""``add_prefix``: prefix tuning through transformers' AttentionInterface. (Being written.)"""

from __future__ import annotations

from torch import nn


def add_prefix(model: nn.Module, num_virtual_tokens: int, projection_hidden: int | None = None) -> nn.Module:
    raise NotImplementedError


def has_prefix(model: nn.Module) -> bool:
    raise NotImplementedError


def peft_prefix_checkpoint(model: nn.Module) -> tuple[dict, dict]:
    raise NotImplementedError


def load_peft_prefix(model: nn.Module, config: dict, state: dict) -> nn.Module:
    raise NotImplementedError
