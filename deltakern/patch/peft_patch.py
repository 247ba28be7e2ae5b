"""``patch`` and ``unpatch``: route a PEFT model's LoRA layers through ``lora_linear``. (Being written.)"""

from __future__ import annotations

from torch import nn


class PatchReport:
    pass


def patch(peft_model: nn.Module) -> PatchReport:
    raise NotImplementedError


def unpatch(model: nn.Module) -> nn.Module:
    raise NotImplementedError
