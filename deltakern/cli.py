"""``deltakern info`` and ``deltakern bench``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import time

import torch

from . import __version__, _native
from .backend import BACKENDS, availability, forced_backend
from .registry import op_by_cli_name, ops


def _info(_args) -> int:
    print(f"deltakern {__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})", end="")
    try:
        import triton

        print(f"  triton {triton.__version__}")
    except ImportError:
        print("  triton not installed")
    print(f"CUDA devices: {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    if _native.C is None:
        print(f"deltakern._C: not loaded: {_native.LOAD_ERROR}")
    else:
        archs = ", ".join(_native.cuda_archs()) or "none"
        print(f"deltakern._C: CPU kernels {'yes' if _native.has_cpu_kernels() else 'no'}, "
              f"CUDA kernels {'yes' if _native.has_cuda_kernels() else 'no'} (archs: {archs})")
    print(f"forced backend: {forced_backend() or 'none'}")
    for device in ("cpu", "cuda"):
        print(f"backends for {device} tensors:")
        for name, state in availability(device).items():
            print(f"  {name:<10} {state}")
    return 0


class _Progress:
    """A one-line progress bar on ``stream`` (stderr): ``[####------] 3/11 0:42 <label>``.

    On a terminal the line is redrawn in place, and anything written to stdout while the bar is
    active (``with bar:``) first clears it, so tables and the bar never share a line. Elsewhere (a
    CI log, a pipe) it never writes a carriage return or escape code: it prints one plain line per
    unit of work started (``advance``), or per label when there is no total.
    """

    def __init__(self, total: int | None, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.total, self.done, self.label = total, 0, ""
        self.started = time.perf_counter()
        self.drawn = False
        self._stdout = None

    def __enter__(self):
        self._stdout = sys.stdout
        sys.stdout = _ClearingWriter(self._stdout, self)
        return self

    def __exit__(self, *exc):
        self.clear()
        sys.stdout = self._stdout

    def _elapsed(self) -> str:
        seconds = int(time.perf_counter() - self.started)
        return f"{seconds // 60}:{seconds % 60:02d}"

    def __call__(self, label: str) -> None:
        """Shows what runs now."""
        self.label = label
        if self.tty:
            self._draw()
        elif self.total is None:
            print(f"  {self._elapsed()} {label}", file=self.stream, flush=True)

    def start(self, label: str) -> None:
        """Starts the next unit of work (``done + 1`` of ``total``)."""
        self.label = label
        if self.tty:
            self._draw()
        else:
            print(f"[{self.done + 1}/{self.total}] {self._elapsed()} {label}", file=self.stream, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self.tty:
            self._draw()

    def _draw(self) -> None:
        width = shutil.get_terminal_size((80, 24)).columns
        if self.total:
            filled = 20 * self.done // self.total
            head = f"[{'#' * filled}{'-' * (20 - filled)}] {self.done}/{self.total} {self._elapsed()} "
        else:
            head = f"{self._elapsed()} "
        self.stream.write("\r\033[K" + (head + self.label)[:width - 1])
        self.stream.flush()
        self.drawn = True

    def clear(self) -> None:
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = False

    def iterate(self, op: str, cases):
        """Yields ``cases``, starting a unit before each and advancing after it."""
        for case in cases:
            self.start(f"{op} {case.shape}")
            yield case
            self.advance()
            del case  # dropped before the next one is built (cases may be a generator)


class _ClearingWriter:
    """stdout while a progress bar is active: clears the bar before each write."""

    def __init__(self, stream, bar: _Progress):
        self._stream, self._bar = stream, bar

    def write(self, text: str) -> int:
        self._bar.clear()
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


E2E = "e2e"  # the end-to-end training step of every delta method: a suite, not an op
# The end-to-end suites, by --ops name: their modules (which need transformers and PEFT) are
# imported only when asked for. e2e-multi: many LoRA adapters in one batch.
E2E_SUITES = {E2E: "deltakern.benchmark.e2e", "e2e-multi": "deltakern.benchmark.e2e_multi"}


def _suite_names() -> list[str]:
    """The ``--ops`` names: every registered op's, in registry order, then the end-to-end suites."""
    return [spec.cli_name for spec in ops().values()] + list(E2E_SUITES)


def _suite(name: str):
    """The ``BenchSuite`` of ``--ops`` name ``name``."""
    if name in E2E_SUITES:
        return importlib.import_module(E2E_SUITES[name]).SUITE
    return op_by_cli_name(name).bench_module().SUITE


def _needed_modules(ops: list[str]) -> list[str]:
    """What a run of ``ops`` imports beyond deltakern's own dependencies: matplotlib for the
    charts, transformers and PEFT for the end-to-end models. Checked before anything is timed."""
    return ["matplotlib"] + (["transformers", "peft"] if any(op in E2E_SUITES for op in ops) else [])


def _bench(args) -> int:
    from .benchmark import harness

    started = time.perf_counter()
    for flag, given in (("--update-known-problems", args.update_known_problems),
                        ("--update-compile-records", args.update_compile_records)):
        if given and not args.gpu_report:
            print(f"deltakern bench: {flag} goes with --gpu-report", file=sys.stderr)
            return 2
    if args.gpu_report:
        from .gpu_report import run_gpu_report

        with _Progress(None) as bar:
            return run_gpu_report(args.out, progress=bar, update_known_problems=args.update_known_problems,
                                  update_compile_records=args.update_compile_records)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("deltakern bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    known = _suite_names()
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in known]
    if unknown or not ops:
        print(f"deltakern bench: unknown op(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}",
              file=sys.stderr)
        return 2
    missing = [name for name in _needed_modules(ops) if importlib.util.find_spec(name) is None]
    if missing:
        without_e2e = ",".join(op for op in known if op not in E2E_SUITES)
        print(f"deltakern bench: needs {', '.join(missing)}, not installed: pip install 'deltakern[bench]'"
              + (f" (or leave e2e out: --ops {without_e2e})" if "matplotlib" not in missing else ""), file=sys.stderr)
        return 2
    suites = {op: _suite(op) for op in ops}
    shapes = {op: suite.quick_shapes if args.quick else suite.defaults(device) for op, suite in suites.items()}
    if args.e2e_size == "large":
        if args.quick or E2E not in suites:
            print(f"deltakern bench: --e2e-size large sets the shapes of the e2e suite; "
                  f"{'leave out --quick' if args.quick else 'add e2e to --ops'}", file=sys.stderr)
            return 2
        from .benchmark.e2e import E2E_LARGE_SHAPES

        shapes[E2E] = E2E_LARGE_SHAPES
    if args.shapes:
        try:
            shape_types = {op: _suite(op).shape_type for op in known}
            shapes.update((op, found) for op, found in harness.load_shapes(args.shapes, shape_types).items()
                          if op in suites)
        except ValueError as e:
            print(f"deltakern bench: {e}", file=sys.stderr)
            return 2
    dtype = getattr(torch, args.dtype)
    if args.backend:
        backends = [args.backend]
    else:
        # Triton on CPU tensors is its interpreter: a correctness tool, not a contender.
        backends = [b for b, state in availability(device).items()
                    if state == "available" and b != "reference" and not (b == "triton" and device == "cpu")]
    warmup, repeats = (1, 3) if args.quick else (3, 15)
    os.makedirs(args.out, exist_ok=True)
    print(f"deltakern bench: {', '.join(ops)} on {device} {args.dtype}; deltakern backends: {', '.join(backends) or 'none'}; "
          f"median of {repeats} interleaved repeats (e2e: of fewer training steps)", flush=True)
    everything, csv_paths = [], []
    with _Progress(sum(len(s) for s in shapes.values())) as bar:
        for op in ops:
            suite = suites[op]
            # One case at a time, each dropped before the next is built: the cases of an op held
            # together (three models each) took the large e2e suite past 24 GiB, and the kernel
            # killed it in its third case.
            cases = (suite.case(shape, dtype, device) for shape in shapes[op])
            results = harness.run_cases(suite.name, bar.iterate(suite.name, cases), backends, warmup, repeats,
                                          with_compile=not args.no_compile, progress=bar)
            _print_table(results)
            path = os.path.join(args.out, f"{suite.name}.csv")
            harness.write_csv((r.row for r in results + harness.ratio_results(results)), path)
            csv_paths.append(path)
            print(f"wrote {path}\n", flush=True)
            everything += results
    failed = harness.failures(everything)
    for r in failed:
        print(f"FAIL {r.row.op} {r.row.provider} {r.row.shape}: {r.detail}", file=sys.stderr)
    from .plots import plot_run

    for path in plot_run(csv_paths, args.out):
        print(f"wrote {path}")
    summary = {
        "machine": harness.machine(),
        "versions": harness.versions(),
        "git_sha": harness.RUN_GIT_SHA,
        "args": {k: v for k, v in vars(args).items() if k not in ("command", "run")},
        "backends": backends,
        "warmup": warmup,
        "repeats": repeats,
        "wall_s": round(time.perf_counter() - started, 1),
        "failed": len(failed),
        "results": harness.summarize(everything),
    }
    path = os.path.join(args.out, "summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {path}")
    return 1 if failed else 0


def _print_table(results) -> None:
    """One line per (shape, provider, mode): median, ratio to PEFT's way (``reference``) and to the
    case's first provider (its floor); for the full step the bytes saved for backward and the
    peak memory, and the tokens per second where the op has them (e2e); and the check."""
    from .benchmark.harness import MODES

    shapes = list(dict.fromkeys(r.row.shape for r in results))
    providers = list(dict.fromkeys(r.row.provider for r in results))
    by_key = {(r.row.shape, r.row.provider, r.row.mode, r.row.metric): r for r in results}
    tokens = any(r.row.metric == "tokens_per_s" for r in results)
    tokens_column = f" {'tokens/s':>10}" if tokens else ""
    header = (f"{'shape':<36} {'provider':<18} {'mode':<5} {'p50 ms':>9} {'x ref':>6} {'x base':>7} {'saved MB':>9} "
              f"{'peak MB':>8}{tokens_column}  check")
    print(header)
    print("-" * len(header))
    timed = [r for r in results if r.row.metric == "ms"]
    timed.sort(key=lambda r: (shapes.index(r.row.shape), providers.index(r.row.provider), MODES.index(r.row.mode)))
    for r in timed:
        row = r.row
        ref = by_key[(row.shape, "reference", row.mode, "ms")]
        base = by_key[(row.shape, providers[0], row.mode, "ms")]
        memory = " " * 18 + (" " * 11 if tokens else "")
        if row.mode == "full":
            saved = by_key[(row.shape, row.provider, "full", "saved_MB")].row.p50
            peak = by_key[(row.shape, row.provider, "full", "peak_MB")].row.p50
            memory = f"{saved:9.2f} {peak:8.2f}"
            if tokens:
                memory += f" {by_key[(row.shape, row.provider, 'full', 'tokens_per_s')].row.p50:10.0f}"
        print(f"{row.shape:<36} {row.provider:<18} {row.mode:<5} {row.p50:9.2f} "
              f"{row.p50 / ref.row.p50:6.2f} {row.p50 / base.row.p50:7.2f} {memory}  {'ok' if r.ok else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deltakern", description="Fused kernels for parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backends and how deltakern._C was built").set_defaults(run=_info)
    bench = sub.add_parser("bench", help="time every provider against the reference, checking each result")
    names = ",".join(_suite_names())
    bench.add_argument("--ops", default=names, help=f"comma-separated ops among {names} (default: all of them)")
    bench.add_argument("--quick", action="store_true", help="small shapes and few repeats (seconds)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    bench.add_argument("--backend", choices=BACKENDS, help="time only this deltakern backend")
    bench.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the reference")
    bench.add_argument("--e2e-size", choices=("default", "large"), default="default",
                       help="the e2e model: the device's default, or large (hidden 1024, 8 layers, 4 x 512 tokens)")
    bench.add_argument("--shapes", metavar="FILE",
                       help='JSON file of shapes replacing the defaults of the ops it names, keyed by --ops name, '
                            'each a list of objects with the fields of that op\'s shape: '
                            '{"lora": [{"m": 2048, "in_features": 1024, ...}], "e2e": [...]}')
    bench.add_argument("--gpu-report", action="store_true",
                       help="instead of timing: the sm_80/sm_90 compile report of every GPU kernel (table and CSV)")
    bench.add_argument("--update-known-problems", action="store_true",
                       help="with --gpu-report: rewrite deltakern/triton_kernels/aot_known_problems.py from this "
                            "run's failing Triton rows")
    bench.add_argument("--update-compile-records", action="store_true",
                       help="with --gpu-report: rewrite deltakern/triton_kernels/aot_compile_records.json.gz (the "
                            "committed compile records a cold Triton cache starts from) from this run's compiles")
    bench.add_argument("--out", default="deltakern-bench",
                       help="directory for the CSVs, summary.json and PNG plots (default ./deltakern-bench)")
    bench.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
