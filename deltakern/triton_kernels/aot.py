"""Ahead-of-time compilation of the Triton kernels for sm_80 / sm_90, without a GPU.

``compile_kernel`` lowers one ``@triton.jit`` kernel to PTX for a target architecture with
``triton.compile`` and a ``GPUTarget``, runs Triton's bundled ``ptxas -v`` on the PTX and
returns a :class:`CompileRecord` (registers, spills, shared memory, tensor-core instructions).
Each op declares its kernels once, beside them, as the ``AOT`` attribute of its module
``triton_kernels/<op>.py`` (a :class:`~deltakern.triton_kernels.common.AotSpec`), found through
``deltakern.registry``; ``compile_jobs(op)`` lists every (kernel, autotune config, variant, dtype,
arch) of it and ``compile_job`` compiles one. The variant is what changes a kernel's tiles (a
rank, a head dim), or a mode of an op that has no such size.

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

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import sm_arch_from_capability
from triton.runtime.cache import get_cache_manager
from triton.runtime.jit import JITFunction

from deltakern import registry
from deltakern.triton_kernels.common import AotSpec

ARCHS = (80, 90)
DTYPES = ("fp16", "bf16")
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
# Jobs
# --------------------------------------------------------------------------------------------


def aot_spec(op: str) -> AotSpec:
    """The ``AOT`` declaration of ``op``, beside its kernels in ``triton_kernels/<op>.py``."""
    return registry.ops()[op].triton_module().AOT


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
        return aot_spec(self.op).kernels[self.kernel][0].configs[self.config_index]

    @property
    def id(self) -> str:
        c = self.config
        tile = "x".join(str(v) for k, v in c.kwargs.items() if k.startswith("BLOCK_"))
        if "M_TILES" in c.kwargs:
            tile += f"t{c.kwargs['M_TILES']}"
        variant = f"{aot_spec(self.op).variant_tag}{self.variant}"
        return f"{self.kernel}-{tile}-w{c.num_warps}s{c.num_stages}-{variant}-{self.dtype}-sm{self.arch}"


def compile_jobs(op: str, dtypes=DTYPES, archs=ARCHS, variants=None) -> list[CompileJob]:
    """Every kernel x autotune config x variant x dtype x arch of ``op`` (nothing is compiled here)."""
    spec = aot_spec(op)
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
    spec = aot_spec(job.op)
    kernel, flags = spec.kernels[job.kernel]
    signature = spec.signatures(job.dtype)[job.kernel]
    constexprs = {**flags, **job.config.kwargs, **spec.variant_constexprs(job.kernel, job.variant)}
    return compile_kernel(kernel, signature, constexprs, job.arch, job.config.num_warps, job.config.num_stages,
                          divisible_by_16=spec.divisible(signature), dtype=job.dtype)
