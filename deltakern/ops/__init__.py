"""Autograd ops with backend dispatch, one file per op."""

from .lora_linear import lora_linear
from .prefix_attention import prefix_attention

__all__ = ["lora_linear", "prefix_attention"]
