"""Autograd ops with backend dispatch, one file per op.

Imported in the order ``deltakern bench`` runs them (each op registers its ``OpSpec`` on import).
"""

from .lora_linear import lora_linear
from .prefix_attention import prefix_attention
from .adapter import adapter  # noqa: I001
from .ia3_linear import ia3_linear
from .qlora_linear import qlora_linear
from .dora_linear import dora_linear
from .segmented_lora_linear import LoraSegments, lora_segments, segmented_lora_linear

__all__ = ["adapter", "dora_linear", "ia3_linear", "lora_linear", "prefix_attention", "qlora_linear",
           "LoraSegments", "lora_segments", "segmented_lora_linear"]
