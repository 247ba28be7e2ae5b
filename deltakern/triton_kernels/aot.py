"""Ahead-of-time compilation of the Triton kernels for sm_80 / sm_90, without a GPU.

``compile_kernel`` lowers one ``@triton.jit`` kernel to PTX for a target architecture with
``triton.compile`` and a ``GPUTarget``, runs Triton's bundled ``ptxas -v`` on the PTX and
returns a :class:`CompileRecord` (registers, spills, shared memory, tensor-core instructions).
Each op declares its kernels once, beside them, as the ``AOT`` attribute of its module
``triton_kernels/<op>.py`` (a :class:`~deltakern.triton_kernels.common.AotSpec`), found through
``deltakern.registry``; ``compile_jobs(op)`` derives from it the jobs that cover every
specialisation its launchers can choose, and ``compile_job`` compiles one. The variant is what
changes a kernel's tiles (a rank, a head dim), or a mode of an op that has no such size.

What a launcher can choose, for one kernel and one arch, has five axes: the constexpr flags
(each a declared domain: causal or not, a bias or none, an activation, ...), the variant, the
dtype (fp16, bf16, and fp32 with tl.dot in IEEE fp32 or in TF32), the layout (sizes and pointers
that are multiples of 16, as the JIT specialises them, or not: odd sizes, offset views) and the
autotune config. The jobs are

- the product of flags x variants x dtypes: every constexpr combination an input reaches;
- each of those at one (config, layout), chosen so that every config and both layouts meet
  every value of every other axis at least once (a pairwise covering of the five axes);
- the sweep: every config at every common variant in fp16 and bf16, aligned, flags at their
  heaviest values (the rows the report had before the product);

each for sm_80 and sm_90. The full five-way product would be about 20,000 compiles (two and a
half hours on the two cores of CI, cold); this is 3808 (``tests/triton_kernels/test_compile.py``
checks the product and the pairs).

Each record is kept in Triton's cache keyed by the kernel's source (with what it calls), the
compile arguments, Triton's version and this file: a warm run reads every record without
compiling; a changed kernel recompiles only its own jobs.

The kernels must have been imported with ``TRITON_INTERPRET`` unset: under the interpreter
``@triton.jit`` makes interpreter functions, which cannot be compiled.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import inspect
import itertools
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
# dtype -> (the tensors' element type, tl.dot's input precision). fp32 inputs run tl.dot in IEEE
# fp32 under PyTorch's default and in TF32 where the user allows it (common.dot_precision);
# 16-bit inputs ignore the precision.
PRECISIONS = {"fp16": ("fp16", "tf32"), "bf16": ("bf16", "tf32"), "fp32": ("fp32", "ieee"), "tf32": ("fp32", "tf32")}
DTYPES = tuple(PRECISIONS)
SWEEP_DTYPES = ("fp16", "bf16")
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


_THIS_FILE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def compile_kernel(kernel, signature: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int,
                   divisible_by_16=(), dtype: str = "") -> CompileRecord:
    """Compile ``kernel`` (a JIT function or an autotuner around one) for ``sm_<arch>``.

    signature: every runtime argument's Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``, ...);
    constexprs: the value of every ``tl.constexpr`` argument; divisible_by_16: argument names
    the runtime would specialise as multiples of 16 (aligned pointers, dimensions).
    The record is read from Triton's cache when this exact compile was recorded before.
    """
    fn = _jit_function(kernel)
    full_signature = {name: "constexpr" if name in constexprs else signature[name] for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    key = hashlib.sha256(json.dumps(
        [triton.__version__, knobs.nvidia.ptxas.version, _THIS_FILE_HASH, fn.cache_key, full_signature,
         sorted((k, repr(v)) for k, v in constexprs.items()), sorted(divisible_by_16), arch, num_warps, num_stages,
         dtype]).encode()).hexdigest()
    cache = get_cache_manager(key)
    cached = cache.get_file("compile_record.json")
    if cached is not None:
        return CompileRecord(**json.loads(Path(cached).read_text()))
    record = _compile(fn, full_signature, constexprs, attrs, arch, num_warps, num_stages, dtype)
    cache.put(json.dumps(dataclasses.asdict(record)), "compile_record.json")
    return record


def _compile(fn: JITFunction, full_signature: dict, constexprs: dict, attrs: dict, arch: int, num_warps: int,
             num_stages: int, dtype: str) -> CompileRecord:
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
    """One (op kernel, autotune config, flags, variant, dtype, layout, arch) to compile.

    flags: the kernel's constexpr flags, as (name, value) pairs in declaration order.
    aligned: whether sizes and pointers are multiples of 16 (the JIT's ``tt.divisibility``).
    """

    op: str
    kernel: str
    config_index: int
    dtype: str
    arch: int
    variant: int
    flags: tuple = ()
    aligned: bool = True

    @property
    def config(self) -> triton.Config:
        return aot_spec(self.op).kernels[self.kernel][0].configs[self.config_index]

    @property
    def flag_tag(self) -> str:
        """The flags whose domain has more than one value (the others name the kernel), ``CAUSAL=1,...``."""
        domains = aot_spec(self.op).kernels[self.kernel][1]
        return ",".join(f"{name}={int(value) if isinstance(value, bool) else value}"
                        for name, value in self.flags if len(domains[name]) > 1)

    @property
    def id(self) -> str:
        c = self.config
        tile = "x".join(str(v) for k, v in c.kwargs.items() if k.startswith("BLOCK_"))
        if "M_TILES" in c.kwargs:
            tile += f"t{c.kwargs['M_TILES']}"
        parts = [self.kernel, tile, f"w{c.num_warps}s{c.num_stages}", f"{aot_spec(self.op).variant_tag}{self.variant}"]
        if self.flag_tag:
            parts.append(self.flag_tag)
        parts.append(self.dtype if self.aligned else f"{self.dtype}-unaligned")
        return "-".join([*parts, f"sm{self.arch}"])


def _flag_combinations(domains: dict) -> list[tuple]:
    """Every combination of the flag domains, as (name, value) tuples; the heaviest first."""
    names = list(domains)
    return [tuple(zip(names, values)) for values in itertools.product(*(domains[n] for n in names))]


def _pairs(point: dict, option: dict) -> set:
    """The (free-axis value, other-axis value) pairs one row covers."""
    free = list(option.items())
    return {(f, x) for f in free for x in point.items()} | {(a, b) for i, a in enumerate(free) for b in free[i + 1:]}


def _covering(points: list[dict], options: list[dict]) -> list[tuple[dict, dict]]:
    """Rows (point, option) giving each point (one value per semantic axis) an option (one value per
    free axis: the config and the layout) such that every free-axis value meets every value of
    every other axis in some row.

    Greedy: each point takes the option that covers the most pairs not yet covered (on ties the
    least used, then the first); a pair still uncovered after that gets a row of its own, at the
    first point and option that cover it.
    """
    wanted = set().union(*(_pairs(p, o) for p in points for o in options))
    used = collections.Counter()
    rows = []
    for point in points:
        best = max(options, key=lambda o: (len(_pairs(point, o) & wanted), -used[repr(o)]))
        used[repr(best)] += 1
        wanted -= _pairs(point, best)
        rows.append((point, best))
    while wanted:
        pair = min(wanted, key=repr)
        point, option = next((p, o) for p in points for o in options if pair in _pairs(p, o))
        wanted -= _pairs(point, option)
        rows.append((point, option))
    return rows


def launch_constexprs(spec: AotSpec, kernel: str, flags: dict, variant, dtype: str, aligned: bool) -> dict:
    """What a launch of ``kernel`` with these flags, variant, dtype and layout passes as constexprs
    (the autotune config's aside)."""
    autotuner, _ = spec.kernels[kernel]
    constexprs = {**flags, **spec.variant_constexprs(kernel, variant),
                  **spec.layout_constexprs(kernel, PRECISIONS[dtype][0], aligned)}
    if "DOT_PRECISION" in inspect.signature(autotuner.base_fn).parameters:
        constexprs["DOT_PRECISION"] = PRECISIONS[dtype][1]
    return constexprs


def compile_jobs(op: str, dtypes=DTYPES, archs=ARCHS) -> list[CompileJob]:
    """The jobs of ``op`` in ``dtypes`` for ``archs`` (nothing is compiled here): the product of
    every kernel's flags x variants x dtypes, each at a (config, layout) of the pairwise covering,
    then the config sweep (see the module docstring), without repeats.

    The covering is chosen over every dtype and arch, so a run of fewer dtypes compiles exactly
    the full run's rows of those dtypes.
    """
    spec = aot_spec(op)
    jobs = {}
    for kernel, (autotuner, domains) in spec.kernels.items():
        points = [{**dict(flags), "variant": variant, "dtype": dtype}
                  for flags in _flag_combinations(domains) for variant in spec.variants for dtype in DTYPES]
        options = [{"config": i, "aligned": aligned} for i in range(len(autotuner.configs)) for aligned in (True, False)]
        rows = [(tuple((name, point[name]) for name in domains), point["variant"], point["dtype"],
                 option["config"], option["aligned"]) for point, option in _covering(points, options)]
        heaviest = tuple((name, values[0]) for name, values in domains.items())
        rows += [(heaviest, variant, dtype, i, True) for i in range(len(autotuner.configs))
                 for variant in spec.sweep_variants for dtype in SWEEP_DTYPES]
        for flags, variant, dtype, config_index, aligned in rows:
            for arch in archs:
                if dtype in dtypes:
                    job = CompileJob(op, kernel, config_index, dtype, arch, variant, flags, aligned)
                    jobs.setdefault(job.id, job)
    return list(jobs.values())


def compile_job(job: CompileJob) -> CompileRecord:
    """Compile one job."""
    spec = aot_spec(job.op)
    kernel, _ = spec.kernels[job.kernel]
    flags = dict(job.flags)
    signature = spec.signatures(PRECISIONS[job.dtype][0], flags)[job.kernel]
    constexprs = {**launch_constexprs(spec, job.kernel, flags, job.variant, job.dtype, job.aligned), **job.config.kwargs}
    divisible = spec.divisible(signature) if job.aligned else ()
    return compile_kernel(kernel, signature, constexprs, job.arch, job.config.num_warps, job.config.num_stages,
                          divisible_by_16=divisible, dtype=job.dtype)
