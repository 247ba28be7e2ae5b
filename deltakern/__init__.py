"""deltakern: fused kernels for parameter-efficient fine-tuning (LoRA, prefix tuning, adapters)."""

from . import autoprompt, intrinsic_prompt, ipet, lmbff, nf4, nn, pet, ppt, prompts
from .verbalizers import KnowledgeableVerbalizer, PrototypicalVerbalizer, instance_loss, prototype_loss
from .backend import BACKENDS, BackendUnavailableError, use_backend
from .ops import (
    LoraSegments,
    adapter,
    dora_linear,
    ia3_linear,
    lora_linear,
    lora_segments,
    prefix_attention,
    qlora_linear,
    segmented_lora_linear,
)
from .patch import (
    PatchReport,
    TrainableParameters,
    adapter_parameters,
    add_adapters,
    add_bitfit,
    add_ia3,
    add_ladder_side,
    add_lora,
    add_prefix,
    add_prompt,
    fold_prompt_encoder,
    load,
    load_prompt,
    merge_lora,
    patch,
    quantize,
    save,
    save_prompt,
    set_adapter,
    trainable_parameters,
    unpatch,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendUnavailableError", "PatchReport", "TrainableParameters", "adapter", "add_adapters",
    "add_bitfit", "add_ia3", "add_ladder_side", "dora_linear", "ia3_linear", "prompts",
    "add_lora", "add_prefix", "add_prompt", "fold_prompt_encoder", "load", "lora_linear", "merge_lora", "nn",
    "nf4", "patch", "prefix_attention", "qlora_linear", "quantize", "save",
    "trainable_parameters", "unpatch", "use_backend", "__version__",
    "LoraSegments", "lora_segments", "segmented_lora_linear",
    "adapter_parameters", "set_adapter",
    "KnowledgeableVerbalizer", "PrototypicalVerbalizer", "instance_loss", "prototype_loss",
    "autoprompt", "intrinsic_prompt", "ipet", "lmbff", "pet", "ppt", "load_prompt", "save_prompt",
]
