"""examples/trainer.py: transformers' Trainer fine-tunes deltakern models exactly as it fine-tunes
the same models built with PEFT (same initial weights, same Trainer setup): LoRA on a causal LM and
prefix tuning on a sequence-classification BERT (head trained, as PEFT's SEQ_CLS does), with and
without gradient checkpointing; bottleneck adapters, which PEFT lacks, train the same with and
without it; and under ``torchrun --nproc-per-node 2`` (DDP over gloo) every method computes the
losses of one process on the same global batches.
"""

from __future__ import annotations

import functools
import json
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
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

import deltakern

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "trainer.py"
STEPS = 4
TORCHRUN_TIMEOUT_S = 150
OPTIMISERS = {"adamw": ["--optim", "adamw_torch"],  # the example's default
              "sgd": ["--optim", "sgd", "--lr", "0.5"]}  # SGD: a wrong gradient scale shows (Adam hides it)


def load_example():
    spec = importlib.util.spec_from_file_location("trainer_example", SCRIPT)
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


def _copy_lora(ours: torch.nn.Module, twin: torch.nn.Module) -> None:
    from deltakern.nn import LoRALinear

    layers = {name: m for name, m in ours.named_modules() if isinstance(m, LoRALinear)}
    assert len(layers) == 7 * 2, sorted(layers)
    for name, layer in layers.items():
        target = twin.base_model.model.get_submodule(name)
        target.lora_A["default"].weight.copy_(layer.lora_A)
        target.lora_B["default"].weight.copy_(layer.lora_B)
        torch.testing.assert_close(target.base_layer.weight, layer.weight, rtol=0, atol=0)


class PeftPrefixClassifier(torch.nn.Module):
    """PEFT's prefix tuning of a sequence-classification BERT, built by hand. PEFT 0.21's SEQ_CLS
    prefix tuning refuses ``BertForSequenceClassification`` under transformers 5 ("Model does not
    support past key values": its forward takes them through ``**kwargs`` only), so PEFT prefixes
    the bare ``BertModel`` (task ``FEATURE_EXTRACTION``) and the classifier's pooler, head and
    loss follow as ``BertForSequenceClassification`` computes them (dropout is off)."""

    accepts_loss_kwargs = False  # as the example's model (its mean loss is per process)

    def __init__(self, classifier: transformers.BertForSequenceClassification, config):
        import peft

        super().__init__()
        self.bert = peft.get_peft_model(classifier.bert, config)
        self.classifier = classifier.classifier.requires_grad_(True)

    def forward(self, input_ids, attention_mask, labels):
        pooled = self.bert(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        logits = self.classifier(pooled)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def peft_twin(method: str, seed: int) -> torch.nn.Module:
    """The example's model built with PEFT: the same base, a ``LoraConfig`` (or, for ``prefix``,
    a ``PrefixTuningConfig`` in :class:`PeftPrefixClassifier`) with the example's settings, and
    the deltakern model's initial delta copied into it."""
    import peft

    ours = example.build_model(method, seed)
    if method == "lora":
        lora = example.LORA
        config = peft.LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout_p"],
                                 target_modules=lora["target_modules"])
        twin = peft.get_peft_model(example.build_base(method, seed), config)
        with torch.no_grad():
            _copy_lora(ours, twin)
    else:
        config = peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", **example.PREFIX)
        twin = PeftPrefixClassifier(example.build_base(method, seed), config)
        with torch.no_grad():
            twin.bert.prompt_encoder["default"].load_state_dict(ours.deltakern_prefix.state_dict())
        torch.testing.assert_close(twin.classifier.weight, ours.classifier.weight, rtol=0, atol=0)
    assert sum(p.numel() for p in twin.parameters() if p.requires_grad) == \
        sum(p.numel() for p in ours.parameters() if p.requires_grad)
    return twin


def train_peft(method: str, argv: list[str], output_dir) -> list[float]:
    options = example.parse(argv)
    return example.train(peft_twin(method, options.seed), method, example.training_arguments(options, str(output_dir)))


@functools.cache
def ours(method: str, *argv: str) -> tuple[list[float], Counter]:
    """The example's ``main`` for ``method`` with ``argv`` in this process (once per call): its
    losses and the deltakern ops that ran."""
    with OpCounts() as ops:
        losses = example.main(["--method", method, *argv])
    return losses[method], ops.counts


def assert_losses_equal(actual: list[float], expected: list[float], what: str) -> None:
    assert len(actual) == len(expected) == STEPS, (what, actual, expected)
    assert actual == pytest.approx(expected, rel=1e-5), what


# The fused op each method runs, and how many times per forward (once per layer it patches).
FUSED = {"lora": ("lora_linear", 7 * 2), "prefix": ("prefix_attention", 2), "adapters": ("adapter", 2 * 2)}
CASES = {"lora-adamw": ("lora", OPTIMISERS["adamw"]), "lora-sgd": ("lora", OPTIMISERS["sgd"]),
         "prefix-adamw": ("prefix", OPTIMISERS["adamw"]), "prefix-sgd": ("prefix", OPTIMISERS["sgd"]),
         "adapters-adamw": ("adapters", OPTIMISERS["adamw"])}


