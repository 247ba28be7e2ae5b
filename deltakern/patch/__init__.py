"""Model surgery: put deltakern's delta modules into Hugging Face and PEFT models."""

from .adapters import add_adapters
from .checkpoint import load, save
from .common import TrainableParameters, trainable_parameters
from .lora import add_lora, merge_lora
from .peft_patch import PatchReport, patch, unpatch
from .prefix import add_prefix

__all__ = ["PatchReport", "TrainableParameters", "add_adapters", "add_lora", "add_prefix", "load", "merge_lora",
           "patch", "save", "trainable_parameters", "unpatch"]
