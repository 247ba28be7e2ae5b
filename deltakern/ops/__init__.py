"""Autograd ops with backend dispatch, one file per op."""

from .adapter import adapter
from .lora_linear import lora_linear
from .prefix_attention import prefix_attention

__all__ = ["adapter", "lora_linear", "prefix_attention"]
