"""The benchmark harness: medians of repeated timings, results checked against the reference in
the same run, and tidy CSV rows (DESIGN.md, "Benchmarks"). The cases it runs live beside it: one
module per op in ``deltakern/benchmark/cases/`` and the end-to-end step in ``e2e.py``, each with a
:class:`BenchSuite` named ``SUITE``.

Row columns: op, provider, mode (fwd|bwd|full), shape, dtype, device, metric (ms, saved_MB or
peak_MB), p20, p50, p80, versions, git_sha, timestamp. Times come from ``time.perf_counter`` on CPU
and CUDA events on GPU; bytes saved for backward are counted over unique storages with
``torch.autograd.graph.saved_tensors_hooks``; the peak memory of a full step is the high-water mark
of the bytes it allocates (the CUDA caching allocator's statistics on GPU, the profiler's record of
every CPU allocation on CPU).
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch

COLUMNS = ("op", "provider", "mode", "shape", "dtype", "device", "metric", "p20", "p50", "p80", "versions", "git_sha", "timestamp")


@dataclass
class Row:
    op: str
    provider: str
    mode: str
    shape: str
    dtype: str
    device: str
    metric: str
    p20: float
    p50: float
    p80: float
    versions: str = field(default_factory=lambda: _VERSIONS)
    git_sha: str = field(default_factory=lambda: RUN_GIT_SHA)
    timestamp: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def _versions() -> str:
    parts = [f"torch={torch.__version__}"]
    try:
        import triton

        parts.append(f"triton={triton.__version__}")
    except ImportError:
        pass
    from .. import __version__

    parts.append(f"deltakern={__version__}")
    return " ".join(parts)


def git_sha() -> str:
    """The short commit of the checkout deltakern runs from, or "unknown"."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_VERSIONS = _versions()
# The commit when deltakern was imported, for every row and summary of the run: a commit made while
# a long run is going (the large e2e suite takes 27 min) must not be credited with its figures.
RUN_GIT_SHA = git_sha()


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(p20, p50, p80) of ``samples``."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return q[1], statistics.median(samples), q[7]


Timed = tuple[Callable, Callable | None]  # (fn, setup): fn(setup()) is timed, or fn() when setup is None


def _time_once(fn: Callable, setup: Callable | None, device: str) -> float:
    arg = setup() if setup is not None else None
    call = (lambda: fn(arg)) if setup is not None else fn
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    call()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(timed: dict[str, Timed], *, warmup: int = 2, repeats: int = 10, device: str = "cpu") -> dict[str, tuple[float, float, float]]:
    """(p20, p50, p80) milliseconds of each entry of ``timed``, run in turn within every repeat.

    Interleaving puts the providers under the same machine load in each round, so their ratios
    hold on a shared, noisy machine where timing one provider after another does not (here,
    back-to-back runs of one GEMM moved by up to 40% between minutes).
    """
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for i in range(warmup + repeats):
        for name, (fn, setup) in timed.items():
            elapsed = _time_once(fn, setup, device)
            if i >= warmup:
                samples[name].append(elapsed)
    return {name: quantiles(values) for name, values in samples.items()}


def backward_modes(forward: Callable[[], torch.Tensor], params: list[torch.Tensor], grad_out: torch.Tensor,
                   mode: str) -> tuple[Callable, Callable | None]:
    """(timed callable, setup) of an op case for ``mode``: ``fwd`` times ``forward()`` (which
    builds the graph), ``full`` clears the gradients of ``params`` and times forward and
    backward of ``grad_out``, ``bwd`` times the backward only, of an output its setup makes."""
    def clear():
        for p in params:
            p.grad = None

    if mode == "fwd":
        return forward, None
    if mode == "full":
        return (lambda: (clear(), forward().backward(grad_out))), None
    if mode != "bwd":
        raise ValueError(f"unknown mode {mode!r}; expected fwd, bwd or full")

    def setup():
        clear()
        return forward()

    return (lambda out: out.backward(grad_out)), setup


