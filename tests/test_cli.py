"""The command line: ``deltakern info`` and ``deltakern bench``."""

import csv
import io
import json
import sys
import types
import weakref
from dataclasses import dataclass

import pytest
import torch

from deltakern import cli
from deltakern.benchmark import harness
from deltakern.benchmark.cases.adapter import AdapterCase
from deltakern.benchmark.cases.lora_linear import LoraCase
from deltakern.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_info_lists_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "deltakern._C: CPU kernels yes" in out
    for line in ("cpu        available", "reference  available", "cuda       it runs CUDA tensors only, got cpu tensors"):
        assert line in out


def test_bench_quick_writes_checked_rows(tmp_path, capsys):
    assert main(["bench", "--ops", "lora", "--quick", "--no-compile", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out
    with open(tmp_path / "lora_linear.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == harness.COLUMNS
    providers = {r["provider"] for r in rows}
    assert providers == {"frozen-linear", "reference", "deltakern-cpu"}
    assert {r["mode"] for r in rows if r["metric"] == "ms"} == {"fwd", "bwd", "full"}
    saved = {r["provider"]: float(r["p50"]) for r in rows if r["metric"] == "saved_MB"}
    # M=256, in=256, r=8 fp32: x (0.25 MB), xa (8 KB) and the 8-byte seed for deltakern;
    # PEFT's way adds drop(x) and its mask.
    assert saved["deltakern-cpu"] == pytest.approx(((256 * 256 + 256 * 8) * 4 + 8) / 2**20)
    assert saved["reference"] > 1.9 * saved["deltakern-cpu"]
    # A full step allocates at least y, dx and the two LoRA gradients (M x out, M x in, r x in, out x r).
    peak = {r["provider"]: float(r["p50"]) for r in rows if r["metric"] == "peak_MB"}
    least = (256 * 256 * 2 + 2 * 256 * 8) * 4 / 2**20
    assert least <= peak["deltakern-cpu"] < peak["reference"]


def test_bench_marks_a_wrong_result_and_fails(tmp_path, capsys, monkeypatch):
    original = LoraCase.peft_way
    monkeypatch.setattr(LoraCase, "peft_way", lambda self, x: original(self, x) * 1.01)
    assert main(["bench", "--ops", "lora", "--quick", "--no-compile", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    # One FAIL line per failed provider and shape, however many rows (3 modes, 2 memory metrics) it has.
    assert captured.err.count("FAIL lora_linear reference") == 1
    assert "FAIL lora_linear deltakern-cpu" not in captured.err
    table = [line.split() for line in captured.out.splitlines() if line.startswith("M=256")]
    assert {(cols[1], cols[-1]) for cols in table} == {("frozen-linear", "ok"), ("reference", "FAIL"), ("deltakern-cpu", "ok")}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed"] == 1
    assert {e["provider"]: e["check"] for e in summary["results"]} == {
        "frozen-linear": "ok", "reference": "FAIL", "deltakern-cpu": "ok"}


def test_bench_fails_on_a_failed_check_of_any_provider(tmp_path, capsys, monkeypatch):
    """A check failing for a baseline provider of the adapter op (not only PEFT's way) counts too."""
    original = AdapterCase.check
    monkeypatch.setattr(AdapterCase, "check",
                        lambda self, provider, fn: (False, 7.0) if provider == "deltakern-cpu" else original(self, provider, fn))
    assert main(["bench", "--ops", "adapter", "--quick", "--no-compile", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("FAIL adapter deltakern-cpu M=256,d=128,r=16,gelu: max scaled error 7") == 1
    assert err.count("FAIL ") == 1


def _csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_bench_writes_summary_and_plots_that_agree_with_the_csv(tmp_path, capsys):
    assert main(["bench", "--ops", "adapter", "--quick", "--no-compile", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("adapter.csv", "adapter_time.png", "memory.png", "summary.json"):
        assert f"wrote {tmp_path / name}" in out
    for png in ("adapter_time.png", "memory.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000  # bars, labels and a legend, not an empty canvas
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"machine", "versions", "git_sha", "args", "backends", "warmup", "repeats", "wall_s", "failed", "results"}
    assert set(summary["machine"]) == {"cpu", "cores", "torch_threads", "memory_GiB", "gpus"}
    assert summary["machine"]["cores"] >= 1 and summary["machine"]["cpu"]
    assert summary["versions"]["torch"] == torch.__version__
    assert summary["args"]["ops"] == "adapter" and summary["args"]["quick"] is True
    assert summary["git_sha"] == harness.RUN_GIT_SHA == harness.git_sha()
    assert (summary["warmup"], summary["repeats"], summary["failed"]) == (1, 3, 0)
    rows = _csv(tmp_path / "adapter.csv")
    medians = {(r["provider"], r["mode"], r["metric"]): float(r["p50"]) for r in rows}
    entries = {e["provider"]: e for e in summary["results"]}
    assert set(entries) == {"reference", "deltakern-cpu"}
    for provider, entry in entries.items():
        assert (entry["op"], entry["shape"], entry["check"]) == ("adapter", "M=256,d=128,r=16,gelu", "ok")
        for mode in ("fwd", "bwd", "full"):
            assert entry[f"{mode}_ms"] == pytest.approx(medians[(provider, mode, "ms")], rel=1e-12)
        assert entry["saved_MB"] == pytest.approx(medians[(provider, "full", "saved_MB")], rel=1e-12)
        assert entry["peak_MB"] == pytest.approx(medians[(provider, "full", "peak_MB")], rel=1e-12)
        assert entry["ratio_to_reference"] == pytest.approx(
            medians[(provider, "full", "ms")] / medians[("reference", "full", "ms")], rel=1e-12)
        assert entry["ratio_to_floor"] is None  # the adapter op has no floor provider
        assert entry["tokens_per_s"] is None


def _write(tmp_path, data) -> str:
    path = tmp_path / "shapes.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_bench_shapes_file_replaces_the_shapes_of_the_ops_it_names(tmp_path, capsys):
    shapes = _write(tmp_path, {"lora": [{"m": 64, "in_features": 48, "out_features": 32, "r": 4, "dropout_p": 0.0}],
                               "adapter": [{"m": 40, "d": 24, "r": 8, "activation": "silu"},
                                           {"m": 16, "d": 8, "r": 2}]})
    out_dir = tmp_path / "out"
    assert main(["bench", "--ops", "adapter", "--quick", "--no-compile", "--shapes", shapes, "--out", str(out_dir)]) == 0
    rows = _csv(out_dir / "adapter.csv")
    assert list(dict.fromkeys(r["shape"] for r in rows)) == ["M=40,d=24,r=8,silu", "M=16,d=8,r=2,gelu"]
    assert not (out_dir / "lora_linear.csv").exists()  # named in the file but not in --ops


@pytest.mark.parametrize("data, message", [
    ("{not json", "not valid JSON"),
    ([1, 2], "expected a JSON object mapping ops"),
    ({"lora2": [{}]}, "unknown op 'lora2'; expected one of lora, prefix, adapter, ia3, qlora, dora, multi-lora, e2e, e2e-multi"),
    ({"lora": {}}, "'lora' must be a non-empty list of objects"),
    ({"lora": [{"m": 64, "in_features": 48, "out_features": 32, "r": 4}]}, "lora[0]: missing field(s) dropout_p"),
    ({"adapter": [{"m": 8, "d": 8, "r": 2}, {"m": 8, "d": 8, "r": 2, "rank": 3}]}, "adapter[1]: unknown field(s) rank"),
    ({"prefix": [{"b": 1, "hq": 2, "hkv": 1, "length": 8, "p": 0, "d": 8}]}, "prefix[0]: field 'p' must be an integer >= 1, got 0"),
    ({"prefix": [{"b": 1, "hq": 3, "hkv": 2, "length": 8, "p": 2, "d": 8}]}, "prefix[0]: PrefixShape: hq (3) must be a multiple of hkv (2)"),
    ({"prefix": [{"b": 1, "hq": 2, "hkv": 1, "length": 8, "p": 2, "d": 8, "causal": 1}]}, "field 'causal' must be true or false, got 1"),
    ({"lora": [{"m": 8, "in_features": 8, "out_features": 8, "r": 2, "dropout_p": 1.5}]}, "LoraShape: dropout_p must be in [0, 1), got 1.5"),
    ({"adapter": [{"m": 8, "d": 8, "r": 2, "activation": "swish"}]}, "AdapterShape: unknown activation 'swish'"),
])
def test_bench_rejects_a_bad_shapes_file_naming_the_fault(tmp_path, capsys, data, message):
    path = _write(tmp_path, data)
    assert main(["bench", "--ops", "lora", "--quick", "--shapes", path, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"deltakern bench: --shapes {path}: " in err and message in err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_bench_rejects_a_missing_shapes_file(tmp_path, capsys):
    missing = str(tmp_path / "nope.json")
    assert main(["bench", "--shapes", missing, "--out", str(tmp_path)]) == 2
    assert f"--shapes {missing}: cannot read it: No such file or directory" in capsys.readouterr().err


@dataclass(frozen=True)
class _FakeE2EShape:
    method: str
    seq: int

    def __str__(self):
        return f"{self.method},seq={self.seq}"


class _FakeE2ECase:
    """A stand-in following the run_cases protocol with ``tokens``: out = x * 2, checked exactly."""

    def __init__(self, shape, dtype, device):
        self.shape, self.dtype, self.device = shape, dtype, device
        self.tokens = 4 * shape.seq
        self.warmup, self.repeats = 0, 2
        self.x = torch.ones(shape.seq, requires_grad=True)

    def providers(self, backends, with_compile=True):
        return {"reference": lambda x: x * 2, **{f"deltakern-{b}": (lambda x: x + x) for b in backends}}

    def check(self, provider, fn):
        return bool(torch.equal(fn(self.x), self.x * 2)), 0.0

    def run_mode(self, provider, fn, mode):
        if mode == "bwd":
            return (lambda y: y.sum().backward()), (lambda: fn(self.x))
        return (lambda: fn(self.x).sum().backward() if mode == "full" else fn(self.x)), None

    def saved_bytes(self, fn):
        return harness.saved_tensors_bytes(lambda: fn(self.x))


@pytest.fixture
def fake_e2e(monkeypatch):
    module = types.ModuleType("deltakern.benchmark.e2e")
    module.SUITE = harness.BenchSuite(
        "e2e", _FakeE2EShape, {"cpu": (_FakeE2EShape("lora", 64),), "cuda": (_FakeE2EShape("lora", 128),)},
        (_FakeE2EShape("lora", 8), _FakeE2EShape("adapter", 16)), _FakeE2ECase)
    monkeypatch.setitem(sys.modules, "deltakern.benchmark.e2e", module)
    monkeypatch.setattr("deltakern.benchmark.e2e", module, raising=False)
    return module


def test_bench_e2e_reports_tokens_per_second(tmp_path, capsys, fake_e2e):
    assert main(["bench", "--ops", "e2e", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = _csv(tmp_path / "e2e.csv")
    rates = {(r["shape"], r["provider"]): r for r in rows if r["metric"] == "tokens_per_s"}
    times = {(r["shape"], r["provider"]): r for r in rows if r["metric"] == "ms" and r["mode"] == "full"}
    assert set(rates) == set(times) == {(s, p) for s in ("lora,seq=8", "adapter,seq=16") for p in ("reference", "deltakern-cpu")}
    for key, rate in rates.items():
        tokens = 32 if key[0] == "lora,seq=8" else 64
        assert rate["mode"] == "full"
        # tokens per step over the step's time; the slow (p80) step gives the low (p20) rate.
        assert float(rate["p50"]) == pytest.approx(tokens / (float(times[key]["p50"]) / 1e3), rel=1e-9)
        assert float(rate["p20"]) == pytest.approx(tokens / (float(times[key]["p80"]) / 1e3), rel=1e-9)
    assert "tokens/s" in out.splitlines()[1]
    full_lines = [line.split() for line in out.splitlines() if line.startswith("lora,seq=8") and " full " in line]
    assert [cols[-2] for cols in full_lines] == [f"{float(rates[('lora,seq=8', p)]['p50']):.0f}" for p in ("reference", "deltakern-cpu")]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {(e["shape"], e["provider"]): e["tokens_per_s"] for e in summary["results"]} == pytest.approx(
        {key: float(rate["p50"]) for key, rate in rates.items()})
    # The CSV carries the full step's ratios the summary reports (this fake case has no floor).
    ratios = {(r["shape"], r["provider"]): float(r["p50"]) for r in rows if r["metric"] == "ratio_to_reference"}
    assert ratios == pytest.approx({(e["shape"], e["provider"]): e["ratio_to_reference"] for e in summary["results"]})
    assert not any(r["metric"] == "ratio_to_floor" for r in rows)
    assert (tmp_path / "e2e_time.png").read_bytes()[:8] == PNG_MAGIC


def test_bench_e2e_takes_shapes_from_the_file(tmp_path, capsys, fake_e2e):
    shapes = _write(tmp_path, {"e2e": [{"method": "prefix", "seq": 4}]})
    assert main(["bench", "--ops", "e2e", "--shapes", shapes, "--out", str(tmp_path)]) == 0
    assert {r["shape"] for r in _csv(tmp_path / "e2e.csv")} == {"prefix,seq=4"}
    bad = _write(tmp_path, {"e2e": [{"method": "prefix", "seq": 4, "hidden": 8}]})
    assert main(["bench", "--ops", "e2e", "--shapes", bad, "--out", str(tmp_path)]) == 2
    assert "e2e[0]: unknown field(s) hidden; expected method, seq" in capsys.readouterr().err


def test_bench_names_missing_packages_before_running(tmp_path, capsys, monkeypatch):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None if name == "peft" else real(name))
    assert main(["bench", "--ops", "lora,e2e", "--quick", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "deltakern bench: needs peft, not installed: pip install 'deltakern[bench]' (or leave e2e out" in err
    assert not (tmp_path / "out").exists()


def test_bench_gpu_report_runs_only_the_report(tmp_path, capsys, monkeypatch):
    calls = []
    module = types.ModuleType("deltakern.gpu_report")

    def run_gpu_report(out_dir, progress=None, update_known_problems=False, update_compile_records=False):
        calls.append((out_dir, update_known_problems, update_compile_records))
        progress("compiling lora_linear for sm_90")
        print("the report table")
        return 3

    module.run_gpu_report = run_gpu_report
    monkeypatch.setitem(sys.modules, "deltakern.gpu_report", module)
    monkeypatch.setattr("deltakern.gpu_report", module, raising=False)
    assert main(["bench", "--gpu-report", "--out", str(tmp_path)]) == 3
    captured = capsys.readouterr()
    assert calls == [(str(tmp_path), False, False)]
    assert captured.out == "the report table\n"  # no timing, no table of ours
    assert "compiling lora_linear for sm_90" in captured.err
    assert list(tmp_path.iterdir()) == []
    assert main(["bench", "--gpu-report", "--update-known-problems", "--out", str(tmp_path)]) == 3
    assert calls[-1] == (str(tmp_path), True, False)
    assert main(["bench", "--gpu-report", "--update-compile-records", "--out", str(tmp_path)]) == 3
    assert calls[-1] == (str(tmp_path), False, True)
    # Without --gpu-report the flags mean nothing: an error, and nothing runs.
    for flag in ("--update-known-problems", "--update-compile-records"):
        assert main(["bench", flag, "--out", str(tmp_path)]) == 2
        assert f"{flag} goes with --gpu-report" in capsys.readouterr().err
    assert len(calls) == 3


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_writes_plain_lines_when_not_a_terminal():
    stream = _Stream(tty=False)
    bar = cli._Progress(2, stream)
    shapes = [types.SimpleNamespace(shape="M=1"), types.SimpleNamespace(shape="M=2")]
    with bar:
        for _ in bar.iterate("lora_linear", shapes):
            bar("lora_linear M=1: timing fwd")
            print("a table line")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and "\033" not in stream.getvalue()
    assert [line.split(" ", 2)[::2] for line in lines] == [["[1/2]", "lora_linear M=1"], ["[2/2]", "lora_linear M=2"]]


def test_progress_on_a_terminal_clears_itself_before_stdout_writes(monkeypatch):
    stream, stdout = _Stream(tty=True), io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)
    bar = cli._Progress(4, stream)
    with bar:
        bar.start("adapter M=1")
        bar("adapter M=1: timing bwd")
        bar.advance()
        print("table")
    assert sys.stdout is stdout and stdout.getvalue() == "table\n"
    drawn = stream.getvalue().split("\r\033[K")
    assert drawn[1].startswith("[--------------------] 0/4 0:00 adapter M=1")
    assert drawn[2].endswith("adapter M=1: timing bwd")
    assert drawn[3].startswith("[#####---------------] 1/4 ")
    assert drawn[4:] == [""]  # cleared before "table" went to stdout, nothing drawn after


def test_peak_bytes_follows_allocations():
    import torch

    x = torch.randn(256, 256)

    def step():
        a = x * 2  # 256 KiB live
        b = a + 1  # 512 KiB live
        del a
        c = b * 3  # 512 KiB live again
        return c.sum()

    # Plus a few bytes: each Python scalar becomes a 0-d tensor.
    assert 2 * x.nbytes <= harness.peak_bytes(step, "cpu") <= 2 * x.nbytes + 64


def test_quantiles_and_saved_bytes():
    import torch

    assert harness.quantiles([5.0, 1.0, 3.0, 2.0, 4.0])[1] == 3.0
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    # x * x saves x twice: one storage, counted once; linear saves x and w, w excluded.
    assert harness.saved_tensors_bytes(lambda: x * x) == x.nbytes
    assert harness.saved_tensors_bytes(lambda: torch.nn.functional.linear(x, w), exclude=(w,)) == x.nbytes
    # A graph built and dropped inside fn (PEFT's DoRA does this for B A) keeps nothing for backward.
    big = torch.randn(256, 256, requires_grad=True)

    def drops_a_graph():
        (big * big).sum().detach()
        return x * x

    assert harness.saved_tensors_bytes(drops_a_graph) == x.nbytes


def test_saved_bytes_frees_a_graph_that_saves_its_own_output():
    import weakref

    import torch

    x = torch.randn(64, 32, requires_grad=True)
    outputs = []

    def exp():
        outputs.append(weakref.ref(y := x.exp()))  # exp saves its result, which refers to its grad_fn
        return y

    assert harness.saved_tensors_bytes(exp) == x.nbytes
    # Holding the saved output from the graph closed a cycle through C++ that gc never freed.
    assert outputs[0]() is None

    def keep():
        outputs.append(x.exp())
        return outputs[-1]

    harness.saved_tensors_bytes(keep)
    with pytest.raises(RuntimeError, match="for counting only"):
        outputs[-1].sum().backward()


@pytest.mark.parametrize("argv, message", [
    (["--ops", "e2e", "--quick"], "leave out --quick"),
    (["--ops", "adapter"], "add e2e to --ops"),
])
def test_e2e_size_large_needs_the_e2e_suite_at_its_full_size(tmp_path, capsys, argv, message):
    assert main(["bench", *argv, "--e2e-size", "large", "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


class _OneAtATimeCase(_FakeE2ECase):
    """Fails when built while another of its kind is still alive."""

    alive = weakref.WeakSet()

    def __init__(self, shape, dtype, device):
        assert not list(self.alive), "a case was built while the previous one was still referenced"
        super().__init__(shape, dtype, device)
        self.alive.add(self)


def test_bench_builds_each_case_after_dropping_the_previous_one(tmp_path, fake_e2e):
    """The large e2e suite held all its cases (three models each) and ran out of memory: the CLI
    builds a case only once the previous one is gone."""
    fake_e2e.SUITE = harness.BenchSuite("e2e", _FakeE2EShape, fake_e2e.SUITE.default_shapes,
                                        fake_e2e.SUITE.quick_shapes, _OneAtATimeCase)
    assert main(["bench", "--ops", "e2e", "--quick", "--out", str(tmp_path)]) == 0
    assert {r["shape"] for r in _csv(tmp_path / "e2e.csv")} == {"lora,seq=8", "adapter,seq=16"}
