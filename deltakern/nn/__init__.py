"""Delta-tuning modules built on deltakern's ops."""

from .lora import LoRALinear
from .prefix import PrefixEncoder

__all__ = ["LoRALinear", "PrefixEncoder"]