class _Saved:
    """What the pack hook hands autograd for one saved tensor: a token freed with the graph that
    holds it. It holds no tensor: a saved output (``exp``, ``tanh``, a custom op's result) refers to
    its own ``grad_fn``, and a token holding it would close a cycle through the C++ graph that
    Python's collector cannot see (each e2e count leaked about 1 GiB at the default size)."""

    __slots__ = ("__weakref__",)

    @staticmethod
    def unpack(_token) -> torch.Tensor:
        raise RuntimeError("saved_tensors_bytes: the graph it counts is for counting only; it cannot run backward")


def saved_tensors_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the unique storages autograd holds for backward once ``fn()`` has returned (its
    result kept alive), minus those of ``exclude``. The graph ``fn`` builds is counted, never run:
    its backward raises ``RuntimeError``.

    Storages are keyed by data pointer, so a view of the caller's tensor counts as that tensor; they
    are kept alive until the count is made, so no pointer is reused for another tensor meanwhile.
    ``exclude`` takes tensors kept by reference anyway (frozen weights). A tensor saved by a graph
    that ``fn`` builds and drops before returning (PEFT's DoRA forms ``B A`` through an identity
    matrix that way: 4 MiB at in = 1024) is not counted: it is not kept for backward.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    saved: list[tuple[torch.UntypedStorage, weakref.ref]] = []

    def pack(t: torch.Tensor):
        token = _Saved()
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved.append((storage, weakref.ref(token)))
        return token

    with torch.autograd.graph.saved_tensors_hooks(pack, _Saved.unpack):
        result = fn()
    storages = {storage.data_ptr(): storage.nbytes() for storage, ref in saved if ref() is not None}
    del result
    return sum(storages.values())


