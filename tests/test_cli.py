"""The command line: ``deltakern info`` and ``deltakern bench``."""

import csv

import pytest

from deltakern import benchmark
from deltakern.cli import main


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
    assert tuple(rows[0].keys()) == benchmark.COLUMNS
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
    original = benchmark.LoraCase.peft_way
    monkeypatch.setattr(benchmark.LoraCase, "peft_way", lambda self, x: original(self, x) * 1.01)
    assert main(["bench", "--ops", "lora", "--quick", "--no-compile", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "FAIL lora_linear reference" in captured.err


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
    assert 2 * x.nbytes <= benchmark.peak_bytes(step, "cpu") <= 2 * x.nbytes + 64


def test_quantiles_and_saved_bytes():
    import torch

    assert benchmark.quantiles([5.0, 1.0, 3.0, 2.0, 4.0])[1] == 3.0
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    # x * x saves x twice: one storage, counted once; linear saves x and w, w excluded.
    assert benchmark.saved_tensors_bytes(lambda: x * x) == x.nbytes
    assert benchmark.saved_tensors_bytes(lambda: torch.nn.functional.linear(x, w), exclude=(w,)) == x.nbytes
