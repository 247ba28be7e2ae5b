"""Ahead-of-time compilation of every specialisation of every Triton kernel, for sm_80 and sm_90.

No GPU is needed: ``triton_kernels.aot`` derives the jobs from each op's ``AOT`` declaration
(every flag combination x variant x dtype, the autotune configs and the aligned / unaligned
layouts covered pairwise, and the config sweep; see its docstring), compiles each with
``triton.compile`` for a ``GPUTarget`` and checks its PTX with Triton's bundled ``ptxas``. The
compiles are those of ``deltakern bench --gpu-report`` (``gpu_report.triton_rows``), judged by the
same ``row_problems``: 0 spills, shared memory within the target's limit, tensor-core
instructions in every ``tl.dot`` kernel except in IEEE fp32. Each op is compiled when its first
test runs (so ``-k adapter`` compiles only the adapter kernels), in subprocesses without
``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` makes functions that cannot be
compiled). Records are kept in Triton's cache (``~/.triton/cache`` or ``TRITON_CACHE_DIR``),
which outlives a checkout: a warm run reads them without compiling.
"""

from __future__ import annotations

import inspect
import itertools

import pytest

from deltakern.gpu_report import fixed_problems, job_key, known_problems, new_problems, row_key, triton_rows
from deltakern.registry import ops
from deltakern.triton_kernels.aot import ARCHS, DTYPES, SWEEP_DTYPES, aot_spec, compile_jobs

TRITON_OPS = [op for op, spec in ops().items() if "triton" in spec.backends]
KERNELS = [(op, kernel, arch) for op in TRITON_OPS for kernel in aot_spec(op).kernels for arch in ARCHS]


@pytest.fixture(scope="module")
def rows():
    """op -> its report rows (both archs), each op compiled once, on first use."""
    compiled = {}

    def get(op: str) -> list:
        if op not in compiled:
            compiled[op] = triton_rows(ops=(op,))
        return compiled[op]

    return get


def test_every_kernel_is_compiled():
    assert {job.kernel for job in compile_jobs("lora_linear")} == {"shrink", "fwd", "dy", "da", "dx", "dx_dropout"}
    assert {job.variant for job in compile_jobs("lora_linear")} == {16, 32, 64, 128}
    assert {job.kernel for job in compile_jobs("prefix_attention")} == {"fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"}
    assert {job.variant for job in compile_jobs("prefix_attention")} == {64, 80, 96, 128}
    assert {job.kernel for job in compile_jobs("adapter")} == {"down", "up", "dz", "dh", "dwd"}
    assert {job.variant for job in compile_jobs("adapter")} == {16, 32, 64, 128}
    # One GEMM each way; the scale's side (0 output, 1 input) is the variant.
    assert {job.kernel for job in compile_jobs("ia3_linear")} == {"fwd", "bwd"}
    assert {job.variant for job in compile_jobs("ia3_linear")} == {0, 1}
    # The two GEMMs that read the NF4 weight, each for even K (row runs of bytes) and odd K.
    assert {job.kernel for job in compile_jobs("qlora_linear")} == {
        "fwd", "fwd_odd_k", "dx", "dx_odd_k", "dx_dropout", "dx_dropout_odd_k"}
    assert {(job.dtype, job.aligned) for job in compile_jobs("segmented_lora_linear")} == {
        (dtype, aligned) for dtype in DTYPES for aligned in (True, False)}


