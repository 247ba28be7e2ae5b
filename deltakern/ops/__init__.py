"""Autograd ops with backend dispatch, one file per op."""

from .adapter import adapter
from .ia3_linear import ia3_linear
from .lora_linear import lora_linear
from .prefix_attention import prefix_attention

__all__ = ["adapter", "ia3_linear", "lora_linear", "prefix_attention"]
