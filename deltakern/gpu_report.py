"""``deltakern bench --gpu-report``: how the GPU kernels compile for sm_80 and sm_90, without a GPU.

Triton: every specialisation the launchers of each op can choose, derived from what the op
declares for ``triton_kernels.aot`` (its ``AOT``: flag domains, the ranks or head dims that change
the tiles): every flag combination x variant x dtype (fp16, bf16, fp32 with tl.dot in IEEE fp32,
``tf32``: fp32 with tl.dot in TF32), each at an autotune config and a layout (aligned sizes and
pointers, or not) of a pairwise covering, and every config at the common variants; compiled ahead
of time for sm_80 and sm_90. ptxas gives registers and spill bytes, the PTX whether ``tl.dot``
lowered to tensor-core instructions (``mma.sync``, ``wgmma.mma_async``).

CUDA: every kernel in the cubins of the built extension ``deltakern._C``; ``cuobjdump
--dump-resource-usage`` gives what ptxas recorded (registers, stack, static shared and local
memory), ``cuobjdump -sass`` whether tensor-core instructions (HMMA, HGMMA) are present.

Every row goes to ``<out_dir>/gpu_report.csv``; the terminal gets the worst case of each kernel
over its configs. A row fails if its kernel spills, a Triton kernel that uses ``tl.dot`` has no
tensor-core instructions (IEEE fp32 aside), shared memory exceeds the target's limit, or a compile
failed. Failing Triton rows found when the report grew to every specialisation are listed, with
their problem, in ``triton_kernels/aot_known_problems.py``: they are reported as ``known`` and
do not fail the report, while a new failing row does, and so does a listed row that no longer
fails (the list only shrinks: ``--update-known-problems`` rewrites it from a full run).

A cold Triton cache means about an hour of compiles on two cores. The records of the last full
run are committed (``triton_kernels/aot_compile_records.json.gz``, written by
``--update-compile-records``) and copied into Triton's cache before compiling, where missing:
each is filed under the cache key ``triton_kernels.aot`` computes (the kernel's source and what
it calls, the compile arguments, the Triton and ptxas versions and aot.py itself), so a record is
only ever read for the exact compile that produced it, and a changed kernel recompiles its own
jobs. ``DELTAKERN_AOT_RECOMPILE=1`` skips the committed records (with an empty
``TRITON_CACHE_DIR``: every kernel compiled afresh).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import gzip
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from deltakern import registry

_OPS = registry.ops()
# The ops with Triton kernels, in registration order.
TRITON_OPS = tuple(name for name, spec in _OPS.items() if "triton" in spec.backends)
ARCHS = (80, 90)
# fp16, bf16, fp32 (tl.dot in IEEE fp32) and tf32 (fp32 inputs, tl.dot in TF32): aot.DTYPES.
DTYPES = ("fp16", "bf16", "fp32", "tf32")
# Concurrent compile subprocesses: the two cores of the development machine and of CI runners.
WORKERS = 2
# The committed compile records: Triton cache directory name -> its compile_record.json.
COMPILE_RECORDS = Path(__file__).resolve().parent / "triton_kernels" / "aot_compile_records.json.gz"
RECOMPILE_ENV = "DELTAKERN_AOT_RECOMPILE"
_RECORD_FILE = "compile_record.json"
# Static __shared__ arrays of a CUDA kernel are capped at 48 KiB on every architecture; dynamic
# shared memory is sized at launch and is not in the cubin.
CUDA_STATIC_SHARED_LIMIT = 48 * 1024
# CUDA kernels written without tensor cores on purpose: op -> what the report says of them.
CUDA_SIMT_BY_DESIGN = {name: "SIMT" for name, spec in _OPS.items() if spec.cuda_tensor_cores == "SIMT"}
# Ops whose CUDA GEMMs are cuBLAS calls, outside deltakern's cubins (their own kernels are
# element-wise).
CUDA_GEMMS_IN_CUBLAS = tuple(name for name, spec in _OPS.items() if spec.cuda_tensor_cores == "cuBLAS")

COLUMNS = ("source", "op", "kernel", "config", "arch", "dtype", "registers", "spill_bytes", "stack_bytes",
           "local_bytes", "shared_bytes", "shared_limit", "uses_dot", "mma", "wgmma", "tensor_cores", "status",
           "note")


@dataclasses.dataclass(frozen=True)
class ReportRow:
    """One kernel x config x arch x dtype of the report (one CSV row).

    source: "triton" or "cuda". For Triton, spill_bytes is ptxas's spill stores plus loads and
    stack/local are not reported; for CUDA, stack_bytes and local_bytes are what ptxas recorded
    in the cubin and spill_bytes is not reported. mma / wgmma: tensor-core instructions of the
    sm_80 (``mma.sync``, SASS HMMA) and sm_90 (``wgmma``, SASS HGMMA) kinds. tensor_cores sums it up:
    "mma", "wgmma", "MISSING" (a tl.dot without them), "ieee" (a tl.dot in IEEE fp32, which runs
    on FMA units by definition), "SIMT" (CUDA kernels without tensor cores by design), "none" (no
    matrix product in the kernel). status "unavailable" marks a part of
    the report that could not be produced (note says why), "error" a compile that failed.
    """

    source: str
    op: str
    kernel: str
    config: str
    arch: str
    dtype: str
    registers: int | None = None
    spill_bytes: int | None = None
    stack_bytes: int | None = None
    local_bytes: int | None = None
    shared_bytes: int | None = None
    shared_limit: int | None = None
    uses_dot: bool | None = None
    mma: bool | None = None
    wgmma: bool | None = None
    tensor_cores: str = ""
    status: str = "ok"
    note: str = ""


# --------------------------------------------------------------------------------------------
# What fails the report
# --------------------------------------------------------------------------------------------


def row_problems(row: ReportRow) -> list[str]:
    """Why ``row`` fails the report (empty if it does not).

    A CUDA part that is unavailable (no CUDA kernels built, no cuobjdump) is reported but is not
    a failure; a Triton part that is unavailable is, since then nothing was checked.
    """
    if row.status == "unavailable":
        return ["triton report unavailable"] if row.source == "triton" else []
    if row.status == "error":
        return ["compile failed"]
    problems = []
    if row.spill_bytes:
        problems.append(f"spills {row.spill_bytes} B")
    if row.stack_bytes or row.local_bytes:
        problems.append(f"local memory (stack {row.stack_bytes} B, local {row.local_bytes} B)")
    if row.uses_dot and row.dtype != "fp32" and not (row.mma or row.wgmma):
        problems.append("tl.dot without tensor-core instructions")
    if row.shared_bytes is not None and row.shared_limit is not None and row.shared_bytes > row.shared_limit:
        problems.append(f"shared memory {row.shared_bytes} B > limit {row.shared_limit} B")
    return problems


def row_key(row: ReportRow) -> str:
    """How ``aot_known_problems`` names a row: op, kernel, [config], arch, dtype."""
    return f"{row.op} {row.kernel} [{row.config}] {row.arch} {row.dtype}"


def known_problems() -> dict[str, str]:
    """The failing Triton rows known from before (row key -> what fails)."""
    from deltakern.triton_kernels.aot_known_problems import KNOWN_PROBLEMS

    return KNOWN_PROBLEMS


def new_problems(rows: Iterable[ReportRow]) -> list[tuple[ReportRow, list[str]]]:
    """The rows with a problem (see :func:`row_problems`) that are not known."""
    known = known_problems()
    return [(row, problems) for row in rows if (problems := row_problems(row)) and row_key(row) not in known]


def fixed_problems(rows: Iterable[ReportRow]) -> list[str]:
    """The known problems of ``rows`` that no longer fail (to be removed from the list)."""
    known = known_problems()
    return [row_key(row) for row in rows if row_key(row) in known and not row_problems(row)]


def exit_code(rows: Iterable[ReportRow]) -> int:
    """0 if no row has a new problem and no known problem is fixed, else 1."""
    rows = list(rows)
    return 1 if new_problems(rows) or fixed_problems(rows) else 0


def failing_triton_rows(rows: Iterable[ReportRow]) -> dict[str, str]:
    """Row key -> problem of every failing Triton row, sorted by key."""
    return dict(sorted((row_key(row), "; ".join(problems)) for row in rows
                       if row.source == "triton" and (problems := row_problems(row))))


def known_problems_source(rows: Iterable[ReportRow]) -> str:
    """The text of ``triton_kernels/aot_known_problems.py`` listing the failing Triton rows of a
    full run."""
    failing = failing_triton_rows(rows).items()
    lines = ['"""Triton compiles of `deltakern bench --gpu-report` known to fail: row key -> problem.',
             "",
             "Generated by `deltakern bench --gpu-report --update-known-problems` from a full run. The",
             "report and tests/triton_kernels/test_compile.py fail on a failing row not listed here and on",
             "a listed row that passes: fix a kernel, then rerun the command to drop its rows.",
             '"""',
             "",
             "KNOWN_PROBLEMS = {"]
    lines += [f"    {key!r}: {problem!r}," for key, problem in failing]
    lines += ["}", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Triton: ahead-of-time compiles, in subprocesses
# --------------------------------------------------------------------------------------------


def job_config(job) -> str:
    """The config column of a compile job's row: variant, tiles, warps, stages, the flags that vary,
    and ``unaligned`` for the layout without multiples of 16."""
    from deltakern.triton_kernels import aot

    spec = aot.aot_spec(job.op)
    tile = {k: v for k, v in spec.variant_constexprs(job.kernel, job.variant).items() if k.startswith("BLOCK_")}
    return " ".join(
        [f"{spec.variant_tag}={job.variant}"]
        + [f"{k}={v}" for k, v in {**job.config.kwargs, **tile}.items()]
        + [f"warps={job.config.num_warps}", f"stages={job.config.num_stages}"]
        + job.flag_tag.split(",") * bool(job.flag_tag)
        + ([] if job.aligned else ["unaligned"]))


def job_key(job) -> str:
    """The :func:`row_key` of a compile job's row."""
    return row_key(ReportRow(source="triton", op=job.op, kernel=job.kernel, config=job_config(job),
                             arch=f"sm_{job.arch}", dtype=job.dtype))


def _triton_cache_dir() -> Path | None:
    """Triton's file cache directory, or None when a custom cache manager is configured."""
    from triton import knobs

    return Path(knobs.cache.dir) if knobs.cache.manager_class is None else None


def seed_triton_cache() -> int:
    """Copy the committed compile records that Triton's cache lacks into it (not with
    ``DELTAKERN_AOT_RECOMPILE=1``); returns how many were copied."""
    cache = _triton_cache_dir()
    if cache is None or os.environ.get(RECOMPILE_ENV) == "1" or not COMPILE_RECORDS.exists():
        return 0
    records = json.loads(gzip.decompress(COMPILE_RECORDS.read_bytes()))
    copied = 0
    for directory, text in records.items():
        target = cache / directory / _RECORD_FILE
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{_RECORD_FILE}.{os.getpid()}.tmp")
        partial.write_text(text)
        os.replace(partial, target)  # whole or not at all, as Triton's own cache writes
        copied += 1
    return copied


def _triton_worker(op: str, arch: int, dtypes: list[str]) -> dict:
    """Compiles every job of ``op`` for ``sm_<arch>`` and ``dtypes``: ``{"rows": the rows as
    dicts, "records": the Triton cache directories its compile records are in}``.

    Runs in a subprocess whose environment has no TRITON_INTERPRET, so the kernels are real
    JIT functions (see ``triton_kernels.aot``).
    """
    from deltakern.triton_kernels import aot

    directories = set()
    cache_manager = aot.get_cache_manager

    def recording_cache_manager(key):
        # aot keys each record by a hash of everything the compile depends on; note where it is.
        manager = cache_manager(key)
        directories.add(Path(manager.cache_dir).name)
        return manager

    aot.get_cache_manager = recording_cache_manager
    rows = []
    for job in aot.compile_jobs(op, dtypes=tuple(dtypes), archs=(arch,)):
        base = ReportRow(source="triton", op=op, kernel=job.kernel, config=job_config(job), arch=f"sm_{arch}",
                         dtype=job.dtype, shared_limit=aot.SHARED_MEMORY_LIMIT[arch])
        try:
            record = aot.compile_job(job)
        except Exception as error:  # reported as a failing row, the other jobs still run
            rows.append(dataclasses.asdict(dataclasses.replace(
                base, status="error", note=f"{type(error).__name__}: {error}".splitlines()[0][:200])))
            continue
        tensor_cores = ("none" if not record.uses_dot else "wgmma" if record.has_wgmma else "mma" if record.has_mma
                        else "ieee" if job.dtype == "fp32" else "MISSING")
        rows.append(dataclasses.asdict(dataclasses.replace(
            base, registers=record.registers, spill_bytes=record.spill_stores + record.spill_loads,
            shared_bytes=record.shared, uses_dot=record.uses_dot, mma=record.has_mma, wgmma=record.has_wgmma,
            tensor_cores=tensor_cores)))
    return {"rows": rows, "records": sorted(directories)}


_WORKER = "import json, sys; from deltakern.gpu_report import _triton_worker; " \
          "print(json.dumps(_triton_worker(sys.argv[1], int(sys.argv[2]), sys.argv[3].split(','))))"


def _compile_in_subprocess(op: str, arch: int, dtypes: tuple[str, ...]) -> tuple[list[ReportRow], list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", _WORKER, op, str(arch), ",".join(dtypes)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        note = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return [ReportRow(source="triton", op=op, kernel="", config="", arch=f"sm_{arch}", dtype=",".join(dtypes),
                          status="error", note=f"compile subprocess exited with {done.returncode}: {note}")], []
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return [ReportRow(**row) for row in result["rows"]], result["records"]


