"""deltakern: fused kernels for parameter-efficient fine-tuning (LoRA, prefix tuning, adapters)."""

from . import nn
from .backend import BACKENDS, BackendUnavailableError, use_backend
from .ops import adapter, lora_linear, prefix_attention

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendUnavailableError", "adapter", "lora_linear", "nn", "prefix_attention", "use_backend", "__version__"]
