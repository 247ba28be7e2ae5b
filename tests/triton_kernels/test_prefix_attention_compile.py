"""Ahead-of-time compilation of every prefix_attention Triton kernel for sm_80 and sm_90.

No GPU is needed: each kernel and autotune config is compiled with ``triton.compile`` for a
``GPUTarget`` in fp16 and bf16 for head dims 64 and 128, and its PTX is checked with Triton's
bundled ``ptxas``. The compilation runs in one subprocess with ``TRITON_INTERPRET`` removed from
its environment, because under the interpreter ``@triton.jit`` makes functions that cannot be
compiled; each (kernel, config, head dim, dtype, arch) is then its own test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import deltakern
from deltakern.triton_kernels.aot import SHARED_MEMORY_LIMIT, compile_jobs

OP = "prefix_attention"
JOBS = compile_jobs(OP)

_COMPILE_ALL = f"""
import dataclasses, json, traceback
from deltakern.triton_kernels.aot import compile_job, compile_jobs

records = {{}}
for job in compile_jobs({OP!r}):
    try:
        records[job.id] = dataclasses.asdict(compile_job(job))
    except Exception:
        records[job.id] = {{"error": traceback.format_exc()}}
print(json.dumps(records))
"""


@pytest.fixture(scope="module")
def records() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    package_root = str(Path(deltakern.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", _COMPILE_ALL], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_kernel_is_compiled():
    kernels = {job.kernel for job in JOBS}
    assert kernels == {"fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"}
    assert {job.variant for job in JOBS} == {64, 128}


@pytest.mark.parametrize("job", JOBS, ids=[job.id for job in JOBS])
def test_prefix_attention_kernel_compiles(job, records):
    record = records[job.id]
    assert "error" not in record, record.get("error")
    if record["uses_dot"]:
        if job.arch == 80:
            assert record["has_mma"], "tl.dot did not lower to mma on sm_80"
        else:
            assert record["has_wgmma"] or record["has_mma"], "tl.dot lowered to neither wgmma nor mma on sm_90"
    assert record["spill_stores"] == 0, f"ptxas spills {record['spill_stores']} bytes ({record['registers']} regs)"
    assert record["shared"] <= SHARED_MEMORY_LIMIT[job.arch], (
        f"{record['shared']} B of shared memory, limit {SHARED_MEMORY_LIMIT[job.arch]} B")