@contextlib.contextmanager
def _quiet_fds():
    """Silences file descriptors 1 and 2: the profiler's native code prints start/stop lines there."""
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as devnull:
        try:
            os.dup2(devnull.fileno(), 1)
            os.dup2(devnull.fileno(), 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated when it started.

    On CUDA, the caching allocator's peak statistic. On CPU, which keeps no such statistic, the
    profiler's memory timeline: every tensor allocation and free through torch's allocator (those
    made inside native kernels included; a kernel's private ``std::vector`` scratch is not).
    """
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    # record_shapes gives each tensor its own key in the timeline, so the frees of tensors that
    # existed before fn (the previous step's gradients) can be told from those of fn's own.
    with _quiet_fds(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        fn()
    live = peak = 0
    created: collections.Counter = collections.Counter()
    for _, action, (key, _version), size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if action == Action.CREATE:
            created[key] += 1
            live += size
        elif action == Action.DESTROY and created[key] > 0:
            created[key] -= 1
            live -= size
        peak = max(peak, live)
    return peak


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def check_close(results: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float, rtol: float) -> tuple[bool, float]:
    """Whether every result is within ``atol + rtol * |expected|``, and the largest scaled error."""
    worst = 0.0
    for name, actual in results.items():
        ref = expected[name].double()
        err = (actual.double() - ref).abs() / (atol + rtol * ref.abs())
        worst = max(worst, err.max().item() if err.numel() else 0.0)
    return worst <= 1.0 and math.isfinite(worst), worst


def write_csv(rows: Iterable[Row], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def machine() -> dict:
    """CPU model, logical cores, memory in GiB and CUDA devices of this machine."""
    cpu = platform.processor() or platform.machine()
    memory_gib = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        memory_gib = round(kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass  # not Linux: the platform's name for the CPU and no memory figure
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_GiB": memory_gib, "gpus": gpus}


def versions() -> dict:
    """Versions of python, torch and, where installed, triton, transformers and peft; deltakern's."""
    from .. import __version__

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "peft"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    found["deltakern"] = __version__
    return found


_CaseProvider = tuple[str, str, str]  # (op, shape, provider)


def _full_step_rows(results: Iterable[Result]) -> dict[_CaseProvider, Result]:
    """(op, shape, provider) -> the full step's timing row, in run order."""
    return {(r.row.op, r.row.shape, r.row.provider): r for r in results if r.row.metric == "ms" and r.row.mode == "full"}


def _full_step_ratios(full: dict[_CaseProvider, Result]) -> dict[_CaseProvider, tuple[float | None, float | None]]:
    """For the rows of :func:`_full_step_rows`: the full step's median over ``reference``'s and over
    the case's floor's (its first provider, where that is not the reference); None where there is none."""
    floors: dict[tuple[str, str], str] = {}
    for op, shape, provider in full:
        floors.setdefault((op, shape), provider)
    ratios = {}
    for (op, shape, provider), timed in full.items():
        ms = timed.row.p50
        reference = full.get((op, shape, "reference"))
        floor = floors[(op, shape)]
        ratios[(op, shape, provider)] = (ms / reference.row.p50 if reference else None,
                                         ms / full[(op, shape, floor)].row.p50 if floor != "reference" else None)
    return ratios


def ratio_results(results: Iterable[Result]) -> list[Result]:
    """The full step's ratios as result rows for the CSV: metric ``ratio_to_reference`` and, where
    the case has a floor provider, ``ratio_to_floor`` (the ratio of medians in p20, p50 and p80
    alike, as the memory rows repeat their one figure)."""
    full = _full_step_rows(results)
    found = []
    for key, ratios in _full_step_ratios(full).items():
        timed = full[key]
        for metric, ratio in zip(("ratio_to_reference", "ratio_to_floor"), ratios):
            if ratio is not None:
                row = dataclasses.replace(timed.row, metric=metric, p20=ratio, p50=ratio, p80=ratio)
                found.append(Result(row, timed.ok, timed.detail))
    return found


def summarize(results: Iterable[Result]) -> list[dict]:
    """One entry per (op, shape, provider) in run order: median ms of each mode, the full step's
    ratio to ``reference`` and to the case's floor (its first provider, where that is not the
    reference; else None), saved and peak MB, tokens/s where the op has it, and the check."""
    results = list(results)
    entries: dict[tuple[str, str, str], dict] = {}
    for r in results:
        row = r.row
        entry = entries.setdefault((row.op, row.shape, row.provider), {
            "op": row.op, "shape": row.shape, "provider": row.provider, "dtype": row.dtype, "device": row.device,
            "check": "ok" if r.ok else "FAIL", "detail": r.detail, "tokens_per_s": None})
        key = f"{row.mode}_ms" if row.metric == "ms" else row.metric
        entry[key] = row.p50
    for key, (to_reference, to_floor) in _full_step_ratios(_full_step_rows(results)).items():
        entries[key]["ratio_to_reference"], entries[key]["ratio_to_floor"] = to_reference, to_floor
    return list(entries.values())


MODES = ("fwd", "bwd", "full")


@dataclass
class Result:
    row: Row
    ok: bool = True
    detail: str = ""


# In bf16 and fp16 a provider passes when its scaled error is within the fixed tolerance or at most
# twice the reference's (PEFT's way, in the same dtype), as FlashAttention judges its low-precision
# kernels against the reference's own error: at M=2048, 1024² the bf16 LoRA of PEFT's way is
# itself 1.5-3x beyond the fixed 5e-2 against fp64.
LOW_PRECISION_FACTOR = 2.0


def _judge_checks(worst_errors: dict[str, tuple[bool, float]], dtype: torch.dtype) -> dict[str, tuple[bool, str]]:
    """(ok, detail) of each provider from its case check's (ok, worst scaled error)."""
    reference = worst_errors.get("reference")
    relative = dtype in (torch.bfloat16, torch.float16) and reference is not None and math.isfinite(reference[1])
    checks = {}
    for provider, (ok, worst) in worst_errors.items():
        detail = f"max scaled error {worst:.3g}"
        if relative and not ok:
            bound = LOW_PRECISION_FACTOR * reference[1]
            ok = provider == "reference" or worst <= bound
            detail += f" (reference {reference[1]:.3g}; bound {bound:.3g})"
        checks[provider] = (ok, detail)
    return checks


def _run_case(op: str, case, backends: list[str], warmup: int, repeats: int, with_compile: bool,
              progress: Callable[[str], None]) -> list[Result]:
    """run_cases for one case."""
    results: list[Result] = []
    shape, device = str(case.shape), case.device
    dtype_name = str(case.dtype).removeprefix("torch.")
    providers = case.providers(backends, with_compile)
    worst_errors = {}
    for provider, fn in providers.items():
        progress(f"{op} {shape}: checking {provider}")
        worst_errors[provider] = case.check(provider, fn)
    checks = _judge_checks(worst_errors, case.dtype)
    tokens = getattr(case, "tokens", None)
    for mode in MODES:
        progress(f"{op} {shape}: timing {mode}")
        timings = time_interleaved({p: case.run_mode(p, fn, mode) for p, fn in providers.items()},
                                   warmup=getattr(case, "warmup", warmup), repeats=getattr(case, "repeats", repeats),
                                   device=device)
        for provider, (p20, p50, p80) in timings.items():
            results.append(Result(Row(op, provider, mode, shape, dtype_name, device, "ms", p20, p50, p80), *checks[provider]))
            if tokens and mode == "full":
                rates = [tokens / (ms / 1e3) for ms in (p80, p50, p20)]
                results.append(Result(Row(op, provider, mode, shape, dtype_name, device, "tokens_per_s", *rates), *checks[provider]))
    for provider, fn in providers.items():
        progress(f"{op} {shape}: memory of {provider}")
        step, _ = case.run_mode(provider, fn, "full")
        metrics = [("saved_MB", case.saved_bytes(fn)), ("peak_MB", peak_bytes(step, device))]
        if hasattr(case, "weight_bytes"):
            metrics.append(("weight_MB", case.weight_bytes(provider)))
        for metric, nbytes in metrics:
            mb = nbytes / 2**20
            results.append(Result(Row(op, provider, "full", shape, dtype_name, device, metric, mb, mb, mb), *checks[provider]))
    return results


def run_cases(op: str, cases: Iterable, backends: Iterable[str], warmup: int, repeats: int, with_compile: bool = True,
              progress: Callable[[str], None] = lambda s: None) -> list[Result]:
    """Check each provider of each case once against fp64, then time all providers of a case
    interleaved, per mode, and count their bytes saved for backward and the peak memory of a step.

    A case offers ``shape``, ``dtype``, ``device``, ``providers(backends, with_compile)`` (name ->
    callable, the baseline first), ``check(provider, fn) -> (ok, worst scaled error)``,
    ``run_mode(provider, fn, mode) -> (timed, setup)`` and ``saved_bytes(fn)``. Optionally:
    ``weight_bytes(provider)`` (the bytes of the base weight that provider reads: a ``weight_MB``
    row, for cases whose providers store the weight differently),
    ``warmup`` and ``repeats`` (replacing the arguments for that case: a training step of the
    end-to-end suite takes seconds) and ``tokens`` (tokens per step: adds a ``tokens_per_s`` row
    for the full step, its p20 from the p80 time and so on). Cases may come from a generator: each
    is dropped before the next one is built.
    """
    results: list[Result] = []
    backends = list(backends)
    for case in cases:
        results += _run_case(op, case, backends, warmup, repeats, with_compile, progress)
        del case  # the loop's next() builds the next case: hold no reference to this one then
    return results


def failures(results: Iterable[Result]) -> list[Result]:
    """One failed result per (op, provider, shape): a provider's check covers all of its rows."""
    found: dict[tuple[str, str, str], Result] = {}
    for r in results:
        if not r.ok:
            found.setdefault((r.row.op, r.row.provider, r.row.shape), r)
    return list(found.values())


def read_csv(path: str) -> list[dict]:
    """The rows of a CSV written by :func:`write_csv`, p20/p50/p80 as floats."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for q in ("p20", "p50", "p80"):
            row[q] = float(row[q])
    return rows


def load_shapes(path: str, shape_types: dict[str, type]) -> dict[str, tuple]:
    """The shapes of a ``--shapes`` JSON file: ``{"lora": [{"m": 2048, ...}, ...], ...}``.

    ``shape_types`` maps each op the file may name to its shape dataclass; each object must give
    every field without a default, and only known fields. Field types follow the annotations:
    ``int`` fields take integers >= 1, ``float`` numbers, ``bool`` true/false, ``str`` strings.
    Raises ``ValueError`` naming the file, and the op, entry and field at fault.
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"--shapes {path}: cannot read it: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"--shapes {path}: not valid JSON: {e}") from e
    if not isinstance(data, dict) or not data:
        raise ValueError(f"--shapes {path}: expected a JSON object mapping ops ({', '.join(shape_types)}) to lists of shapes")
    found = {}
    for op, entries in data.items():
        if op not in shape_types:
            raise ValueError(f"--shapes {path}: unknown op {op!r}; expected one of {', '.join(shape_types)}")
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"--shapes {path}: {op!r} must be a non-empty list of objects")
        cls = shape_types[op]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = [name for name, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        shapes = []
        for i, entry in enumerate(entries):
            where = f"--shapes {path}: {op}[{i}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected an object with fields {', '.join(fields)}")
            unknown = [k for k in entry if k not in fields]
            if unknown:
                raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; expected {', '.join(fields)}")
            missing = [k for k in required if k not in entry]
            if missing:
                raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
            for name, value in entry.items():
                _check_field(where, name, fields[name].type, value)
            try:
                shapes.append(cls(**entry))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from e
        found[op] = tuple(shapes)
    return found


def _check_field(where: str, name: str, kind: str, value) -> None:
    kind = kind if isinstance(kind, str) else kind.__name__
    ok = {"int": isinstance(value, int) and not isinstance(value, bool) and value >= 1,
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool),
          "str": isinstance(value, str)}[kind]
    if not ok:
        wanted = {"int": "an integer >= 1", "float": "a number", "bool": "true or false", "str": "a string"}[kind]
        raise ValueError(f"{where}: field {name!r} must be {wanted}, got {value!r}")


