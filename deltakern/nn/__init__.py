"""Delta-tuning modules built on deltakern's ops."""

from .adapter import Adapter
from .lora import LoRALinear
from .prefix import PrefixEncoder
from .prompt import PromptEncoder

__all__ = ["Adapter", "LoRALinear", "PrefixEncoder", "PromptEncoder"]