def triton_rows(ops=TRITON_OPS, dtypes=DTYPES, archs=ARCHS,
                progress: Callable[[str], None] | None = None, records: set[str] | None = None) -> list[ReportRow]:
    """Compiles every Triton kernel x config x variant of ``ops`` for ``dtypes`` and ``archs``.

    One subprocess per (op, arch), :data:`WORKERS` at a time, biggest op first so that the two
    workers finish together; ``progress`` is called as each (op, arch) finishes. The committed
    compile records are copied into Triton's cache first (:func:`seed_triton_cache`); the cache
    directories of this run's records are added to ``records`` when given.
    """
    for name, given, known in (("op", ops, TRITON_OPS), ("dtype", dtypes, DTYPES), ("arch", archs, ARCHS)):
        unknown = [x for x in given if x not in known]
        if unknown:
            raise ValueError(f"unknown Triton {name}(s) {unknown} for the GPU report; choose from {list(known)}")
    if importlib.util.find_spec("triton") is None:
        return [ReportRow(source="triton", op=op, kernel="", config="", arch="", dtype="", status="unavailable",
                          note="triton is not installed (pip install 'deltakern[triton]')") for op in ops]
    from deltakern.triton_kernels import aot

    seed_triton_cache()
    tasks = sorted(((op, arch) for op in ops for arch in archs),
                   key=lambda t: -len(aot.compile_jobs(t[0], dtypes=tuple(dtypes), archs=(t[1],))))
    results = {}
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        futures = {pool.submit(_compile_in_subprocess, op, arch, tuple(dtypes)): (op, arch) for op, arch in tasks}
        for future in concurrent.futures.as_completed(futures):
            op, arch = futures[future]
            results[op, arch], directories = future.result()
            if records is not None:
                records.update(directories)
            if progress is not None:
                progress(f"triton {op} sm_{arch}: {len(results[op, arch])} compiles "
                         f"({len(results)}/{len(tasks)} done, {time.perf_counter() - started:.0f} s)")
    return [row for op in ops for arch in archs for row in results[op, arch]]


