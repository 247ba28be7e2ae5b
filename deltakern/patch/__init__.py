"""Model surgery: put deltakern's delta modules into Hugging Face and PEFT models.

Each method's module registers its ``MethodSpec`` on import; they are imported in the order
``deltakern bench``'s end-to-end step runs them.
"""

from .lora import add_lora, merge_lora, quantize  # noqa: I001
from .prefix import add_prefix
from .adapters import add_adapters
from .prompt import add_prompt, fold_prompt_encoder, load_prompt, save_prompt
from .bitfit import add_bitfit
from .ia3 import add_ia3
from .ladder_side import add_ladder_side
from .checkpoint import load, save
from .common import TrainableParameters, trainable_parameters
from .multi_lora import adapter_parameters, set_adapter
from .peft_patch import PatchReport, patch, unpatch

__all__ = ["PatchReport", "TrainableParameters", "adapter_parameters", "add_adapters", "add_bitfit", "add_ia3", "add_ladder_side", "add_lora", "add_prefix",
           "add_prompt", "fold_prompt_encoder", "load", "load_prompt", "merge_lora",
           "patch", "quantize", "save", "save_prompt", "set_adapter", "trainable_parameters", "unpatch"]
