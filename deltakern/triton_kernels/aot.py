"""Ahead-of-time compilation of the Triton kernels for sm_80 / sm_90, without a GPU.

``compile_kernel`` lowers one ``@triton.jit`` kernel to PTX for a target architecture with
``triton.compile`` and a ``GPUTarget``, runs Triton's bundled ``ptxas -v`` on the PTX and
returns a :class:`CompileRecord` (registers, spills, shared memory, tensor-core instructions).
Each op describes its kernels once in an :class:`OpSpec` (``OPS``); ``compile_jobs(op)`` lists
every (kernel, autotune config, variant, dtype, arch) of it and ``compile_job`` compiles one.
The variant is the size that changes a kernel's tiles: the LoRA rank, the adapter bottleneck, the
attention head dim; for ia3_linear, which has none, the side the scale is on (0 output, 1 input).

The kernels must have been imported with ``TRITON_INTERPRET`` unset: under the interpreter
``@triton.jit`` makes interpreter functions, which cannot be compiled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import sm_arch_from_capability
from triton.runtime.cache import get_cache_manager
from triton.runtime.jit import JITFunction

from deltakern.reference.adapter import ACTIVATIONS
from deltakern.triton_kernels import adapter as _adapter
from deltakern.triton_kernels import ia3_linear as _ia3
from deltakern.triton_kernels import lora_linear as _lora
from deltakern.triton_kernels import prefix_attention as _attn

ARCHS = (80, 90)
DTYPES = ("fp16", "bf16")
# LoRA ranks compiled: BLOCK_R 16 covers r <= 16, the usual case; 64 is the largest common rank
# and the register high-water mark the configs are chosen to fit without spills.
RANKS = (16, 64)
# Adapter bottlenecks compiled: 16 (BLOCK_R 16, r <= 16) and 64, the usual bottleneck of BERT-size
# adapters and the register high-water mark the configs are chosen to fit without spills.
BOTTLENECKS = (16, 64)
# Attention head dims compiled: 64; 96, which pads to BLOCK_D = 128 with masked columns; and 128,
# the register high-water mark.
HEAD_DIMS = (64, 96, 128)
# Largest dynamic shared memory per block: 163 KiB on A100 (sm_80), 227 KiB on H100 (sm_90).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclasses.dataclass(frozen=True)
class CompileRecord:
    """What one kernel compiles to on one target."""

    kernel: str
    arch: str
    dtype: str
    config: dict
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    has_mma: bool
    has_wgmma: bool
    uses_dot: bool


def _jit_function(kernel) -> JITFunction:
    fn = kernel
    while not isinstance(fn, JITFunction):
        if not hasattr(fn, "fn"):
            raise RuntimeError(
                f"{kernel!r} is not a Triton JIT function; import deltakern.triton_kernels with "
                "TRITON_INTERPRET unset to compile ahead of time")
        fn = fn.fn
    return fn


def ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` on ``ptx``.

    Kept in Triton's cache beside the compiled kernels, keyed by the PTX, the arch and the ptxas
    version: with a warm Triton cache, rerunning ptxas took half the time of the full GPU report
    (`deltakern bench --gpu-report`, 556 compiles: 105 s with the rerun, 56 s without, 2 cores).
    """
    ptxas = knobs.nvidia.ptxas
    key = hashlib.sha256(f"{ptxas.version}\n{arch}\n{ptx}".encode()).hexdigest()
    cache = get_cache_manager(key)
    cached = cache.get_file("ptxas_report.json")
    if cached is not None:
        return tuple(json.loads(Path(cached).read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        # Same register allocator option as Triton's own ptxas call, so the numbers match it.
        cmd = [ptxas.path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
               str(src), "-o", str(Path(tmp) / "kernel.cubin")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    report = registers, int(spills.group(1)), int(spills.group(2))
    cache.put(json.dumps(report), "ptxas_report.json")
    return report


def compile_kernel(kernel, signature: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int,
                   divisible_by_16=(), dtype: str = "") -> CompileRecord:
    """Compile ``kernel`` (a JIT function or an autotuner around one) for ``sm_<arch>``.

    signature: every runtime argument's Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``, ...);
    constexprs: the value of every ``tl.constexpr`` argument; divisible_by_16: argument names
    the runtime would specialise as multiples of 16 (aligned pointers, dimensions).
    """
    fn = _jit_function(kernel)
    full_signature = {name: "constexpr" if name in constexprs else signature[name] for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    source = triton.compiler.ASTSource(fn=fn, signature=full_signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    registers, spill_stores, spill_loads = ptxas_report(ptx, arch)
    return CompileRecord(
        kernel=compiled.metadata.name,
        arch=sm_arch_from_capability(arch),
        dtype=dtype,
        config={**constexprs, "num_warps": num_warps, "num_stages": num_stages},
        registers=registers,
        spill_stores=spill_stores,
        spill_loads=spill_loads,
        shared=compiled.metadata.shared,
        has_mma=re.search(r"\bmma\.sync\b", ptx) is not None,
        has_wgmma="wgmma.mma_async" in ptx,
        uses_dot="tl.dot(" in fn.src,
    )


# --------------------------------------------------------------------------------------------
# Ops: their kernels, argument types and variants
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """How to compile the kernels of one op.

    kernels: name -> (autotuner, constexpr flags). Flags are set to the heaviest variant (the
    one with the most live state), so its register and spill numbers bound the others.
    signatures: dtype -> kernel name -> runtime argument types.
    variant_constexprs: (kernel name, variant) -> the constexprs the variant sets.
    divisible: a kernel's signature -> the runtime arguments the JIT would specialise as
    multiples of 16.
    """

    kernels: dict
    signatures: Callable[[str], dict]
    variants: tuple
    variant_tag: str
    variant_constexprs: Callable[[str, int], dict]
    divisible: Callable[[dict], tuple]


def _lora_signatures(dtype: str) -> dict:
    """Runtime argument types of each lora kernel for ``dtype`` inputs."""
    t = f"*{dtype}"
    rng = {"seed": "i64", "p": "fp32", "keep_scale": "fp32"}
    dx = {"dy_ptr": t, "w_ptr": t, "dxa_ptr": t, "a_ptr": t, "dx_ptr": t,
          "M": "i32", "N": "i32", "K": "i32", "R": "i32", **rng}
    return {
        "shrink": {"x_ptr": t, "a_ptr": t, "xa_ptr": t, "M": "i32", "K": "i32", "R": "i32", **rng},
        "fwd": {"x_ptr": t, "w_ptr": t, "bias_ptr": t, "xa_ptr": t, "b_ptr": t, "out_ptr": t,
                "M": "i32", "N": "i32", "K": "i32", "R": "i32", "scaling": "fp32"},
        "dy": {"dy_ptr": t, "b_ptr": t, "xa_ptr": t, "dxa_ptr": t, "db_ptr": "*fp32",
               "M": "i32", "N": "i32", "R": "i32", "scaling": "fp32"},
        "da": {"dxa_ptr": t, "x_ptr": t, "da_ptr": "*fp32", "M": "i32", "K": "i32", "R": "i32", **rng},
        "dx": dx,
        "dx_dropout": dx,
    }


# Flags at the heavier variant (dropout on, bias present); dx has one autotuner per variant
# because dropout changes which tiles fit in registers.
LORA_KERNELS = {
    "shrink": (_lora.lora_shrink_kernel, {"HAS_DROPOUT": True}),
    "fwd": (_lora.lora_fwd_kernel, {"HAS_BIAS": True}),
    "dy": (_lora.lora_dy_kernel, {}),
    "da": (_lora.lora_da_kernel, {"HAS_DROPOUT": True}),
    "dx": (_lora.lora_dx_kernel, {"HAS_DROPOUT": False}),
    "dx_dropout": (_lora.lora_dx_dropout_kernel, {"HAS_DROPOUT": True}),
}


def _prefix_attention_signatures(dtype: str) -> dict:
    """Runtime argument types of each prefix_attention kernel for ``dtype`` inputs."""
    t = f"*{dtype}"
    inputs = {"q_ptr": t, "k_ptr": t, "v_ptr": t, "pk_ptr": t, "pv_ptr": t, "kpm_ptr": "*u8"}
    sizes = {"Hq": "i32", "Hkv": "i32", "Lq": "i32", "Lk": "i32", "P": "i32", "scale": "fp32",
             "LQ_BUCKET": "i32", "LK_BUCKET": "i32"}
    saved = {"do_ptr": t, "lse_ptr": "*fp32", "delta_ptr": "*fp32"}
    return {
        "fwd": {**inputs, "out_ptr": t, "lse_ptr": "*fp32", **sizes},
        "bwd_preprocess": {"out_ptr": t, "do_ptr": t, "delta_ptr": "*fp32", "rows": "i32"},
        # dprefix in fp32: the shared prefix's atomically summed buffers.
        "bwd_dkdv": {**inputs, **saved, "dk_ptr": t, "dv_ptr": t, "dpk_ptr": "*fp32", "dpv_ptr": "*fp32", **sizes},
        "bwd_dq": {**inputs, **saved, "dq_ptr": t, **sizes},
    }


# Flags at the heaviest variant: causal (two key ranges), a padding mask, a shared prefix (atomics).
_ATTN_FLAGS = {"CAUSAL": True, "HAS_MASK": True, "PREFIX_SHARED": True}
PREFIX_ATTENTION_KERNELS = {
    "fwd": (_attn.prefix_attn_fwd_kernel, _ATTN_FLAGS),
    "bwd_preprocess": (_attn.prefix_attn_bwd_preprocess_kernel, {}),
    "bwd_dkdv": (_attn.prefix_attn_bwd_dkdv_kernel, _ATTN_FLAGS),
    "bwd_dq": (_attn.prefix_attn_bwd_dq_kernel, _ATTN_FLAGS),
}


def _adapter_signatures(dtype: str) -> dict:
    """Runtime argument types of each adapter kernel for ``dtype`` inputs."""
    t = f"*{dtype}"
    sizes = {"M": "i32", "N": "i32", "R": "i32"}
    down = {"h_ptr": t, "wd_ptr": t, "bd_ptr": t, "pre_ptr": t, "act_ptr": t, **sizes}
    dz = {"dy_ptr": t, "wu_ptr": t, "pre_ptr": t, "dpre_ptr": t, "act_ptr": t, "dbd_ptr": "*fp32",
          **sizes, "scaling": "fp32"}
    return {
        "down_gelu": down,
        "down_gelu_tanh": down,
        "up": {"act_ptr": t, "wu_ptr": t, "bu_ptr": t, "res_ptr": t, "out_ptr": t, **sizes, "scaling": "fp32"},
        # The weight and bias gradients are fp32 buffers summed with atomics.
        "dz_gelu": dz,
        "dz_gelu_tanh": dz,
        "dh": {"dy_ptr": t, "wd_ptr": t, "dpre_ptr": t, "act_ptr": t, "dh_ptr": t,
               "dwu_ptr": "*fp32", "dbu_ptr": "*fp32", **sizes, "scaling": "fp32"},
        "dwd": {"dpre_ptr": t, "h_ptr": t, "dwd_ptr": "*fp32", **sizes},
    }


# Flags at the heaviest variant: biases present, the residual gradient added. The two kernels
# that evaluate the activation are compiled with both gelus, the activations with the most live
# state (erf's polynomial; tanh, a cubic and their products); relu, silu and tanh need less (all
# five were checked, see the NOTE in triton_kernels/adapter.py).
_GELU, _GELU_TANH = ACTIVATIONS.index("gelu"), ACTIVATIONS.index("gelu_tanh")
ADAPTER_KERNELS = {
    "down_gelu": (_adapter.adapter_down_kernel, {"HAS_BIAS": True, "ACTIVATION": _GELU}),
    "down_gelu_tanh": (_adapter.adapter_down_kernel, {"HAS_BIAS": True, "ACTIVATION": _GELU_TANH}),
    "up": (_adapter.adapter_up_kernel, {"HAS_BIAS": True}),
    "dz_gelu": (_adapter.adapter_dz_kernel, {"ACTIVATION": _GELU}),
    "dz_gelu_tanh": (_adapter.adapter_dz_kernel, {"ACTIVATION": _GELU_TANH}),
    "dh": (_adapter.adapter_dh_kernel, {"RESIDUAL_IS_H": True}),
    "dwd": (_adapter.adapter_dwd_kernel, {}),
}


def _ia3_signatures(dtype: str) -> dict:
    """Runtime argument types of each ia3_linear kernel for ``dtype`` inputs."""
    t = f"*{dtype}"
    sizes = {"M": "i32", "N": "i32", "K": "i32"}
    return {
        "fwd": {"x_ptr": t, "w_ptr": t, "bias_ptr": t, "scale_ptr": t, "out_ptr": t, "z_ptr": t, **sizes},
        # ds is an fp32 buffer of per-row-tile partial sums.
        "bwd": {"dy_ptr": t, "w_ptr": t, "unscaled_ptr": t, "scale_ptr": t, "dx_ptr": t, "ds_ptr": "*fp32", **sizes},
    }


# Flags at the heavier variant (bias present); the scale's side is the variant.
IA3_KERNELS = {
    "fwd": (_ia3.ia3_fwd_kernel, {"HAS_BIAS": True}),
    "bwd": (_ia3.ia3_bwd_kernel, {}),
}


OPS = {
    "lora_linear": OpSpec(
        kernels=LORA_KERNELS,
        signatures=_lora_signatures,
        variants=RANKS,
        variant_tag="r",
        variant_constexprs=lambda kernel, rank: {"BLOCK_R": _lora.block_r(rank), "DOT_PRECISION": "tf32"},
        # Pointers from the caching allocator are 16-byte aligned, and the row lengths (K, N) of
        # real layers are multiples of 16: the specialisation the JIT makes at run time.
        divisible=lambda signature: tuple(name for name in signature if name.endswith("_ptr") or name in ("N", "K")),
    ),
    "adapter": OpSpec(
        kernels=ADAPTER_KERNELS,
        signatures=_adapter_signatures,
        variants=BOTTLENECKS,
        variant_tag="r",
        # The up kernel walks the bottleneck UP_BLOCK_R ranks at a time; the others hold all of it.
        variant_constexprs=lambda kernel, r: {
            "BLOCK_R": _adapter.UP_BLOCK_R if kernel == "up" else _lora.block_r(r), "DOT_PRECISION": "tf32"},
        # Aligned pointers and a hidden size d that is a multiple of 16, as for lora_linear; the
        # bottleneck r is left unspecialised (8, 48 and 100 are all used).
        divisible=lambda signature: tuple(name for name in signature if name.endswith("_ptr") or name == "N"),
    ),
    "prefix_attention": OpSpec(
        kernels=PREFIX_ATTENTION_KERNELS,
        signatures=_prefix_attention_signatures,
        variants=HEAD_DIMS,
        variant_tag="d",
        variant_constexprs=lambda kernel, d: {
            "HEAD_DIM": d, "BLOCK_D": _attn.block_d(d),
            **({} if kernel == "bwd_preprocess" else {"DOT_PRECISION": "tf32"})},
        # Sequence lengths and head counts are arbitrary: only the (16-byte aligned) pointers.
        divisible=lambda signature: tuple(name for name in signature if name.endswith("_ptr")),
    ),
    "ia3_linear": OpSpec(
        kernels=IA3_KERNELS,
        signatures=_ia3_signatures,
        # Each kernel is compiled with the scale on the output (0) and on the input (1) side.
        variants=(0, 1),
        variant_tag="scale_input",
        variant_constexprs=lambda kernel, side: {"SCALE_INPUT": bool(side), "DOT_PRECISION": "tf32"},
        # Aligned pointers and the layer's feature sizes N, K multiples of 16, as for lora_linear.
        divisible=lambda signature: tuple(name for name in signature if name.endswith("_ptr") or name in ("N", "K")),
    ),
}


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompileJob:
    """One (op kernel, autotune config, dtype, arch, variant) to compile."""

    op: str
    kernel: str
    config_index: int
    dtype: str
    arch: int
    variant: int

    @property
    def config(self) -> triton.Config:
        return OPS[self.op].kernels[self.kernel][0].configs[self.config_index]

    @property
    def id(self) -> str:
        c = self.config
        tile = "x".join(str(v) for k, v in c.kwargs.items() if k.startswith("BLOCK_"))
        if "M_TILES" in c.kwargs:
            tile += f"t{c.kwargs['M_TILES']}"
        variant = f"{OPS[self.op].variant_tag}{self.variant}"
        return f"{self.kernel}-{tile}-w{c.num_warps}s{c.num_stages}-{variant}-{self.dtype}-sm{self.arch}"


def compile_jobs(op: str, dtypes=DTYPES, archs=ARCHS, variants=None) -> list[CompileJob]:
    """Every kernel x autotune config x variant x dtype x arch of ``op`` (nothing is compiled here)."""
    spec = OPS[op]
    return [
        CompileJob(op, name, i, dtype, arch, variant)
        for name, (kernel, _) in spec.kernels.items()
        for i in range(len(kernel.configs))
        for variant in (spec.variants if variants is None else variants)
        for dtype in dtypes
        for arch in archs
    ]


def compile_job(job: CompileJob) -> CompileRecord:
    """Compile one job."""
    spec = OPS[job.op]
    kernel, flags = spec.kernels[job.kernel]
    signature = spec.signatures(job.dtype)[job.kernel]
    constexprs = {**flags, **job.config.kwargs, **spec.variant_constexprs(job.kernel, job.variant)}
    return compile_kernel(kernel, signature, constexprs, job.arch, job.config.num_warps, job.config.num_stages,
                          divisible_by_16=spec.divisible(signature), dtype=job.dtype)