# --------------------------------------------------------------------------------------------
# CUDA: the cubins of deltakern._C
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CudaFunction:
    """Resource usage ptxas recorded for one kernel of one cubin."""

    source: str  # the .cu file's stem: the op
    arch: str
    name: str  # mangled
    registers: int
    stack: int
    shared: int
    local: int


_FUNCTION_USAGE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _cubin_sections(text: str):
    """(source stem, arch, section text) of each "Fatbin elf code" section of a cuobjdump listing
    (the PTX sections carry no resource usage and no SASS)."""
    for section in re.split(r"\n(?=Fatbin \w+ code:)", text):
        if not section.lstrip().startswith("Fatbin elf code:"):
            continue
        arch = re.search(r"^arch = (\S+)", section, re.M)
        identifier = re.search(r"^identifier = (\S+)", section, re.M)
        if arch is None or identifier is None:
            raise ValueError(f"cuobjdump section without arch or identifier: {section[:200]!r}")
        yield Path(identifier.group(1)).stem, arch.group(1), section


def parse_resource_usage(text: str) -> list[CudaFunction]:
    """The kernels of ``cuobjdump --dump-resource-usage`` output, one per (cubin, function)."""
    return [
        CudaFunction(source, arch, name, int(reg), int(stack), int(shared), int(local))
        for source, arch, section in _cubin_sections(text)
        for name, reg, stack, shared, local in _FUNCTION_USAGE.findall(section)
    ]


