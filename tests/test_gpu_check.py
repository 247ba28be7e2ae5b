"""bench/gpu_check.sh, the prepared command for a lent GPU machine, run here on the CPU as far as
it goes: probe, (skipped) build, import, collection of the gpu tests, then the GPU gate, which
must stop it with exit status 3 and a clear message. Writes only under tmp_path."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
# The build command the script documents (its header) and runs (build_command.txt).
BUILD = "-m pip install -v --no-build-isolation --no-deps --no-index -e ."
NO_DEVICE = 3

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _run(out: Path, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONDONTWRITEBYTECODE="1",
                DELTAKERN_GPU_CHECK_PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), str(out)], check=False, cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One CPU run of the script with the build skipped (deltakern._C is built already: building
    it again takes minutes here), and the repository's state before and after it."""
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    status = _git_status()
    result = _run(out, DELTAKERN_GPU_CHECK_SKIP_BUILD="1", MAX_JOBS="3", DELTAKERN_CUDA_ARCHS="")
    return result, out, status, _git_status()


def _git_status() -> str | None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], check=False, cwd=ROOT,
                          capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def test_stops_with_a_clear_message_when_there_is_no_gpu(dry_run):
    result, out, _, _ = dry_run
    assert result.returncode == NO_DEVICE, result.stdout + result.stderr
    assert "no CUDA device" in result.stderr
    assert "torch.cuda.is_available() is False" in result.stderr
    summary = (out / "summary.txt").read_text()
    assert summary.startswith(f"gpu_check: exit {NO_DEVICE}: no CUDA device")
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["exit_code"] == NO_DEVICE
    steps = {s["step"]: s["status"] for s in report["steps"]}
    # Everything that needs no GPU ran before the gate; nothing after it did.
    assert steps == {"probe": "ok", "build": "skipped", "import": "ok", "collect": "ok", "gpu-gate": "no-device"}
    assert not (out / "junit.xml").exists() and not (out / "bench").exists()


def test_records_versions_against_pyproject(dry_run):
    _, out, _, _ = dry_run
    env = json.loads((out / "env.json").read_text())
    assert env["cuda_available"] is False and env["device"] is None
    import torch

    assert env["torch"] == torch.__version__
    assert env["minima"]["transformers"] and env["minima"]["peft"] and env["minima"]["torch"]
    for name in ("torch", "triton", "transformers", "peft", "bitsandbytes", "pytest-timeout", "pytest-xdist"):
        assert name in env["versions"]
    summary = (out / "summary.txt").read_text()
    assert re.search(r"transformers\s+\S+\s+>=" + re.escape(env["minima"]["transformers"]), summary)


def test_collects_the_gpu_tests(dry_run):
    _, out, _, _ = dry_run
    collected = [line for line in (out / "collect.txt").read_text().splitlines() if "::" in line]
    assert collected and all(line.startswith("tests/") for line in collected)
    env = json.loads((out / "env.json").read_text())
    if not env["versions"]["pytest-xdist"]:
        # Without xdist the Triton fp32 instances are trimmed, and the summary says so.
        assert not [c for c in collected if "triton" in c and "float32" in c]
        assert "Triton fp32 gpu tests: no pytest-xdist" in (out / "summary.txt").read_text()
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["collected"] == len(collected)


def test_build_command_is_the_documented_one(dry_run):
    _, out, _, _ = dry_run
    # No device: one arch, sm_90 (H100/H200), unless DELTAKERN_CUDA_ARCHS says otherwise; MAX_JOBS as given.
    line = (out / "build_command.txt").read_text().strip()
    assert line == f"DELTAKERN_CUDA_ARCHS=90 MAX_JOBS=3 {sys.executable} {BUILD}"
    header = SCRIPT.read_text().split("\nset -u")[0]
    assert f"python3 {BUILD}" in " ".join(header.replace("#", " ").replace("\\\n", " ").split())
    # and it is what the build step executes (BUILD_CMD), not only what it prints
    run_line = next(line for line in SCRIPT.read_text().splitlines() if line.startswith("BUILD_CMD=("))
    assert shlex.split(run_line[len("BUILD_CMD=("):-1])[1:] == BUILD.split()


def test_leaves_the_working_tree_alone(dry_run):
    _, _, before, after = dry_run
    if before is None:
        pytest.skip("not a git checkout")
    assert after == before


def test_rejects_a_missing_outdir():
    done = subprocess.run(["bash", str(SCRIPT)], check=False, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage: bench/gpu_check.sh OUTDIR" in done.stderr


@pytest.mark.skipif(os.environ.get("DELTAKERN_TEST_GPU_CHECK_BUILD") != "1",
                    reason="builds deltakern._C in a copy (minutes); set DELTAKERN_TEST_GPU_CHECK_BUILD=1")
def test_build_step_works_against_this_torch(tmp_path):
    """The real build step, in a copy of the sources, installed into a throwaway prefix.
    PIP_IGNORE_INSTALLED matters: without it pip uninstalls the deltakern of this environment
    (the checkout's editable install) before installing the copy into the prefix."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, copy / name)
    for name in ("csrc", "deltakern", "tests", "bench"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    full = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONDONTWRITEBYTECODE="1", PIP_PREFIX=str(tmp_path / "prefix"),
                PIP_IGNORE_INSTALLED="1",
                DELTAKERN_GPU_CHECK_PYTHON=sys.executable, DELTAKERN_GPU_CHECK_BUDGET_S="1500",
                DELTAKERN_GPU_CHECK_BUILD_MAX_S="1200", DELTAKERN_CUDA_ARCHS="")
    done = subprocess.run(["bash", str(copy / "bench" / "gpu_check.sh"), str(tmp_path / "out")], check=False, cwd=copy,
                          env=full, capture_output=True, text=True, timeout=1800)
    assert done.returncode == NO_DEVICE, done.stdout[-3000:] + done.stderr[-3000:]
    steps = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["steps"]
    assert {s["step"]: s["status"] for s in steps}["build"] == "ok"
    assert "deltakern._C: CPU kernels yes" in (tmp_path / "out" / "info.txt").read_text()
