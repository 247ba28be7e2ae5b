"""The benchmark harness: medians of repeated timings, results checked against the reference in
the same run, and tidy CSV rows (DESIGN.md, "Benchmarks").

Row columns: op, provider, mode (fwd|bwd|full), shape, dtype, device, metric (ms|MB), p20, p50,
p80, versions, git_sha, timestamp. Times come from ``time.perf_counter`` on CPU and CUDA events
on GPU; bytes saved for backward are counted over unique storages with
``torch.autograd.graph.saved_tensors_hooks``.
"""

from __future__ import annotations

import csv
import datetime
import math
import os
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


def _git_sha() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_VERSIONS = _versions()
_GIT_SHA = _git_sha()


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(p20, p50, p80) of ``samples``."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return q[1], statistics.median(samples), q[7]


def time_ms(fn: Callable[[], object], *, setup: Callable[[], object] | None = None, warmup: int = 2, repeats: int = 10, device: str = "cpu") -> tuple[float, float, float]:
    """(p20, p50, p80) milliseconds of ``fn(setup())`` (or ``fn()``), after ``warmup`` untimed calls."""
    samples = []
    for i in range(warmup + repeats):
        arg = setup() if setup is not None else None
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn(arg) if setup is not None else fn()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn(arg) if setup is not None else fn()
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            samples.append(elapsed)
    return quantiles(samples)


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