def parse_sass_tensor_cores(text: str) -> dict[tuple[str, str, str], set[str]]:
    """(source stem, arch, mangled function) -> the tensor-core SASS opcodes it contains (HMMA,
    HGMMA), from ``cuobjdump -sass`` output; functions without any map to an empty set."""
    found = {}
    for source, arch, section in _cubin_sections(text):
        for body in re.split(r"\n\s*Function : ", section)[1:]:
            name, _, code = body.partition("\n")
            found[source, arch, name.strip()] = set(re.findall(r"\b(HGMMA|HMMA)\b", code))
    return found


def cuobjdump_path() -> str | None:
    """Triton's bundled cuobjdump, else the one on PATH or in the CUDA toolkit, else None."""
    try:
        from triton import knobs

        bundled = knobs.nvidia.cuobjdump.path
        if bundled and os.path.exists(bundled):
            return bundled
    except ImportError:
        pass
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    toolkit = os.path.join(cuda_home, "bin", "cuobjdump")
    return shutil.which("cuobjdump") or (toolkit if os.path.exists(toolkit) else None)


_DTYPE_NAMES = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32"}


def _demangled_parts(mangled: str) -> tuple[str, str, str]:
    """(kernel name, template arguments, dtype) of a mangled kernel symbol, namespaces dropped."""
    import torch

    from deltakern.activations import ACTIVATIONS

    full = torch._C._demangle(mangled)
    full = re.sub(r"[\w:]*\(anonymous namespace\)::|deltakern::(\w+::)?", "", full)
    # Activation enum values are indices into ACTIVATIONS (csrc/include/deltakern/activations.h).
    full = re.sub(r"\(Activation\)(\d+)", lambda m: ACTIVATIONS[int(m.group(1))], full)
    head = full.removeprefix("void ").split("(", 1)[0]
    name, _, template = head.partition("<")
    template = f"<{template}" if template else ""
    dtypes = [dtype for c_type, dtype in _DTYPE_NAMES.items() if re.search(rf"\b{c_type}\b", template)]
    return name, template, ",".join(dtypes)


