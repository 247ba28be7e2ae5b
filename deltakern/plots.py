"""PNG charts of ``deltakern bench``, drawn from its tidy CSVs with matplotlib (Agg backend, so
no display is needed): per op, the median time of each provider by shape and mode with p20-p80
error bars; across ops, the bytes each provider saves for backward and the peak memory of a
full step.
"""

from __future__ import annotations

import os

from .benchmark.harness import MODES, read_csv

_MEMORY_METRICS = (("saved_MB", "saved for backward"), ("peak_MB", "peak of a step"))


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("deltakern's plots need matplotlib: pip install 'deltakern[bench]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(providers: list[str]) -> dict[str, str]:
    """One tab10 colour per provider, in order of first appearance, the same in every chart."""
    return {p: f"C{i % 10}" for i, p in enumerate(providers)}


def _unique(values) -> list:
    return list(dict.fromkeys(values))


def _grouped_bars(ax, groups: list[str], providers: list[str], colors: dict[str, str], value, spread=None,
                  labels: list[str] | None = None, note=None) -> None:
    """Bars of ``value(group, provider)`` (None leaves a gap) grouped by ``groups`` (shown as
    ``labels``), one bar per provider; ``spread(group, provider)`` gives (low, high) error bars and
    ``note(group, provider)`` a text written inside the bar (None for none)."""
    width = 0.8 / len(providers)
    for j, provider in enumerate(providers):
        xs, heights, errors = [], [], [[], []]
        for i, group in enumerate(groups):
            v = value(group, provider)
            if v is None:
                continue
            xs.append(i - 0.4 + (j + 0.5) * width)
            heights.append(v)
            if spread is not None:
                low, high = spread(group, provider)
                errors[0].append(v - low)
                errors[1].append(high - v)
            text = note(group, provider) if note is not None else None
            if text is not None:  # inside the bar: above it the text ran into the panel's title
                ax.text(xs[-1], v / 2, text, ha="center", va="center", fontsize=7, rotation=90)
        ax.bar(xs, heights, width, color=colors[provider], label=provider,
               yerr=errors if spread is not None and xs else None, capsize=2)
    ax.set_xticks(range(len(groups)), labels or groups)


def plot_times(csv_path: str, png_path: str, colors: dict[str, str] | None = None) -> str:
    """One chart of an op's CSV: a panel per shape, bars of the median ms per mode and provider,
    p20-p80 error bars; where the CSV has ``ratio_to_floor`` rows (e2e), each full-step bar is
    labelled with its ratio to the case's floor. Returns ``png_path``."""
    plt = _pyplot()
    everything = read_csv(csv_path)
    rows = [r for r in everything if r["metric"] == "ms"]
    to_floor = {(r["shape"], r["provider"]): r["p50"] for r in everything if r["metric"] == "ratio_to_floor"}
    if not rows:
        raise ValueError(f"{csv_path}: no timing rows (metric 'ms') to plot")
    op = rows[0]["op"]
    shapes = _unique(r["shape"] for r in rows)
    providers = _unique(r["provider"] for r in rows)
    colors = colors or _colors(providers)
    by_key = {(r["shape"], r["mode"], r["provider"]): r for r in rows}
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        def value(mode, provider, shape=shape):
            row = by_key.get((shape, mode, provider))
            return row["p50"] if row else None

        def spread(mode, provider, shape=shape):
            row = by_key[(shape, mode, provider)]
            return row["p20"], row["p80"]

        def note(mode, provider, shape=shape):
            ratio = to_floor.get((shape, provider)) if mode == "full" else None
            return f"{ratio:.2f}x floor" if ratio is not None else None

        _grouped_bars(ax, list(MODES), [p for p in providers if any((shape, m, p) in by_key for m in MODES)],
                      colors, value, spread, note=note)
        ax.set_title(shape, fontsize=8)
        ax.set_ylabel("median ms (p20-p80)")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 5), fontsize=8)
    first = rows[0]
    fig.suptitle(f"{op}: time by provider ({first['device']}, {first['dtype']})")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def plot_memory(csv_paths: list[str], png_path: str, colors: dict[str, str] | None = None) -> str:
    """One chart over the CSVs of several ops: a row per op, a panel per shape, bars of the MB
    each provider saves for backward and allocates at the peak of a full step. Returns ``png_path``."""
    plt = _pyplot()
    tables = []
    for path in csv_paths:
        rows = [r for r in read_csv(path) if r["metric"] in dict(_MEMORY_METRICS)]
        if rows:
            tables.append(rows)
    if not tables:
        raise ValueError(f"{', '.join(csv_paths)}: no memory rows (saved_MB, peak_MB) to plot")
    providers = _unique(r["provider"] for rows in tables for r in rows)
    colors = colors or _colors(providers)
    columns = max(len(_unique(r["shape"] for r in rows)) for rows in tables)
    fig, axes = plt.subplots(len(tables), columns, figsize=(4.5 * columns, 3.5 * len(tables)), squeeze=False)
    for axes_row, rows in zip(axes, tables):
        by_key = {(r["shape"], r["metric"], r["provider"]): r["p50"] for r in rows}
        shapes = _unique(r["shape"] for r in rows)
        for ax, shape in zip(axes_row, shapes):
            present = [p for p in providers if (shape, "saved_MB", p) in by_key]
            _grouped_bars(ax, [m for m, _ in _MEMORY_METRICS], present, colors,
                          lambda metric, provider, shape=shape: by_key.get((shape, metric, provider)),
                          labels=[text for _, text in _MEMORY_METRICS])
            ax.set_title(f"{rows[0]['op']} {shape}", fontsize=8)
            ax.set_ylabel("MB")
        for ax in axes_row[len(shapes):]:
            ax.set_visible(False)
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_legend_handles_labels()[0]}
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 5), fontsize=8)
    fig.suptitle("memory by provider: bytes saved for backward, peak of a full step")
    fig.tight_layout(rect=(0, 0.12 / len(tables), 1, 1))
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def plot_run(csv_paths: list[str], out_dir: str) -> list[str]:
    """``<op>_time.png`` for each CSV and ``memory.png`` over all of them, in ``out_dir``, with
    one colour per provider across the charts. Returns the paths written."""
    providers = _unique(r["provider"] for path in csv_paths for r in read_csv(path))
    colors = _colors(providers)
    written = []
    for path in csv_paths:
        name = os.path.splitext(os.path.basename(path))[0]
        written.append(plot_times(path, os.path.join(out_dir, f"{name}_time.png"), colors))
    written.append(plot_memory(csv_paths, os.path.join(out_dir, "memory.png"), colors))
    return written
