"""The benchmark harness: medians of repeated timings, results checked against the reference in
the same run, and tidy CSV rows (DESIGN.md, "Benchmarks").

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
    git_sha: str = field(default_factory=lambda: _GIT_SHA)
    timestamp: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def _versions() -> str:
    parts = [f"torch={torch.__version__}"]
    try:
        import triton

        parts.append(f"triton={triton.__version__}")
    except ImportError:
        pass
    from . import __version__

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
_GIT_SHA = git_sha()


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


def saved_tensors_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the unique storages autograd saves while ``fn()`` runs, minus those of ``exclude``.

    Storages are keyed by data pointer, so a view of the caller's tensor counts as that tensor.
    ``exclude`` takes tensors kept by reference anyway (frozen weights).
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
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
    from . import __version__

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "peft"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    found["deltakern"] = __version__
    return found


def summarize(results: Iterable[Result]) -> list[dict]:
    """One entry per (op, shape, provider) in run order: median ms of each mode, the full step's
    ratio to ``reference``, saved and peak MB, tokens/s where the op has it, and the check."""
    entries: dict[tuple[str, str, str], dict] = {}
    for r in results:
        row = r.row
        entry = entries.setdefault((row.op, row.shape, row.provider), {
            "op": row.op, "shape": row.shape, "provider": row.provider, "dtype": row.dtype, "device": row.device,
            "check": "ok" if r.ok else "FAIL", "detail": r.detail, "tokens_per_s": None})
        key = f"{row.mode}_ms" if row.metric == "ms" else row.metric
        entry[key] = row.p50
    for (op, shape, _), entry in entries.items():
        reference = entries.get((op, shape, "reference"))
        entry["ratio_to_reference"] = entry["full_ms"] / reference["full_ms"] if reference else None
    return list(entries.values())


MODES = ("fwd", "bwd", "full")


@dataclass
class Result:
    row: Row
    ok: bool = True
    detail: str = ""


def run_cases(op: str, cases: Iterable, backends: Iterable[str], warmup: int, repeats: int, with_compile: bool = True,
              progress: Callable[[str], None] = lambda s: None) -> list[Result]:
    """Check each provider of each case once against fp64, then time all providers of a case
    interleaved, per mode, and count their bytes saved for backward and the peak memory of a step.

    A case offers ``shape``, ``dtype``, ``device``, ``providers(backends, with_compile)`` (name ->
    callable, the baseline first), ``check(provider, fn) -> (ok, worst scaled error)``,
    ``run_mode(provider, fn, mode) -> (timed, setup)`` and ``saved_bytes(fn)``. Optionally:
    ``warmup`` and ``repeats`` (replacing the arguments for that case: a training step of the
    end-to-end suite takes seconds) and ``tokens`` (tokens per step: adds a ``tokens_per_s`` row
    for the full step, its p20 from the p80 time and so on).
    """
    results: list[Result] = []
    backends = list(backends)
    for case in cases:
        shape, device = str(case.shape), case.device
        dtype_name = str(case.dtype).removeprefix("torch.")
        providers = case.providers(backends, with_compile)
        checks = {}
        for provider, fn in providers.items():
            progress(f"{op} {shape}: checking {provider}")
            ok, worst = case.check(provider, fn)
            checks[provider] = (ok, f"max scaled error {worst:.3g}")
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
            for metric, nbytes in (("saved_MB", case.saved_bytes(fn)), ("peak_MB", peak_bytes(step, device))):
                mb = nbytes / 2**20
                results.append(Result(Row(op, provider, "full", shape, dtype_name, device, metric, mb, mb, mb), *checks[provider]))
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


# --------------------------------------------------------------------------------------------
# lora_linear
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraShape:
    m: int
    in_features: int
    out_features: int
    r: int
    dropout_p: float

    def __post_init__(self):
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"LoraShape: dropout_p must be in [0, 1), got {self.dropout_p}")

    def __str__(self) -> str:
        return f"M={self.m},in={self.in_features},out={self.out_features},r={self.r},p={self.dropout_p:g}"


# A small layer (a BERT-base projection over 512 tokens), where per-call overhead shows, and a
# large one with dropout on and off (the dropout mask is LoRA's largest cost after the GEMMs).
LORA_DEFAULT_SHAPES = (LoraShape(512, 768, 768, 16, 0.1), LoraShape(2048, 1024, 1024, 16, 0.1),
                       LoraShape(2048, 1024, 1024, 16, 0.0))
LORA_QUICK_SHAPES = (LoraShape(256, 256, 256, 8, 0.1),)
_CHECK_SEED = 20240917


class LoraCase:
    """Inputs of one shape and the providers that compute the same LoRA layer.

    Providers: ``frozen-linear`` (the base ``F.linear`` alone, dx only in backward: the floor the
    LoRA overhead is measured against), ``reference`` (PEFT's way: a Dropout module, two linears,
    a scale, an add), ``torch.compile`` of that reference, and ``deltakern-<backend>``.
    """

    def __init__(self, shape: LoraShape, dtype: torch.dtype, device: str, scaling: float = 2.0):
        g = torch.Generator(device="cpu").manual_seed(0)
        s = shape

        def randn(*size, scale=1.0):
            return (torch.randn(*size, generator=g) * scale).to(dtype=dtype, device=device)

        self.shape, self.dtype, self.device, self.scaling = shape, dtype, device, scaling
        self.x = randn(s.m, s.in_features).requires_grad_(True)
        self.weight = randn(s.out_features, s.in_features, scale=s.in_features**-0.5)
        self.bias = randn(s.out_features)
        self.lora_A = randn(s.r, s.in_features, scale=s.in_features**-0.5).requires_grad_(True)
        self.lora_B = randn(s.out_features, s.r, scale=s.r**-0.5).requires_grad_(True)
        self.grad_out = randn(s.m, s.out_features)
        self.dropout = torch.nn.Dropout(s.dropout_p)

    # providers: callables x -> y that read the layer's weights from the case
    def frozen_linear(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def peft_way(self, x):
        F = torch.nn.functional
        result = F.linear(x, self.weight, self.bias)
        return result + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def deltakern(self, backend: str, seed: int | None = None):
        from .backend import use_backend
        from .ops.lora_linear import lora_linear

        def run(x):
            with use_backend(backend):
                return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.shape.dropout_p, seed)

        return run

    def providers(self, backends: Iterable[str], with_compile: bool = True) -> dict[str, Callable]:
        found = {"frozen-linear": self.frozen_linear, "reference": self.peft_way}
        if with_compile:
            # fallback_random: inductor draws dropout with eager's RNG, so the check below can
            # rebuild the mask the compiled graph used.
            import torch._inductor.config as inductor_config

            inductor_config.fallback_random = True
            found["torch.compile"] = torch.compile(self.peft_way)
        for backend in backends:
            found[f"deltakern-{backend}"] = self.deltakern(backend)
        return found

    def params(self, provider: str) -> list[torch.Tensor]:
        return [self.x] if provider == "frozen-linear" else [self.x, self.lora_A, self.lora_B]

    def check(self, provider: str, fn: Callable) -> tuple[bool, float]:
        """Run ``fn`` once and compare output and gradients with fp64 math on the same mask."""
        params = self.params(provider)
        for p in params:
            p.grad = None
        if provider.startswith("deltakern-"):
            fn = self.deltakern(provider.removeprefix("deltakern-"), seed=_CHECK_SEED)
            mask = None
        else:
            torch.manual_seed(_CHECK_SEED)
        out = fn(self.x)
        out.backward(self.grad_out)
        results = {"out": out.detach(), **{f"d{i}": p.grad.detach().clone() for i, p in enumerate(params)}}
        for p in params:
            p.grad = None
        if provider.startswith("deltakern-"):
            from .reference.philox import dropout_keep_mask

            mask = dropout_keep_mask(_CHECK_SEED, self.shape.m, self.shape.in_features, self.shape.dropout_p, device=self.device) if self.shape.dropout_p else None
        elif self.shape.dropout_p and provider != "frozen-linear":
            torch.manual_seed(_CHECK_SEED)
            mask = self.dropout(torch.ones_like(self.x)) != 0
        else:
            mask = None
        expected = self._expected64(params, mask, lora=provider != "frozen-linear")
        atol, rtol = (1e-3, 1e-3) if self.dtype == torch.float32 else (5e-2, 5e-2)
        return check_close(results, expected, atol, rtol)

    def _expected64(self, params, mask, lora: bool) -> dict[str, torch.Tensor]:
        leaves = {id(p): p.detach().double().requires_grad_(True) for p in params}
        x, a, b = (leaves.get(id(t), t.detach().double()) for t in (self.x, self.lora_A, self.lora_B))
        F = torch.nn.functional
        out = F.linear(x, self.weight.double(), self.bias.double())
        if lora:
            dropped = x if mask is None else x * mask / (1.0 - self.shape.dropout_p)
            out = out + self.scaling * F.linear(F.linear(dropped, a), b)
        out.backward(self.grad_out.double())
        return {"out": out.detach(), **{f"d{i}": leaves[id(p)].grad for i, p in enumerate(params)}}

    def run_mode(self, provider: str, fn: Callable, mode: str) -> tuple[Callable, Callable | None]:
        return backward_modes(lambda: fn(self.x), self.params(provider), self.grad_out, mode)

    def saved_bytes(self, fn: Callable) -> int:
        return saved_tensors_bytes(lambda: fn(self.x), exclude=(self.weight, self.bias, self.lora_A, self.lora_B))


def lora_cases(shapes: Iterable[LoraShape], dtype: torch.dtype, device: str) -> list[LoraCase]:
    return [LoraCase(shape, dtype, device) for shape in shapes]


# --------------------------------------------------------------------------------------------
# ia3_linear
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ia3Shape:
    m: int
    in_features: int
    out_features: int
    scale_input: bool

    def __str__(self) -> str:
        where = "input" if self.scale_input else "output"
        return f"M={self.m},in={self.in_features},out={self.out_features},{where} scale"


# A Llama-style layer over 2048 tokens: the key/value projection with an output scale, and the
# FFN's down projection (intermediate 2816 = 2.75 x 1024) with an input scale.
IA3_DEFAULT_SHAPES = (Ia3Shape(2048, 1024, 1024, False), Ia3Shape(2048, 2816, 1024, True))
IA3_QUICK_SHAPES = (Ia3Shape(256, 256, 128, False), Ia3Shape(256, 256, 128, True))


class Ia3Case:
    """Inputs of one shape and the providers that compute the same (IA)³ layer, weight frozen.

    Providers: ``frozen-linear`` (the base ``F.linear`` alone: the floor), ``reference`` (PEFT's
    way: the linear, then ``* l`` as a pass of its own; or ``x * l`` before the linear),
    ``torch.compile`` of that reference, and ``deltakern-<backend>``. x and the scale train.
    """

    def __init__(self, shape: Ia3Shape, dtype: torch.dtype, device: str):
        g = torch.Generator(device="cpu").manual_seed(0)
        s = shape

        def randn(*size, scale=1.0, shift=0.0):
            return (torch.randn(*size, generator=g) * scale + shift).to(dtype=dtype, device=device)

        self.shape, self.dtype, self.device = shape, dtype, device
        self.x = randn(s.m, s.in_features).requires_grad_(True)
        self.weight = randn(s.out_features, s.in_features, scale=s.in_features**-0.5)
        self.bias = randn(s.out_features)
        size = s.in_features if s.scale_input else s.out_features
        self.scale = randn(size, scale=0.1, shift=1.0).requires_grad_(True)
        self.grad_out = randn(s.m, s.out_features)

    def frozen_linear(self, x, scale):
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def peft_way(self, x, scale):
        F = torch.nn.functional
        if self.shape.scale_input:
            return F.linear(x * scale, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) * scale

    def deltakern(self, backend: str):
        from .backend import use_backend
        from .ops.ia3_linear import ia3_linear

        def run(x, scale):
            with use_backend(backend):
                return ia3_linear(x, self.weight, self.bias, scale, scale_input=self.shape.scale_input)

        return run

    def providers(self, backends: Iterable[str], with_compile: bool = True) -> dict[str, Callable]:
        found = {"frozen-linear": self.frozen_linear, "reference": self.peft_way}
        if with_compile:
            found["torch.compile"] = torch.compile(self.peft_way)
        for backend in backends:
            found[f"deltakern-{backend}"] = self.deltakern(backend)
        return found

    def params(self, provider: str) -> list[torch.Tensor]:
        return [self.x] if provider == "frozen-linear" else [self.x, self.scale]

    def check(self, provider: str, fn: Callable) -> tuple[bool, float]:
        """Run ``fn`` once and compare output and gradients with fp64 math."""
        params = self.params(provider)
        for p in params:
            p.grad = None
        out = fn(self.x, self.scale)
        out.backward(self.grad_out)
        results = {"out": out.detach(), **{f"d{i}": p.grad.detach().clone() for i, p in enumerate(params)}}
        for p in params:
            p.grad = None
        leaves = [p.detach().double().requires_grad_(True) for p in params]
        x64 = leaves[0]
        scale64 = leaves[1] if len(leaves) > 1 else None
        F = torch.nn.functional
        weight64, bias64 = self.weight.double(), self.bias.double()
        if scale64 is None:
            expected_out = F.linear(x64, weight64, bias64)
        elif self.shape.scale_input:
            expected_out = F.linear(x64 * scale64, weight64, bias64)
        else:
            expected_out = F.linear(x64, weight64, bias64) * scale64
        expected_out.backward(self.grad_out.double())
        expected = {"out": expected_out.detach(), **{f"d{i}": p.grad for i, p in enumerate(leaves)}}
        atol, rtol = (1e-3, 1e-3) if self.dtype == torch.float32 else (5e-2, 5e-2)
        return check_close(results, expected, atol, rtol)

    def run_mode(self, provider: str, fn: Callable, mode: str) -> tuple[Callable, Callable | None]:
        return backward_modes(lambda: fn(self.x, self.scale), self.params(provider), self.grad_out, mode)

    def saved_bytes(self, fn: Callable) -> int:
        return saved_tensors_bytes(lambda: fn(self.x, self.scale), exclude=(self.weight, self.bias, self.scale))


def ia3_cases(shapes: Iterable[Ia3Shape], dtype: torch.dtype, device: str) -> list[Ia3Case]:
    return [Ia3Case(shape, dtype, device) for shape in shapes]


# --------------------------------------------------------------------------------------------
# prefix_attention
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefixShape:
    b: int
    hq: int
    hkv: int
    length: int
    p: int
    d: int
    causal: bool = True

    def __post_init__(self):
        if self.hq % self.hkv:
            raise ValueError(f"PrefixShape: hq ({self.hq}) must be a multiple of hkv ({self.hkv})")

    def __str__(self) -> str:
        return f"B={self.b},H={self.hq}/{self.hkv},L={self.length},P={self.p},D={self.d}{',causal' if self.causal else ''}"


# A short grouped-query case (4 query heads per key/value head) and a longer multi-head one.
PREFIX_DEFAULT_SHAPES = (PrefixShape(2, 8, 2, 128, 16, 64), PrefixShape(4, 8, 8, 512, 64, 64))
PREFIX_QUICK_SHAPES = (PrefixShape(2, 4, 2, 64, 8, 32),)


class PrefixCase:
    """Inputs of one shape and the providers that compute attention over a shared prefix.

    Providers: ``sdpa-no-prefix`` (``F.scaled_dot_product_attention`` with ``is_causal`` over the
    input alone: a lower bound that ignores the prefix), ``reference`` (PEFT's way: the prefix
    expanded over the batch, concatenated into K/V, a dense bool mask, SDPA), ``torch.compile`` of
    that reference, and ``deltakern-<backend>``.
    """

    GRADS = ("q", "k", "v", "prefix_k", "prefix_v")

    def __init__(self, shape: PrefixShape, dtype: torch.dtype, device: str):
        g = torch.Generator(device="cpu").manual_seed(0)
        s = shape

        def randn(*size):
            return torch.randn(*size, generator=g).to(dtype=dtype, device=device).requires_grad_(True)

        self.shape, self.dtype, self.device = shape, dtype, device
        self.q = randn(s.b, s.hq, s.length, s.d)
        self.k = randn(s.b, s.hkv, s.length, s.d)
        self.v = randn(s.b, s.hkv, s.length, s.d)
        self.prefix_k = randn(s.hkv, s.p, s.d)
        self.prefix_v = randn(s.hkv, s.p, s.d)
        self.grad_out = torch.randn(s.b, s.hq, s.length, s.d, generator=g).to(dtype=dtype, device=device)

    def inputs(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.GRADS]

    def sdpa_no_prefix(self, q, k, v, prefix_k, prefix_v):
        F = torch.nn.functional
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.shape.causal, enable_gqa=self.shape.hq != self.shape.hkv)

    def peft_way(self, q, k, v, prefix_k, prefix_v):
        b, length, p = self.shape.b, self.shape.length, self.shape.p
        keys = torch.cat([prefix_k.unsqueeze(0).expand(b, -1, -1, -1), k], dim=2)
        values = torch.cat([prefix_v.unsqueeze(0).expand(b, -1, -1, -1), v], dim=2)
        mask = torch.ones(b, 1, length, p + length, dtype=torch.bool, device=q.device)
        if self.shape.causal:
            mask[..., p:] = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        return torch.nn.functional.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, enable_gqa=self.shape.hq != self.shape.hkv)

    def deltakern(self, backend: str):
        from .backend import use_backend
        from .ops.prefix_attention import prefix_attention

        def run(q, k, v, prefix_k, prefix_v):
            with use_backend(backend):
                return prefix_attention(q, k, v, prefix_k, prefix_v, causal=self.shape.causal)

        return run

    def providers(self, backends: Iterable[str], with_compile: bool = True) -> dict[str, Callable]:
        found = {"sdpa-no-prefix": self.sdpa_no_prefix, "reference": self.peft_way}
        if with_compile:
            found["torch.compile"] = torch.compile(self.peft_way)
        for backend in backends:
            found[f"deltakern-{backend}"] = self.deltakern(backend)
        return found

    def params(self, provider: str) -> list[torch.Tensor]:
        return self.inputs()[:3] if provider == "sdpa-no-prefix" else self.inputs()

    def check(self, provider: str, fn: Callable) -> tuple[bool, float]:
        from .reference.prefix_attention import prefix_attention as reference

        params = self.params(provider)
        for t in params:
            t.grad = None
        out = fn(*self.inputs())
        out.backward(self.grad_out)
        results = {"out": out.detach(), **{f"d{i}": t.grad.detach().clone() for i, t in enumerate(params)}}
        for t in params:
            t.grad = None
        leaves = [t.detach().double().requires_grad_(True) for t in self.inputs()]
        if provider == "sdpa-no-prefix":  # the same attention with an empty prefix
            leaves[3], leaves[4] = leaves[3][:, :0], leaves[4][:, :0]
        expected_out = reference(*leaves, causal=self.shape.causal)
        expected_out.backward(self.grad_out.double())
        expected = {"out": expected_out.detach(), **{f"d{i}": leaves[i].grad for i in range(len(params))}}
        atol, rtol = (1e-3, 1e-3) if self.dtype == torch.float32 else (5e-2, 5e-2)
        return check_close(results, expected, atol, rtol)

    def run_mode(self, provider: str, fn: Callable, mode: str) -> tuple[Callable, Callable | None]:
        return backward_modes(lambda: fn(*self.inputs()), self.params(provider), self.grad_out, mode)

    def saved_bytes(self, fn: Callable) -> int:
        return saved_tensors_bytes(lambda: fn(*self.inputs()), exclude=(self.prefix_k, self.prefix_v))


def prefix_cases(shapes: Iterable[PrefixShape], dtype: torch.dtype, device: str) -> list[PrefixCase]:
    return [PrefixCase(shape, dtype, device) for shape in shapes]


# --------------------------------------------------------------------------------------------
# adapter
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterShape:
    m: int
    d: int
    r: int
    activation: str = "gelu"

    def __post_init__(self):
        from .reference.adapter import ACTIVATIONS

        if self.activation not in ACTIVATIONS:
            raise ValueError(f"AdapterShape: unknown activation {self.activation!r}; expected one of {', '.join(ACTIVATIONS)}")

    def __str__(self) -> str:
        return f"M={self.m},d={self.d},r={self.r},{self.activation}"


# Houlsby's BERT-base setting (d=768, bottleneck 64) over 512 tokens, and a wider layer over 4096.
ADAPTER_DEFAULT_SHAPES = (AdapterShape(512, 768, 64), AdapterShape(4096, 1024, 64))
ADAPTER_QUICK_SHAPES = (AdapterShape(256, 128, 16),)


class AdapterCase:
    """Inputs of one shape and the providers that compute the same bottleneck adapter.

    Providers: ``reference`` (as adapter libraries run it: a Linear down, the activation, a Linear
    up, a scale, the residual add), ``torch.compile`` of it, and ``deltakern-<backend>``. All
    weights are trainable; the residual is h.
    """

    PARAMS = ("h", "w_down", "b_down", "w_up", "b_up")
    SCALING = 0.5

    def __init__(self, shape: AdapterShape, dtype: torch.dtype, device: str):
        g = torch.Generator(device="cpu").manual_seed(0)
        s = shape

        def randn(*size, scale=1.0):
            return (torch.randn(*size, generator=g) * scale).to(dtype=dtype, device=device).requires_grad_(True)

        self.shape, self.dtype, self.device = shape, dtype, device
        self.h = randn(s.m, s.d)
        self.w_down = randn(s.r, s.d, scale=s.d**-0.5)
        self.b_down = randn(s.r)
        self.w_up = randn(s.d, s.r, scale=s.r**-0.5)
        self.b_up = randn(s.d)
        self.grad_out = torch.randn(s.m, s.d, generator=g).to(dtype=dtype, device=device)

    def inputs(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.PARAMS]

    def eager(self, h, w_down, b_down, w_up, b_up):
        from .reference.adapter import activation_fn

        F = torch.nn.functional
        up = F.linear(activation_fn(self.shape.activation)(F.linear(h, w_down, b_down)), w_up, b_up)
        return h + self.SCALING * up

    def deltakern(self, backend: str):
        from .backend import use_backend
        from .ops.adapter import adapter

        def run(h, w_down, b_down, w_up, b_up):
            with use_backend(backend):
                return adapter(h, w_down, b_down, w_up, b_up, activation=self.shape.activation, scaling=self.SCALING)

        return run

    def providers(self, backends: Iterable[str], with_compile: bool = True) -> dict[str, Callable]:
        found = {"reference": self.eager}
        if with_compile:
            found["torch.compile"] = torch.compile(self.eager)
        for backend in backends:
            found[f"deltakern-{backend}"] = self.deltakern(backend)
        return found

    def check(self, provider: str, fn: Callable) -> tuple[bool, float]:
        params = self.inputs()
        for t in params:
            t.grad = None
        out = fn(*params)
        out.backward(self.grad_out)
        results = {"out": out.detach(), **{f"d{name}": t.grad.detach().clone() for name, t in zip(self.PARAMS, params)}}
        for t in params:
            t.grad = None
        leaves = [t.detach().double().requires_grad_(True) for t in params]
        expected_out = self.eager(*leaves)
        expected_out.backward(self.grad_out.double())
        expected = {"out": expected_out.detach(), **{f"d{name}": t.grad for name, t in zip(self.PARAMS, leaves)}}
        atol, rtol = (1e-3, 1e-3) if self.dtype == torch.float32 else (5e-2, 5e-2)
        return check_close(results, expected, atol, rtol)

    def run_mode(self, provider: str, fn: Callable, mode: str) -> tuple[Callable, Callable | None]:
        return backward_modes(lambda: fn(*self.inputs()), self.inputs(), self.grad_out, mode)

    def saved_bytes(self, fn: Callable) -> int:
        return saved_tensors_bytes(lambda: fn(*self.inputs()), exclude=self.inputs()[1:])


def adapter_cases(shapes: Iterable[AdapterShape], dtype: torch.dtype, device: str) -> list[AdapterCase]:
    return [AdapterCase(shape, dtype, device) for shape in shapes]
