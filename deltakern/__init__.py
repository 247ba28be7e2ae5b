"""deltakern: fused kernels for parameter-efficient fine-tuning (LoRA, prefix tuning, adapters)."""

from . import nn
from .backend import BACKENDS, BackendUnavailableError, use_backend
from .ops import lora_linear

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendUnavailableError", "lora_linear", "nn", "use_backend", "__version__"]
