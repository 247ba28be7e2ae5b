"""Delta-tuning modules built on deltakern's ops."""

from .adapter import Adapter
from .ia3 import IA3Linear
from .ladder_side import LadderSideNetwork
from .lora import LoRALinear
from .multi_lora import MultiLoRALinear
from .nf4_linear import NF4Linear
from .prefix import PrefixEncoder
from .prompt import PromptEncoder

__all__ = ["Adapter", "IA3Linear", "LadderSideNetwork", "LoRALinear", "MultiLoRALinear", "NF4Linear", "PrefixEncoder", "PromptEncoder"]
