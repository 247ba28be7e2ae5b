"""Delta-tuning modules built on deltakern's ops."""

from .lora import LoRALinear

__all__ = ["LoRALinear"]