@dataclass(frozen=True)
class BenchSuite:
    """What ``deltakern bench`` needs of one op's (or the end-to-end step's) cases.

    name: the op column of its CSV rows and the CSV's file name. shape_type: the dataclass of its
    shapes (``--shapes`` files are checked against its fields). default_shapes: a tuple, or
    ``{device: tuple}`` where the defaults differ by device. case(shape, dtype, device): one case
    of :func:`run_cases`.
    """

    name: str
    shape_type: type
    default_shapes: tuple | dict[str, tuple]
    quick_shapes: tuple
    case: Callable

    def defaults(self, device: str) -> tuple:
        return self.default_shapes[device] if isinstance(self.default_shapes, dict) else self.default_shapes


# (atol, rtol) of an op case's check against fp64 math (check_close): fp32 kernels sum in another
# order than fp64; bf16 and fp16 keep 8 and 11 mantissa bits.
CHECK_TOLERANCES = {torch.float32: (1e-3, 1e-3), torch.bfloat16: (5e-2, 5e-2), torch.float16: (5e-2, 5e-2)}


def op_providers(baselines: dict[str, Callable], reference: Callable, deltakern: Callable[[str], Callable],
                 backends: Iterable[str], with_compile: bool) -> dict[str, Callable]:
    """The providers of an op case, in the order the tables show them: its ``baselines`` (the floor
    it is measured against, first), ``reference`` (the eager way PEFT and HF run it),
    ``torch.compile`` of the reference, and ``deltakern-<backend>`` for each of ``backends``, where
    ``deltakern(backend)`` is the op's call with that backend forced."""
    found = {**baselines, "reference": reference}
    if with_compile:
        found["torch.compile"] = torch.compile(reference)
    for backend in backends:
        found[f"deltakern-{backend}"] = deltakern(backend)
    return found


def with_backend(backend: str, fn: Callable) -> Callable:
    """``fn`` with deltakern's ops forced to ``backend`` while it runs."""
    from ..backend import use_backend

    def run(*args):
        with use_backend(backend):
            return fn(*args)

    return run
