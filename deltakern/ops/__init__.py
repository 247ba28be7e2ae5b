"""Autograd ops with backend dispatch, one file per op."""

from .lora_linear import lora_linear

__all__ = ["lora_linear"]
