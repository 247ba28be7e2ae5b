"""``add_adapters``: bottleneck adapters in Houlsby, Pfeiffer or parallel placement. (Being written.)"""

from __future__ import annotations

from torch import nn


def add_adapters(model: nn.Module, bottleneck: int = 64, placement: str = "houlsby", activation: str = "relu",
                 scaling: float = 1.0) -> nn.Module:
    raise NotImplementedError


def has_adapters(model: nn.Module) -> bool:
    raise NotImplementedError


def adapters_checkpoint(model: nn.Module) -> tuple[dict, dict]:
    raise NotImplementedError


def load_adapters(model: nn.Module, config: dict, state: dict) -> nn.Module:
    raise NotImplementedError
