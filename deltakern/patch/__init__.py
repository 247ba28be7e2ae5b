"""Model surgery: put deltakern's delta modules into Hugging Face and PEFT models."""

from .adapters import add_adapters
from .bitfit import add_bitfit
from .checkpoint import load, save
from .common import TrainableParameters, trainable_parameters
from .ia3 import add_ia3
from .lora import add_lora, merge_lora
from .peft_patch import PatchReport, patch, unpatch
from .prefix import add_prefix
from .prompt import add_prompt, fold_prompt_encoder

__all__ = ["PatchReport", "TrainableParameters", "add_adapters", "add_bitfit", "add_ia3", "add_lora", "add_prefix",
           "add_prompt", "fold_prompt_encoder", "load", "merge_lora",
           "patch", "save", "trainable_parameters", "unpatch"]