@pytest.mark.parametrize("case", CASES)
def test_trainer_matches_peft_with_and_without_gradient_checkpointing(case, tmp_path, capsys):
    """The example's losses with and without ``--gradient-checkpointing`` are equal, and equal
    those of PEFT's model trained by the same Trainer setup where PEFT has the method; the loss
    goes down; the fused op ran once per patched layer per forward and backward, and once more per
    step with checkpointing (its recomputed forward)."""
    method, optimiser = CASES[case]
    argv = ("--steps", str(STEPS), *optimiser)
    (plain, plain_ops), (checkpointed, checkpointed_ops) = ours(method, *argv), ours(method, *argv,
                                                                                     "--gradient-checkpointing")
    assert_losses_equal(checkpointed, plain, f"{case}: deltakern with gradient checkpointing vs without")
    if method != "adapters":  # PEFT has no bottleneck adapters
        assert_losses_equal(plain, train_peft(method, list(argv), tmp_path), f"{case}: deltakern vs PEFT")
    assert plain[-1] < plain[0], f"{case}: the loss did not go down: {plain}"
    op, layers = FUSED[method]
    assert plain_ops[f"{op}_fwd"] == plain_ops[f"{op}_bwd"] == STEPS * layers, plain_ops
    assert checkpointed_ops[f"{op}_fwd"] == 2 * STEPS * layers, checkpointed_ops
    assert checkpointed_ops[f"{op}_bwd"] == STEPS * layers, checkpointed_ops
    with capsys.disabled():
        twin = "PEFT's, " if method != "adapters" else ""
        print(f"\n[trainer {case}] losses {[round(x, 6) for x in plain]}: {twin}with and without checkpointing")


def test_trainer_prefix_checkpoint_holds_the_trained_head(tmp_path):
    """After prefix tuning a classifier with the example's Trainer setup, ``deltakern.save`` holds
    the trained head beside the prefixes as PEFT's SEQ_CLS checkpoints do (``modules_to_save``),
    and ``deltakern.load`` on a fresh base computes the trained model's logits bit for bit."""
    from safetensors.torch import load_file

    model = example.build_model("prefix")
    untrained_head = model.classifier.weight.detach().clone()
    options = example.parse(["--steps", "2"])
    example.train(model, "prefix", example.training_arguments(options, str(tmp_path / "trainer")))
    deltakern.save(model, tmp_path / "prefix")
    state = load_file(tmp_path / "prefix" / "adapter_model.safetensors")
    assert set(state) == {"base_model.classifier.weight", "base_model.classifier.bias", "prompt_embeddings"}, \
        sorted(state)
    assert not torch.equal(state["base_model.classifier.weight"], untrained_head), "the head did not train"
    config = json.loads((tmp_path / "prefix" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier", "score"], config
    rows = example.dataset("prefix", size=4)
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}
    loaded = deltakern.load(example.build_base("prefix"), tmp_path / "prefix").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)


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
               str(SCRIPT), "--method", *example.METHODS, "--steps", str(STEPS), "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(out / "stdout", "w") as stdout, open(out / "stderr", "w") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
    run = {"process": process, "out": out, "deadline": time.monotonic() + TORCHRUN_TIMEOUT_S}
    yield run
    stop(process)


@pytest.mark.parametrize("method", example.METHODS)
def test_trainer_under_torchrun_two_processes_matches_one_process(torchrun, method, capsys):
    """Under torchrun the Trainer wraps the model in DDP (gloo on the CPU); with 2 examples per
    process it computes the losses of one process with 4 per step: the same samples. One torchrun
    trains the three methods in turn."""
    process, out = torchrun["process"], torchrun["out"]
    try:
        process.wait(timeout=max(0.0, torchrun["deadline"] - time.monotonic()))
    except subprocess.TimeoutExpired:
        stop(process)
        tail = (out / "stdout").read_text()[-3000:] + (out / "stderr").read_text()[-3000:]
        pytest.fail(f"torchrun did not finish within {TORCHRUN_TIMEOUT_S} s; killed it and its workers:\n{tail}")
    stdout = (out / "stdout").read_text()
    assert process.returncode == 0, stdout[-3000:] + (out / "stderr").read_text()[-6000:]
    assert f"{method}: " in stdout and "2 process(es)" in stdout, stdout[-3000:]
    losses = [float(x) for x in re.findall(rf"^{method} step \d+: loss (\S+)$", stdout, flags=re.MULTILINE)]
    assert len(losses) == STEPS, stdout[-3000:]
    assert example.parse([]).batch_size == 4
    one_process, _ = ours(method, "--steps", str(STEPS), *OPTIMISERS["adamw"])  # a run the tests above made
    # The script prints 6 decimals.
    assert losses == pytest.approx(one_process, rel=1e-5, abs=1e-6), (losses, one_process)
    with capsys.disabled():
        print(f"\n[trainer torchrun {method}] 2 processes: {losses}")
