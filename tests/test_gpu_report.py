"""``deltakern bench --gpu-report``: the CSV, the exit-code decision and the cuobjdump parsers.

The full report (every op, both dtypes) is run by CI through the CLI; here one op in one dtype.
"""

import csv
import dataclasses

from deltakern import _native
from deltakern.gpu_report import (
    COLUMNS,
    CUDA_STATIC_SHARED_LIMIT,
    ReportRow,
    cuda_rows,
    exit_code,
    fixed_problems,
    known_problems,
    known_problems_source,
    new_problems,
    format_table,
    parse_resource_usage,
    parse_sass_tensor_cores,
    row_key,
    row_problems,
    run_gpu_report,
)
from deltakern.registry import ops
from deltakern.triton_kernels import aot_known_problems
from deltakern.triton_kernels.aot import SHARED_MEMORY_LIMIT, compile_jobs
from tests.csrc.test_build import cuda_build_expected


def test_csv_of_one_op_in_one_dtype(tmp_path):
    messages = []
    code = run_gpu_report(str(tmp_path / "out"), messages.append, ops=["prefix_attention"], dtypes=["bf16"],
                          cuda=False)
    with open(tmp_path / "out" / "gpu_report.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    jobs = compile_jobs("prefix_attention", dtypes=("bf16",))
    assert len(rows) == len(jobs) == 262
    assert {(r["kernel"], r["arch"]) for r in rows} == {
        (k, a) for k in ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq") for a in ("sm_80", "sm_90")}
    assert {(r["source"], r["op"], r["dtype"], r["status"]) for r in rows} == {
        ("triton", "prefix_attention", "bf16", "ok")}
    known = known_problems()
    for r in rows:
        key = f"{r['op']} {r['kernel']} [{r['config']}] {r['arch']} {r['dtype']}"
        assert 0 < int(r["registers"]) <= 255
        assert int(r["shared_limit"]) == SHARED_MEMORY_LIMIT[int(r["arch"][3:])]
        if key not in known:
            assert int(r["spill_bytes"]) == 0
            assert int(r["shared_bytes"]) <= int(r["shared_limit"])
        # Every kernel but the preprocess (a row-wise dot product) multiplies tiles with tl.dot.
        assert r["uses_dot"] == str(r["kernel"] != "bwd_preprocess")
        if r["uses_dot"] == "True":
            assert r["tensor_cores"] in (("mma",) if r["arch"] == "sm_80" else ("mma", "wgmma"))
        assert r["config"].startswith("d=") and "warps=" in r["config"] and "stages=" in r["config"]
    # The head dims compiled, each at its padded BLOCK_D; the flags of each row and its layout.
    assert {r["config"].split()[0] for r in rows} == {"d=64", "d=80", "d=96", "d=128"}
    assert all("BLOCK_D=128" in r["config"] for r in rows if r["config"].startswith(("d=80", "d=96")))
    assert {r["config"].count("CAUSAL=") for r in rows if r["kernel"] != "bwd_preprocess"} == {1}
    assert {"unaligned" in r["config"] for r in rows} == {True, False}
    assert code == 0
    assert sorted(m.split(":")[0] for m in messages) == [
        "triton prefix_attention sm_80", "triton prefix_attention sm_90"]


def _triton(**fields):
    base = dict(source="triton", op="lora_linear", kernel="fwd", config="r=16", arch="sm_80", dtype="fp16",
                registers=128, spill_bytes=0, shared_bytes=64 * 1024, shared_limit=SHARED_MEMORY_LIMIT[80],
                uses_dot=True, mma=True, wgmma=False, tensor_cores="mma")
    return ReportRow(**{**base, **fields})


def _cuda(**fields):
    base = dict(source="cuda", op="prefix_attention", kernel="prefix_attention_fwd_kernel", config="<float, 64>",
                arch="sm_90", dtype="fp32", registers=135, stack_bytes=0, local_bytes=0, shared_bytes=0,
                shared_limit=CUDA_STATIC_SHARED_LIMIT, mma=False, wgmma=False, tensor_cores="SIMT")
    return ReportRow(**{**base, **fields})


def test_exit_code_decision():
    clean = [_triton(), _triton(arch="sm_90", mma=False, wgmma=True, tensor_cores="wgmma"),
             _triton(kernel="bwd_preprocess", uses_dot=False, mma=False, tensor_cores="none"),
             _cuda(),  # SIMT by design: no tensor cores, and no failure for it
             ReportRow(source="cuda", op="", kernel="", config="", arch="", dtype="", status="unavailable",
                       note="deltakern._C was built without CUDA kernels")]
    assert [row_problems(r) for r in clean] == [[]] * 5
    assert exit_code(clean) == 0

    failing = {
        "spills 8 B": _triton(spill_bytes=8),
        "tl.dot without tensor-core instructions": _triton(mma=False, tensor_cores="MISSING"),
        f"shared memory {SHARED_MEMORY_LIMIT[80] + 1} B > limit {SHARED_MEMORY_LIMIT[80]} B":
            _triton(shared_bytes=SHARED_MEMORY_LIMIT[80] + 1),
        "local memory (stack 0 B, local 16 B)": _cuda(local_bytes=16),
        "local memory (stack 32 B, local 0 B)": _cuda(stack_bytes=32),
        "compile failed": _triton(status="error", note="CompilationError: ..."),
        "triton report unavailable": ReportRow(source="triton", op="adapter", kernel="", config="", arch="",
                                               dtype="", status="unavailable", note="triton is not installed"),
    }
    for problem, row in failing.items():
        assert row_problems(row) == [problem]
        assert exit_code(clean + [row]) == 1
    assert row_problems(_triton(spill_bytes=4, mma=False)) == ["spills 4 B", "tl.dot without tensor-core instructions"]



def test_fp32_ieee_dot_needs_no_tensor_cores():
    """tl.dot in IEEE fp32 runs on FMA units by definition; TF32 and 16-bit dots must use tensor cores."""
    assert row_problems(_triton(dtype="fp32", mma=False, tensor_cores="ieee")) == []
    assert row_problems(_triton(dtype="tf32", mma=False, tensor_cores="MISSING")) == [
        "tl.dot without tensor-core instructions"]


def test_known_problems_pass_and_fixed_ones_fail(monkeypatch):
    spilling = _triton(config="r=16 BLOCK_M=128 unaligned", spill_bytes=8)
    monkeypatch.setattr(aot_known_problems, "KNOWN_PROBLEMS", {row_key(spilling): "spills 8 B"})
    assert exit_code([_triton(), spilling]) == 0
    assert new_problems([_triton(), spilling]) == []
    # The same row passing: the list must shrink, so the report fails until it is rewritten.
    passing = dataclasses.replace(spilling, spill_bytes=0)
    assert fixed_problems([passing]) == [row_key(passing)]
    assert exit_code([passing]) == 1
    # Another failing row is new, whatever the list holds.
    assert exit_code([spilling, _triton(spill_bytes=4)]) == 1
    assert "known (1)" in format_table([_triton(), spilling])
    # The generated module lists exactly the failing Triton rows.
    namespace = {}
    exec(known_problems_source([_triton(), spilling, _cuda(local_bytes=16)]), namespace)
    assert namespace["KNOWN_PROBLEMS"] == {row_key(spilling): "spills 8 B"}


def test_table_groups_worst_case_and_names_failures():
    rows = [_triton(registers=100), _triton(registers=180, config="r=64"), _triton(spill_bytes=24, config="r=64 x"),
            _cuda(), _cuda(kernel="prefix_attention_dq_kernel", registers=199)]
    lines = format_table(rows).splitlines()
    fwd = [line for line in lines if line.startswith("triton") and " fwd " in line]
    assert len(fwd) == 1
    # 3 rows, worst registers 180, worst spill 24 B, 1 failing row.
    assert fwd[0].split()[4:7] == ["3", "180", "24"] and fwd[0].endswith("FAIL (1)")
    assert "FAIL triton lora_linear fwd [r=64 x] sm_80 fp16: spills 24 B" in lines
    assert any(line.startswith("CUDA prefix_attention kernels are fp32 SIMT by design") for line in lines)
    assert any("go through cuBLAS" in line for line in lines)


# Captured from `cuobjdump --dump-resource-usage` on deltakern._C (names shortened), with a PTX
# section, which carries no resource usage, and a made-up kernel that spills.
RESOURCE_USAGE = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]
host = linux
compile_size = 64bit
identifier = /work/main/csrc/cuda/lora_linear.cu

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN9deltakern28lora_dropout_backward_kernelI6__halfLb1EEEvPKT_PS3_S6_lffm:
  REG:26 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN9deltakern26lora_dropout_shrink_kernelI6__halfLb1EEEvPKT_S5_PS3_lllffm:
  REG:110 STACK:8 SHARED:8192 LOCAL:24 CONSTANT[0]:416 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit
identifier = /work/main/csrc/cuda/prefix_attention.cu

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN9deltakern2pa27prefix_attention_fwd_kernelIfLi64EEEvNS_24PrefixAttentionFwdParamsEl:
  REG:111 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:912 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin ptx code:
================
arch = sm_90
code version = [9,0]
host = linux
compile_size = 64bit
compressed
identifier = /work/main/csrc/cuda/prefix_attention.cu
ptxasOptions =  --generate-line-info
"""


def test_parse_resource_usage_sample():
    functions = parse_resource_usage(RESOURCE_USAGE)
    assert [(f.source, f.arch, f.registers, f.stack, f.shared, f.local) for f in functions] == [
        ("lora_linear", "sm_80", 26, 0, 0, 0),
        ("lora_linear", "sm_80", 110, 8, 8192, 24),
        ("prefix_attention", "sm_90", 111, 0, 1024, 0),
    ]
    assert functions[2].name == "_ZN9deltakern2pa27prefix_attention_fwd_kernelIfLi64EEEvNS_24PrefixAttentionFwdParamsEl"


SASS = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]
identifier = /src/gemm.cu

	code for sm_90
		Function : _Z4gemmv
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0100*/                   HGMMA.64x128x16.F32 R24, gdesc[UR4], RZ, !UPT ;
        /*0110*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
		Function : _Z4simtv
        /*0000*/                   FFMA R0, R1, R2, R0 ;
        /*0010*/                   MOV R3, 0x484d4d41 ;
"""


def test_parse_sass_tensor_cores_sample():
    assert parse_sass_tensor_cores(SASS) == {("gemm", "sm_90", "_Z4gemmv"): {"HGMMA", "HMMA"},
                                             ("gemm", "sm_90", "_Z4simtv"): set()}


def test_cuda_rows_of_the_built_extension():
    rows = cuda_rows()
    if not cuda_build_expected():
        assert [(r.source, r.status) for r in rows] == [("cuda", "unavailable")]
        assert exit_code(rows) == 0
        return
    assert _native.has_cuda_kernels()
    assert {(r.op, r.arch) for r in rows} == {
        (op, arch) for op in ops() for arch in ("sm_80", "sm_90")}
    assert {r.kernel for r in rows if r.op == "prefix_attention"} == {
        "prefix_attention_fwd_kernel", "prefix_attention_delta_kernel", "prefix_attention_dq_kernel",
        "prefix_attention_dkdv_kernel"}
    # Fp32 SIMT kernels: no tensor-core instructions, reported as such without failing.
    assert {(r.tensor_cores, r.mma, r.wgmma) for r in rows if r.op == "prefix_attention"} == {("SIMT", False, False)}
    # The GEMMs of the other ops are cuBLAS calls: their own kernels (dropout, epilogues, NF4
    # dequantisation, DoRA's scale) have no tensor cores.
    assert {r.tensor_cores for r in rows if r.op != "prefix_attention"} == {"none"}
    assert {r.dtype for r in rows if r.kernel == "prefix_attention_fwd_kernel"} == {"fp16", "bf16", "fp32"}
    assert all(0 < r.registers <= 255 and r.local_bytes == 0 and r.stack_bytes == 0 for r in rows)
    assert exit_code(rows) == 0


def test_committed_compile_records_seed_a_cold_cache_and_are_written_back(tmp_path, monkeypatch):
    """``seed_triton_cache`` copies each committed record into Triton's cache under its directory
    (the hash of everything the compile depends on), never over one already there, and not at all
    with DELTAKERN_AOT_RECOMPILE=1; ``write_compile_records`` writes the records of the given
    directories only, the same bytes for the same records."""
    import gzip
    import json

    from deltakern import gpu_report

    cache = tmp_path / "cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    monkeypatch.delenv(gpu_report.RECOMPILE_ENV, raising=False)
    committed = tmp_path / "records.json.gz"
    monkeypatch.setattr(gpu_report, "COMPILE_RECORDS", committed)
    assert gpu_report.seed_triton_cache() == 0  # nothing committed
    record = {"kernel": "_k", "arch": "sm_90", "registers": 40}
    committed.write_bytes(gzip.compress(json.dumps({"AAAA": json.dumps(record), "BBBB": "{}"}).encode()))
    (cache / "BBBB").mkdir(parents=True)
    (cache / "BBBB" / "compile_record.json").write_text("kept")
    monkeypatch.setenv(gpu_report.RECOMPILE_ENV, "1")
    assert gpu_report.seed_triton_cache() == 0 and not (cache / "AAAA").exists()
    monkeypatch.delenv(gpu_report.RECOMPILE_ENV)
    assert gpu_report.seed_triton_cache() == 1
    assert json.loads((cache / "AAAA" / "compile_record.json").read_text()) == record
    assert (cache / "BBBB" / "compile_record.json").read_text() == "kept"
    assert sorted(p.name for p in (cache / "AAAA").iterdir()) == ["compile_record.json"]  # no partial file left
    assert gpu_report.seed_triton_cache() == 0
    assert gpu_report.write_compile_records(["AAAA", "BBBB", "CCCC"]) == 2
    first = committed.read_bytes()
    assert json.loads(gzip.decompress(first)) == {"AAAA": json.dumps(record), "BBBB": "kept"}
    gpu_report.write_compile_records(["BBBB", "AAAA"])
    assert committed.read_bytes() == first
