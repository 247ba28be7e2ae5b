"""``deltakern info`` and ``deltakern bench``."""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from . import __version__, _native
from .backend import BACKENDS, availability, forced_backend


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


_OPS = ("lora", "prefix", "adapter")
_DEFAULT_OPS = ("lora", "prefix", "adapter")


def _bench(args) -> int:
    from . import benchmark

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("deltakern bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in _OPS]
    if unknown:
        print(f"deltakern bench: unknown op(s) {', '.join(unknown)}; choose from {', '.join(_OPS)}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    if args.backend:
        backends = [args.backend]
    else:
        # Triton on CPU tensors is its interpreter: a correctness tool, not a contender.
        backends = [b for b, state in availability(device).items()
                    if state == "available" and b != "reference" and not (b == "triton" and device == "cpu")]
    warmup, repeats = (1, 3) if args.quick else (3, 15)
    suites = {
        "lora": ("lora_linear", benchmark.lora_cases(
            benchmark.LORA_QUICK_SHAPES if args.quick else benchmark.LORA_DEFAULT_SHAPES, dtype, device)),
        "prefix": ("prefix_attention", benchmark.prefix_cases(
            benchmark.PREFIX_QUICK_SHAPES if args.quick else benchmark.PREFIX_DEFAULT_SHAPES, dtype, device)),
        "adapter": ("adapter", benchmark.adapter_cases(
            benchmark.ADAPTER_QUICK_SHAPES if args.quick else benchmark.ADAPTER_DEFAULT_SHAPES, dtype, device)),
    }
    print(f"deltakern bench: {', '.join(ops)} on {device} {args.dtype}; deltakern backends: {', '.join(backends) or 'none'}; "
          f"median of {repeats} interleaved repeats", flush=True)
    failed = 0
    for op in ops:
        name, cases = suites[op]
        results = benchmark.run_cases(name, cases, backends, warmup, repeats, with_compile=not args.no_compile,
                                      progress=lambda s: print(f"  ... {s}", file=sys.stderr, flush=True))
        _print_table(results)
        path = os.path.join(args.out, f"{name}.csv")
        benchmark.write_csv((r.row for r in results), path)
        print(f"wrote {path}\n")
        for r in results:
            if not r.ok and r.row.metric == "saved_MB":
                failed += 1
                print(f"FAIL {r.row.op} {r.row.provider} {r.row.shape}: {r.detail}", file=sys.stderr)
    return 1 if failed else 0


def _print_table(results) -> None:
    """One line per (shape, provider, mode): median, ratio to PEFT's way (``reference``) and to the
    case's first provider (its floor); for the full step the bytes saved for backward and the
    peak memory; and the check."""
    from .benchmark import MODES

    providers = list(dict.fromkeys(r.row.provider for r in results))
    by_key = {(r.row.shape, r.row.provider, r.row.mode, r.row.metric): r for r in results}
    header = f"{'shape':<36} {'provider':<18} {'mode':<5} {'p50 ms':>9} {'x ref':>6} {'x base':>7} {'saved MB':>9} {'peak MB':>8}  check"
    print(header)
    print("-" * len(header))
    timed = [r for r in results if r.row.metric == "ms"]
    timed.sort(key=lambda r: (r.row.shape, providers.index(r.row.provider), MODES.index(r.row.mode)))
    for r in timed:
        row = r.row
        ref = by_key[(row.shape, "reference", row.mode, "ms")]
        base = by_key[(row.shape, providers[0], row.mode, "ms")]
        memory = " " * 18
        if row.mode == "full":
            saved = by_key[(row.shape, row.provider, "full", "saved_MB")].row.p50
            peak = by_key[(row.shape, row.provider, "full", "peak_MB")].row.p50
            memory = f"{saved:9.2f} {peak:8.2f}"
        print(f"{row.shape:<36} {row.provider:<18} {row.mode:<5} {row.p50:9.2f} "
              f"{row.p50 / ref.row.p50:6.2f} {row.p50 / base.row.p50:7.2f} {memory}  {'ok' if r.ok else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deltakern", description="Fused kernels for parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backends and how deltakern._C was built").set_defaults(run=_info)
    bench = sub.add_parser("bench", help="time every provider against the reference, checking each result")
    bench.add_argument("--ops", default=",".join(_DEFAULT_OPS),
                       help=f"comma-separated ops among {','.join(_OPS)} (default {','.join(_DEFAULT_OPS)})")
    bench.add_argument("--quick", action="store_true", help="small shapes and few repeats (seconds)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    bench.add_argument("--backend", choices=BACKENDS, help="time only this deltakern backend")
    bench.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the reference")
    bench.add_argument("--out", default="deltakern-bench", help="directory for the CSV (default ./deltakern-bench)")
    bench.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
