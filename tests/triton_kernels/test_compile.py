"""Ahead-of-time compilation of every Triton kernel of every op for sm_80 and sm_90.

No GPU is needed: each kernel and autotune config is compiled with ``triton.compile`` for a
``GPUTarget`` in fp16 and bf16, for each variant of the op (LoRA ranks and adapter bottlenecks 16
and 64, attention head dims 64, 96 and 128, the (IA)³ scale on the output and on the input side),
and its PTX is checked with Triton's bundled ``ptxas``. Each op is compiled in one subprocess,
when its first test runs (so ``-k adapter`` compiles only the adapter kernels), with
``TRITON_INTERPRET`` removed from its environment, because under the interpreter ``@triton.jit``
makes functions that cannot be compiled; each (op, kernel, config, variant, dtype, arch) is then
its own test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import deltakern
from deltakern.registry import ops
from deltakern.triton_kernels.aot import SHARED_MEMORY_LIMIT, compile_jobs

JOBS = [job for op in ops() for job in compile_jobs(op)]

_COMPILE_OP = """
import dataclasses, json, sys, traceback
from deltakern.triton_kernels.aot import compile_job, compile_jobs

op = sys.argv[1]
records = {}
for job in compile_jobs(op):
    try:
        records[f"{op}-{job.id}"] = dataclasses.asdict(compile_job(job))
    except Exception:
        records[f"{op}-{job.id}"] = {"error": traceback.format_exc()}
print(json.dumps(records))
"""


def _compile_op(op: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    package_root = str(Path(deltakern.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", _COMPILE_OP, op], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def records():
    """op -> its compile records, each op compiled once, on first use."""
    compiled = {}

    def get(op: str) -> dict:
        if op not in compiled:
            compiled[op] = _compile_op(op)
        return compiled[op]

    return get


def test_every_kernel_is_compiled():
    assert {job.kernel for job in compile_jobs("lora_linear")} == {"shrink", "fwd", "dy", "da", "dx", "dx_dropout"}
    assert {job.kernel for job in compile_jobs("prefix_attention")} == {"fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"}
    assert {job.variant for job in compile_jobs("prefix_attention")} == {64, 96, 128}
    # down and dz evaluate the activation: both are compiled with each gelu, the heaviest ones.
    assert {job.kernel for job in compile_jobs("adapter")} == {
        "down_gelu", "down_gelu_tanh", "up", "dz_gelu", "dz_gelu_tanh", "dh", "dwd"}
    assert {job.variant for job in compile_jobs("adapter")} == {16, 64}
    # One GEMM each way; the scale's side (0 output, 1 input) is the variant.
    assert {job.kernel for job in compile_jobs("ia3_linear")} == {"fwd", "bwd"}
    assert {job.variant for job in compile_jobs("ia3_linear")} == {0, 1}
    # The two GEMMs that read the NF4 weight, each for even K (row runs of bytes) and odd K.
    assert {job.kernel for job in compile_jobs("qlora_linear")} == {
        "fwd", "fwd_odd_k", "dx", "dx_odd_k", "dx_dropout", "dx_dropout_odd_k"}
    assert {job.variant for job in compile_jobs("qlora_linear")} == {16, 64}


@pytest.mark.parametrize("job", JOBS, ids=[f"{job.op}-{job.id}" for job in JOBS])
def test_kernel_compiles(job, records):
    record = records(job.op)[f"{job.op}-{job.id}"]
    assert "error" not in record, record.get("error")
    if record["uses_dot"]:
        if job.arch == 80:
            assert record["has_mma"], "tl.dot did not lower to mma on sm_80"
        else:
            assert record["has_wgmma"] or record["has_mma"], "tl.dot lowered to neither wgmma nor mma on sm_90"
    assert record["spill_stores"] == 0, f"ptxas spills {record['spill_stores']} bytes ({record['registers']} regs)"
    assert record["shared"] <= SHARED_MEMORY_LIMIT[job.arch], (
        f"{record['shared']} B of shared memory, limit {SHARED_MEMORY_LIMIT[job.arch]} B")
