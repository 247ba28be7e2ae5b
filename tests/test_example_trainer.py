"""examples/trainer_lora.py: transformers' Trainer fine-tunes a deltakern LoRA model exactly as it
fine-tunes the same model built with PEFT (same initial weights, same Trainer setup), with and
without gradient checkpointing, and under ``torchrun --nproc-per-node 2`` (DDP over gloo) as one
process on the same global batches.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "trainer_lora.py"
STEPS = 4
TORCHRUN_TIMEOUT_S = 150
OPTIMISERS = {"adamw": ["--optim", "adamw_torch"],  # the example's default
              "sgd": ["--optim", "sgd", "--lr", "0.5"]}  # SGD: a wrong gradient scale shows (Adam hides it)


def load_example():
    spec = importlib.util.spec_from_file_location("trainer_lora", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = load_example()


class OpCounts(TorchDispatchMode):
    """Counts the ``torch.ops.deltakern`` ops that run."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "deltakern":
            self.counts[func.name().split("::")[-1]] += 1
        return func(*args, **(kwargs or {}))


def peft_twin(seed: int) -> torch.nn.Module:
    """The example's model built with PEFT: the same base, a ``LoraConfig`` with the example's
    settings, and the deltakern model's initial LoRA factors copied into it."""
    import peft

    from deltakern.nn import LoRALinear

    ours = example.build_model(seed)
    lora = example.LORA
    config = peft.LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout_p"],
                             target_modules=lora["target_modules"])
    twin = peft.get_peft_model(example.build_base(seed), config)
    layers = {name: m for name, m in ours.named_modules() if isinstance(m, LoRALinear)}
    assert len(layers) == 7 * 2, sorted(layers)
    with torch.no_grad():
        for name, layer in layers.items():
            target = twin.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
            torch.testing.assert_close(target.base_layer.weight, layer.weight, rtol=0, atol=0)
    assert sum(p.numel() for p in twin.parameters() if p.requires_grad) == \
        sum(p.numel() for p in ours.parameters() if p.requires_grad)
    return twin


def train_peft(argv: list[str], output_dir) -> list[float]:
    options = example.parse(argv)
    return example.train(peft_twin(options.seed), example.training_arguments(options, str(output_dir)))


@functools.cache
def ours(*argv: str) -> tuple[list[float], Counter]:
    """The example's ``main(argv)`` in this process (once per argv): its losses and the deltakern
    ops that ran."""
    with OpCounts() as ops:
        losses = example.main(list(argv))
    return losses, ops.counts


def assert_losses_equal(actual: list[float], expected: list[float], what: str) -> None:
    assert len(actual) == len(expected) == STEPS, (what, actual, expected)
    assert actual == pytest.approx(expected, rel=1e-5), what


@pytest.mark.parametrize("optimiser", OPTIMISERS)
def test_trainer_lora_matches_peft_with_and_without_gradient_checkpointing(optimiser, tmp_path, capsys):
    """The example's losses, with and without ``--gradient-checkpointing``, equal those of PEFT's
    LoRA trained by the same Trainer setup (without checkpointing, which must change nothing), and
    the fused ops ran: each LoRA layer once per forward and backward, and once more per step with
    checkpointing (its recomputed forward)."""
    argv = ("--steps", str(STEPS), *OPTIMISERS[optimiser])
    (plain, plain_ops), (checkpointed, checkpointed_ops) = ours(*argv), ours(*argv, "--gradient-checkpointing")
    peft_losses = train_peft(list(argv), tmp_path)
    assert_losses_equal(plain, peft_losses, f"{optimiser}: deltakern vs PEFT")
    assert_losses_equal(checkpointed, peft_losses, f"{optimiser}: deltakern with gradient checkpointing vs PEFT")
    assert plain[-1] < plain[0], f"{optimiser}: the loss did not go down: {plain}"
    layers = 7 * 2
    assert plain_ops["lora_linear_fwd"] == plain_ops["lora_linear_bwd"] == STEPS * layers, plain_ops
    assert checkpointed_ops["lora_linear_fwd"] == 2 * STEPS * layers, checkpointed_ops
    assert checkpointed_ops["lora_linear_bwd"] == STEPS * layers, checkpointed_ops
    with capsys.disabled():
        print(f"\n[trainer {optimiser}] losses {[round(x, 6) for x in plain]}: PEFT's, with and without checkpointing")


def stop(process: subprocess.Popen) -> None:
    """End torchrun and its workers (each in a session of its own, so not in torchrun's process
    group): SIGTERM to torchrun, which passes it on to them and waits for them, then SIGKILL to
    whatever of them is left after 20 s."""
    import psutil  # accelerate's dependency, so present wherever Trainer runs

    if process.poll() is not None:
        return
    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=20)
    for member in alive:
        member.kill()
    psutil.wait_procs(alive, timeout=10)
    process.wait()


@pytest.fixture(scope="module", autouse=True)
def torchrun(tmp_path_factory):
    """``torchrun --nproc-per-node 2`` of the example with 2 examples per process, started before
    the first test of this file so that its start-up (two interpreters importing torch and
    transformers) overlaps the in-process runs; stopped with its workers when it outlives
    ``TORCHRUN_TIMEOUT_S`` or the tests end first."""
    out = tmp_path_factory.mktemp("torchrun")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(SCRIPT), "--steps", str(STEPS), "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(out / "stdout", "w") as stdout, open(out / "stderr", "w") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
    run = {"process": process, "out": out, "deadline": time.monotonic() + TORCHRUN_TIMEOUT_S}
    yield run
    stop(process)


def test_trainer_lora_under_torchrun_two_processes_matches_one_process(torchrun, capsys):
    """Under torchrun the Trainer wraps the model in DDP (gloo on the CPU); with 2 examples per
    process it computes the losses of one process with 4 per step: the same samples."""
    process, out = torchrun["process"], torchrun["out"]
    try:
        process.wait(timeout=max(0.0, torchrun["deadline"] - time.monotonic()))
    except subprocess.TimeoutExpired:
        stop(process)
        tail = (out / "stdout").read_text()[-3000:] + (out / "stderr").read_text()[-3000:]
        pytest.fail(f"torchrun did not finish within {TORCHRUN_TIMEOUT_S} s; killed it and its workers:\n{tail}")
    stdout = (out / "stdout").read_text()
    assert process.returncode == 0, stdout[-3000:] + (out / "stderr").read_text()[-6000:]
    assert "2 process(es)" in stdout, stdout[-3000:]
    losses = [float(x) for x in re.findall(r"^step \d+: loss (\S+)$", stdout, flags=re.MULTILINE)]
    assert len(losses) == STEPS, stdout[-3000:]
    assert example.parse([]).batch_size == 4
    one_process, _ = ours("--steps", str(STEPS), *OPTIMISERS["adamw"])  # the run the test above made
    # The script prints 6 decimals.
    assert losses == pytest.approx(one_process, rel=1e-5, abs=1e-6), (losses, one_process)
    with capsys.disabled():
        print(f"\n[trainer torchrun] 2 processes: {losses}")