@pytest.mark.parametrize("op", TRITON_OPS)
def test_every_constexpr_is_declared(op):
    """Each constexpr parameter of each kernel is set by exactly one declaration (a flag domain,
    the autotune config, the variant, the layout, or the dot precision): a new flag cannot be
    left out of the compiles."""
    spec = aot_spec(op)
    for name, (autotuner, domains) in spec.kernels.items():
        # The Python function under the JIT (or interpreter) wrapper: its annotations name the constexprs.
        parameters = inspect.signature(autotuner.base_fn).parameters.items()
        constexprs = {n for n, p in parameters if "constexpr" in str(p.annotation)}
        # A runtime argument may be declared as a flag only at 1, the value the JIT turns into a
        # constant (DoRA's unit weight stride).
        specialised = {flag: values for flag, values in domains.items() if flag not in constexprs}
        assert all(values == (1,) for values in specialised.values()), (name, specialised)
        declared = [set(domains) - set(specialised), *({*c.kwargs} for c in autotuner.configs[:1]),
                    set(spec.variant_constexprs(name, spec.variants[0])),
                    set(spec.layout_constexprs(name, "fp16", True)), {"DOT_PRECISION"} & constexprs]
        assert set.union(*declared) == constexprs, (name, constexprs ^ set.union(*declared))
        assert sum(len(d) for d in declared) == len(constexprs), (name, declared)
        assert all(len(values) == len(set(values)) >= 1 for values in domains.values()), (name, domains)


@pytest.mark.parametrize("op", TRITON_OPS)
def test_every_combination_and_pair_is_covered(op):
    """Every flag combination x variant x dtype is compiled for each arch, and every autotune
    config and both layouts meet every value of every other axis."""
    spec = aot_spec(op)
    jobs = compile_jobs(op)
    for name, (autotuner, domains) in spec.kernels.items():
        combinations = {(tuple(zip(domains, values)), variant, dtype)
                        for values in itertools.product(*domains.values())
                        for variant in spec.variants for dtype in DTYPES}
        for arch in ARCHS:
            mine = [j for j in jobs if j.kernel == name and j.arch == arch]
            assert {(j.flags, j.variant, j.dtype) for j in mine} == combinations
            axes = {f"flag {flag}": (values, lambda j, flag=flag: dict(j.flags)[flag]) for flag, values in domains.items()}
            axes |= {"variant": (spec.variants, lambda j: j.variant), "dtype": (DTYPES, lambda j: j.dtype),
                     "config": (range(len(autotuner.configs)), lambda j: j.config_index),
                     "layout": ((True, False), lambda j: j.aligned)}
            for free in ("config", "layout"):
                for axis, (values, of) in axes.items():
                    if axis != free:
                        free_values, free_of = axes[free]
                        missing = set(itertools.product(free_values, values)) - {(free_of(j), of(j)) for j in mine}
                        assert not missing, f"{name} sm_{arch}: {free} x {axis} pairs never compiled: {sorted(missing)}"


@pytest.mark.parametrize(("op", "kernel", "arch"), KERNELS, ids=[f"{o}-{k}-sm{a}" for o, k, a in KERNELS])
def test_kernel_compiles(op, kernel, arch, rows):
    """No compile fails unless listed in ``aot_known_problems``, and every listed one still fails."""
    mine = [r for r in rows(op) if r.kernel == kernel and r.arch == f"sm_{arch}"]
    assert len(mine) == sum(1 for j in compile_jobs(op, archs=(arch,)) if j.kernel == kernel)
    failing = [f"{row_key(r)}: {'; '.join(problems)} {r.note}" for r, problems in new_problems(mine)]
    assert not failing, f"{len(failing)} of {len(mine)} compiles fail:\n" + "\n".join(failing[:40])
    fixed = fixed_problems(mine)
    assert not fixed, "listed in aot_known_problems but passing now (run --update-known-problems):\n" + "\n".join(fixed)


@pytest.mark.parametrize("op", TRITON_OPS)
def test_known_problems_spare_the_sweep(op):
    """The rows the report had before it covered every specialisation (every config at the common
    variants, fp16/bf16, aligned, the heaviest flags) all pass: none is a known problem."""
    spec = aot_spec(op)
    known = known_problems()
    for job in compile_jobs(op):
        heaviest = tuple((name, values[0]) for name, values in spec.kernels[job.kernel][1].items())
        if (job.flags, job.aligned) == (heaviest, True) and job.variant in spec.sweep_variants \
                and job.dtype in SWEEP_DTYPES:
            assert job_key(job) not in known, job_key(job)
    keys = {job_key(job) for job in compile_jobs(op)}
    stale = [key for key in known if key.startswith(f"{op} ") and key not in keys]
    assert not stale, f"aot_known_problems lists rows no job compiles: {stale[:5]}"