def _cuda_unavailable(note: str) -> list[ReportRow]:
    return [ReportRow(source="cuda", op="", kernel="", config="", arch="", dtype="", status="unavailable", note=note)]


def cuda_rows(progress: Callable[[str], None] | None = None) -> list[ReportRow]:
    """Resource usage and tensor-core instructions of every kernel in deltakern._C's cubins, or one
    "unavailable" row saying why there is none."""
    from deltakern import _native

    if _native.C is None:
        return _cuda_unavailable(_native.LOAD_ERROR)
    if not _native.has_cuda_kernels():
        return _cuda_unavailable("deltakern._C was built without CUDA kernels (no nvcc, a CPU-only torch, "
                                 "or DELTAKERN_BUILD_CUDA=0)")
    tool = cuobjdump_path()
    if tool is None:
        return _cuda_unavailable("cuobjdump not found (install triton, or put the CUDA toolkit on PATH)")
    if progress is not None:
        progress(f"cuda: reading the cubins of {Path(_native.C.__file__).name} with cuobjdump")

    def run(flag: str) -> str:
        return subprocess.run([tool, flag, _native.C.__file__], capture_output=True, text=True, check=True).stdout

    functions = parse_resource_usage(run("--dump-resource-usage"))
    if not functions:
        return _cuda_unavailable(f"no kernels in the cubins of {_native.C.__file__}")
    tensor_cores = parse_sass_tensor_cores(run("-sass"))
    rows = []
    for f in functions:
        name, template, dtype = _demangled_parts(f.name)
        opcodes = tensor_cores.get((f.source, f.arch, f.name), set())
        summary = "wgmma" if "HGMMA" in opcodes else "mma" if "HMMA" in opcodes else CUDA_SIMT_BY_DESIGN.get(
            f.source, "none")
        rows.append(ReportRow(
            source="cuda", op=f.source, kernel=name, config=template, arch=f.arch, dtype=dtype,
            registers=f.registers, stack_bytes=f.stack, local_bytes=f.local, shared_bytes=f.shared,
            shared_limit=CUDA_STATIC_SHARED_LIMIT, mma="HMMA" in opcodes, wgmma="HGMMA" in opcodes,
            tensor_cores=summary,
            note="fp32 SIMT by design (no tensor cores yet); shared_bytes is the static __shared__ only, the "
                 "dynamic shared memory is sized at launch" if f.source in CUDA_SIMT_BY_DESIGN else ""))
    return rows


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def write_csv(rows: Iterable[ReportRow], path: Path) -> None:
    """Every row, columns :data:`COLUMNS`; None is an empty cell (not reported for that source)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow(["" if getattr(row, c) is None else getattr(row, c) for c in COLUMNS])


def _worst(rows: list[ReportRow]) -> dict:
    """The worst case of a group of rows of one kernel and arch."""

    def most(field):
        values = [getattr(r, field) for r in rows if getattr(r, field) is not None]
        return max(values) if values else None

    kinds = sorted({r.tensor_cores for r in rows if r.tensor_cores})
    return {"rows": len(rows), "registers": most("registers"), "spill": most("spill_bytes"),
            "local": max((r.stack_bytes or 0) + (r.local_bytes or 0) for r in rows) if rows[0].source == "cuda"
            else None,
            "shared": most("shared_bytes"), "limit": most("shared_limit"), "tensor_cores": "/".join(kinds),
            "problems": sum(1 for r in rows if row_problems(r))}


def _dash(n: int | None) -> str:
    return "-" if n is None else str(n)


def _kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def _spoken_list(names) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    *rest, last = names
    return f"{', '.join(rest)} and {last}" if rest else last


def format_table(rows: list[ReportRow]) -> str:
    """The terminal table: per (source, op, kernel, arch) the worst case over configs, dtypes and
    variants, then unavailable parts, failing rows and summary lines."""
    known = known_problems()
    groups: dict[tuple, list[ReportRow]] = {}
    for row in rows:
        if row.status == "ok":
            groups.setdefault((row.source, row.op, row.kernel, row.arch), []).append(row)
    header = (f"{'source':<7}{'op':<17}{'kernel':<31}{'arch':<7}{'rows':>5}{'regs':>6}{'spill B':>9}"
              f"{'local B':>9}{'smem KiB':>10}{'limit':>8}  {'tensor cores':<14}{'status'}")
    lines = [header, "-" * len(header)]
    for (source, op, kernel, arch), group in groups.items():
        w = _worst(group)
        new = sum(1 for r in group if row_problems(r) and row_key(r) not in known)
        old = w["problems"] - new
        status = ("ok" if not w["problems"] else f"known ({old})" if not new
                  else f"FAIL ({new}{f' new, {old} known' if old else ''})")
        lines.append(f"{source:<7}{op:<17}{kernel[:30]:<31}{arch:<7}{w['rows']:>5}{_dash(w['registers']):>6}"
                     f"{_dash(w['spill']):>9}{_dash(w['local']):>9}{_kib(w['shared']):>10}{_kib(w['limit']):>8}  "
                     f"{w['tensor_cores']:<14}{status}")
    for row in rows:
        if row.status == "unavailable":
            lines.append(f"{row.source}: unavailable{f' ({row.op})' if row.op else ''}: {row.note}")
    failing = [row for row, _ in new_problems(rows)]
    for key in fixed_problems(rows):
        lines.append(f"FIXED {key}: passes now; remove it from aot_known_problems (--update-known-problems)")
    for row in failing[:20]:
        lines.append(f"FAIL {row.source} {row.op} {row.kernel} [{row.config}] {row.arch} {row.dtype}: "
                     f"{'; '.join(row_problems(row))}{f' ({row.note})' if row.note and row.status == 'error' else ''}")
    if len(failing) > 20:
        lines.append(f"... and {len(failing) - 20} more failing rows (see the CSV)")
    known_failing = [row for row in rows if row_problems(row) and row_key(row) in known]
    if known_failing:
        lines.append(f"{len(known_failing)} rows fail as known (triton_kernels/aot_known_problems.py), not a failure "
                     "of this run")
    triton = [r for r in rows if r.source == "triton" and r.status != "unavailable"]
    if triton:
        dots = [r for r in triton if r.uses_dot]
        lines.append(
            f"Triton: {len(triton)} compiles ({len({(r.op, r.kernel) for r in triton})} kernels x flags x variants x "
            f"{'/'.join(sorted({r.dtype for r in triton}))} x {'/'.join(sorted({r.arch for r in triton}))}, "
            f"configs and layouts covered pairwise); {sum(1 for r in triton if r.spill_bytes)} spill; "
            f"{sum(1 for r in dots if r.mma or r.wgmma)}/{len(dots)} tl.dot compiles on tensor cores "
            f"({sum(1 for r in dots if r.tensor_cores == 'ieee')} in IEEE fp32, on FMA units by design)")
    cuda = [r for r in rows if r.source == "cuda" and r.status == "ok"]
    if cuda:
        simt = sorted({r.op for r in cuda if r.tensor_cores == "SIMT"})
        lines.append(f"CUDA: {len(cuda)} kernels in the cubins of deltakern._C "
                     f"({'/'.join(sorted({r.arch for r in cuda}))}); "
                     f"{sum(1 for r in cuda if r.stack_bytes or r.local_bytes)} use local memory")
        if simt:
            lines.append(f"CUDA {', '.join(simt)} kernels are fp32 SIMT by design (no tensor cores yet); "
                         "not a failure. Shared memory of CUDA kernels is their static __shared__ only.")
        if CUDA_GEMMS_IN_CUBLAS:
            lines.append(f"CUDA GEMMs of {_spoken_list(CUDA_GEMMS_IN_CUBLAS)} go through cuBLAS (not in "
                         "deltakern's cubins).")
    return "\n".join(lines)


def write_compile_records(directories: Iterable[str]) -> int:
    """Write :data:`COMPILE_RECORDS` from the compile records in these Triton cache directories
    (a full run's); returns how many it holds."""
    cache = _triton_cache_dir()
    if cache is None:
        raise ValueError("--update-compile-records reads Triton's file cache; a custom cache manager is configured")
    records = {d: (cache / d / _RECORD_FILE).read_text() for d in sorted(directories)
               if (cache / d / _RECORD_FILE).exists()}
    # mtime 0: the same records give the same bytes.
    COMPILE_RECORDS.write_bytes(gzip.compress(json.dumps(records, sort_keys=True).encode(), mtime=0))
    return len(records)


def run_gpu_report(out_dir: str, progress: Callable[[str], None] | None = None, *,
                   ops: Iterable[str] = TRITON_OPS, dtypes: Iterable[str] = DTYPES, cuda: bool = True,
                   update_known_problems: bool = False, update_compile_records: bool = False) -> int:
    """Compiles and inspects every GPU kernel, prints the table, writes ``<out_dir>/gpu_report.csv``.

    ops / dtypes restrict the Triton part (default: all); cuda=False leaves out the CUDA part.
    update_known_problems rewrites ``triton_kernels/aot_known_problems.py`` from this run's failing
    Triton rows, update_compile_records :data:`COMPILE_RECORDS` from its compile records (a full
    run only, both). Returns 0, or 1 if a row has a new problem or a known one is
    fixed (see :func:`exit_code`).
    """
    ops, dtypes = tuple(ops), tuple(dtypes)
    full = set(ops) == set(TRITON_OPS) and set(dtypes) == set(DTYPES)
    for flag, given in (("--update-known-problems", update_known_problems),
                        ("--update-compile-records", update_compile_records)):
        if given and not full:
            raise ValueError(f"{flag} needs the full report (every op and dtype)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    records: set[str] = set()
    rows = triton_rows(ops, dtypes, ARCHS, progress, records)
    if update_compile_records:
        print(f"{write_compile_records(records)} compile records written to {COMPILE_RECORDS}")
    if cuda:
        rows += cuda_rows(progress)
    path = out / "gpu_report.csv"
    write_csv(rows, path)
    if update_known_problems:
        from deltakern.triton_kernels import aot_known_problems

        Path(aot_known_problems.__file__).write_text(known_problems_source(rows))
        aot_known_problems.KNOWN_PROBLEMS.clear()
        aot_known_problems.KNOWN_PROBLEMS.update(failing_triton_rows(rows))
        print(f"{len(aot_known_problems.KNOWN_PROBLEMS)} failing Triton rows written to {aot_known_problems.__file__}")
    print(format_table(rows))
    code = exit_code(rows)
    print(f"{len(rows)} rows written to {path} in {time.perf_counter() - started:.0f} s; "
          f"{'FAIL' if code else 'OK'}")
    return code
