"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on two CPU processes (gloo on loopback): a tiny
Llama with each delta method, sharded per decoder layer and at the root, computes the same losses
and delta gradients over two training steps as one process on the whole batch; and what a
deltakern op does when it is handed a DTensor directly.

One spawn of two workers runs every case (starting Python, torch and transformers twice is most
of the cost); each test then checks its own case's records. Everything distributed is bounded in
time: the process group's collectives (``COLLECTIVE_TIMEOUT_S``), and the workers as a whole
(``SPAWN_TIMEOUT_S``, after which they are killed and the tests fail naming the hang).
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import deltakern

from . import models
from .test_ddp import whole_batch

WORLD = 2
STEPS = 2
LR = 0.1
COLLECTIVE_TIMEOUT_S = 30
SPAWN_TIMEOUT_S = 150
# Tiny Llama: hidden 64 (4 heads of 16, 2 KV heads), 2 layers, vocab 128, fp32.
LLAMA = {"hidden_size": 64, "head_dim": 16, "vocab_size": 128}
METHODS = ("lora", "prefix", "adapters", "ia3", "peft_lora")
LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The fused ops each method must run forward and backward, in one process and under FSDP2.
FUSED_OPS = {"lora": "lora_linear", "prefix": "prefix_attention", "adapters": "adapter", "ia3": "ia3_linear",
             "peft_lora": "lora_linear"}
# Direct calls of lora_linear with DTensors: (name, backend, which arguments are DTensors).
# (case, forced backend, which arguments are DTensors, the argument the error names: the first).
DTENSOR_CALLS = (
    ("weight_sharded", None, "weight", "weight"),
    ("all_dtensors", None, "all", "x"),
    ("weight_sharded_reference", "reference", "weight", "weight"),
    ("all_dtensors_reference", "reference", "all", "x"),
)


def build(method: str) -> torch.nn.Module:
    """The tiny Llama with ``method``'s delta (dropout 0), the same on every process: fixed seeds,
    and the zero-initialised factors redrawn so every delta parameter gets a gradient."""
    model = models.build("llama", seed=0, **LLAMA)
    torch.manual_seed(1)
    if method == "lora":
        deltakern.add_lora(model, r=4, alpha=8, dropout_p=0.0, target_modules="all-linear")
        models.draw_normal(model, "lora_B", std=0.1)
    elif method == "prefix":
        deltakern.add_prefix(model, num_virtual_tokens=3)
    elif method == "adapters":
        deltakern.add_adapters(model, bottleneck=8)
        models.draw_normal(model, ".adapter.", std=0.1)
    elif method == "ia3":
        deltakern.add_ia3(model)
        models.draw_normal(model, "ia3_l", mean=1.0, std=0.1)
    elif method == "peft_lora":
        import peft

        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LINEAR_NAMES)
        model = peft.get_peft_model(model, config)
        models.draw_normal(model, "lora_B", std=0.1)
        report = deltakern.patch(model)
        assert report.patched and not report.skipped, str(report)
    else:
        raise KeyError(method)
    return model.train()


def delta_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def local_bytes(t: torch.Tensor) -> int:
    """Bytes of the part of ``t`` this process holds (its shard for a DTensor)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def frozen_bytes(model: torch.nn.Module) -> int:
    return sum(local_bytes(p) for p in model.parameters() if not p.requires_grad)


class DeltakernOps(TorchDispatchMode):
    """Records the ``torch.ops.deltakern`` ops that run, and those that were handed a DTensor."""

    def __init__(self):
        super().__init__()
        self.ran, self.given_dtensor = set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "deltakern":
            from torch.distributed.tensor import DTensor

            name = func.name().split("::")[-1]
            self.ran.add(name)
            if any(isinstance(t, DTensor) for t in tree_leaves((args, kwargs))):
                self.given_dtensor.add(name)
        return func(*args, **(kwargs or {}))


def run_steps(model: torch.nn.Module, data: dict, reduce_loss=lambda loss: loss) -> dict:
    """``STEPS`` steps of SGD on ``data``: each step's loss (through ``reduce_loss``) and delta
    gradients (whole tensors), read before the step is taken, and the deltakern ops that ran."""
    names = delta_names(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses, grads = [], []
    ops = DeltakernOps()
    for _ in range(STEPS):
        optimizer.zero_grad()
        with ops:
            loss = model(**data).loss
            loss.backward()
        losses.append(reduce_loss(loss.detach()).item())
        params = dict(model.named_parameters())
        step = {}
        for name in names:
            grad = params[name].grad
            assert grad is not None, f"{name} got no gradient"
            step[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
        grads.append(step)
        optimizer.step()
    return {"losses": losses, "grads": grads, "ops_ran": ops.ran, "ops_given_dtensor": ops.given_dtensor}


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]


def _fsdp_case(method: str, mesh, rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = build(method)
    layers = _decoder_layers(model)
    assert len(layers) == 2
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    not_sharded = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    assert not not_sharded, f"parameters FSDP2 does not manage: {not_sharded}"
    data = {k: v.chunk(WORLD)[rank] for k, v in whole_batch().items()}

    def mean_over_ranks(loss):
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        return loss / WORLD

    out = run_steps(model, data, mean_over_ranks)
    out["frozen_bytes"] = frozen_bytes(model)
    return out


def _dtensor_call(mesh, backend: str | None, which: str) -> dict:
    """``lora_linear`` with a row-sharded weight DTensor (and, for ``which="all"``, every other
    tensor a replicated DTensor): its result as a whole tensor, or the error it raised."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(7)
    x, weight = torch.randn(5, 16, generator=g), torch.randn(12, 16, generator=g)
    lora_A, lora_B = torch.randn(3, 16, generator=g), torch.randn(12, 3, generator=g)
    args = [x, distribute_tensor(weight, mesh, [Shard(0)]), None, lora_A, lora_B]
    if which == "all":
        args = [a if a is None or isinstance(a, DTensor) else distribute_tensor(a, mesh, [Replicate()]) for a in args]
    try:
        if backend is None:
            y = deltakern.lora_linear(*args, 2.0)
        else:
            with deltakern.use_backend(backend):
                y = deltakern.lora_linear(*args, 2.0)
    except Exception as error:  # noqa: BLE001 - recorded, judged by the test
        return {"error": f"{type(error).__name__}: {error}", "error_type": type(error).__name__}
    return {"type": type(y).__name__, "result": (y.full_tensor() if isinstance(y, DTensor) else y).detach(),
            "expected": x @ weight.t() + 2.0 * (x @ lora_A.t()) @ lora_B.t()}


def _save(records: dict, path: str) -> None:
    torch.save(records, path + ".tmp")
    os.replace(path + ".tmp", path)  # whole or not at all, even if the process is killed


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        from torch.distributed.device_mesh import init_device_mesh

        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (world,))
        records, broken = {}, None
        for method in METHODS:
            if broken:
                records[method] = {"error": f"not run: {broken}"}
                continue
            start = time.perf_counter()
            try:
                records[method] = _fsdp_case(method, mesh, rank)
            except Exception:  # noqa: BLE001 - recorded, the test reports it
                records[method] = {"error": traceback.format_exc()}
            records[method]["seconds"] = time.perf_counter() - start
            _save(records, path)  # kept if this process dies in a later collective
            # Go on only if every rank ended the case the same way, so that the next collectives
            # pair up. A rank that failed alone leaves the others inside the case's collectives,
            # which then fail (gloo aborts on mismatched collectives) or time out.
            failed = [None] * world
            dist.all_gather_object(failed, "error" in records[method])
            if len(set(failed)) > 1:
                broken = f"the ranks parted ways in case {method!r} (failed: {failed})"
        records["dtensor_calls"] = {} if broken else {name: _dtensor_call(mesh, backend, which)
                                                      for name, backend, which, _ in DTENSOR_CALLS}
        _save(records, path)
    finally:
        dist.destroy_process_group()


def _errors(out) -> str:
    """The errors the workers recorded before they died, if they saved any."""
    lines = []
    for rank in range(WORLD):
        path = out / f"rank{rank}.pt"
        records = torch.load(path, weights_only=False) if path.exists() else {}
        lines += [f"rank {rank}, {method}: {r['error']}" for method, r in records.items() if "error" in r]
    return "\n".join(lines) or "none recorded"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> list[dict]:
    """The records of both workers; the workers are killed, and every test fails, on a hang."""
    out = tmp_path_factory.mktemp("fsdp2")
    context = mp.spawn(_worker, args=(WORLD, str(out / "init"), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                for process in context.processes:
                    process.join(5)
                pytest.fail(f"the FSDP2 workers did not finish within {SPAWN_TIMEOUT_S} s (a hang); killed them. "
                            f"Errors recorded:\n{_errors(out)}")
    except ProcessException as died:  # join() has terminated the other worker
        pytest.fail(f"an FSDP2 worker died: {died}. Errors recorded:\n{_errors(out)}")
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal within 1e-5 relative: per element, and with a floor of 1e-5 of the tensor's largest
    entry for the elements near zero (fp32 sums taken in another order)."""
    scale = expected.abs().max().item()
    assert scale > 0, f"{name}: the expected tensor is all zeros, nothing is compared"
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_two_processes_match_one_process_on_the_whole_batch(sharded, method, capsys):
    for rank, records in enumerate(sharded):
        error = records[method].get("error")
        assert error is None, f"rank {rank}, {method} under FSDP2:\n{error}"
    single_model = build(method)
    single = run_steps(single_model, whole_batch())
    full = frozen_bytes(single_model)
    fused = {f"{FUSED_OPS[method]}_fwd", f"{FUSED_OPS[method]}_bwd"}
    assert fused <= single["ops_ran"], single["ops_ran"]
    for rank, records in enumerate(sharded):
        got = records[method]
        # FSDP2 hands the ops unsharded plain tensors (DESIGN.md, "Model surgery").
        assert fused <= got["ops_ran"] and not got["ops_given_dtensor"], (rank, got["ops_ran"], got["ops_given_dtensor"])
        assert got["losses"] == pytest.approx(single["losses"], rel=1e-5), f"rank {rank} losses"
        for step in range(STEPS):
            assert got["grads"][step].keys() == single["grads"][step].keys()
            for name, expected in single["grads"][step].items():
                assert_close_relative(got["grads"][step][name], expected, f"rank {rank} step {step} {name}")
    # Every frozen base parameter is split along dim 0: the two shards together are the whole.
    shards = [records[method]["frozen_bytes"] for records in sharded]
    assert sum(shards) == full and max(shards) <= 0.55 * full, (shards, full)
    with capsys.disabled():
        print(f"\n[fsdp2 {method}] frozen base bytes per rank {shards} vs {full} in one process; "
              f"case took {max(r[method]['seconds'] for r in sharded):.1f} s")


@pytest.mark.parametrize(("name", "argument"), [(name, argument) for name, _, _, argument in DTENSOR_CALLS])
def test_lora_linear_with_a_dtensor_is_a_clear_error(sharded, name, argument, capsys):
    """A DTensor handed to ``lora_linear`` directly (not through FSDP2, whose modules hand the ops
    unsharded plain tensors) raises a ValueError naming the op, the argument and the fix, on every
    backend, before any kernel runs (DESIGN.md, "Op contracts")."""
    for rank, records in enumerate(sharded):
        assert name in records["dtensor_calls"], f"rank {rank}: not run (the process group failed earlier)"
        got = records["dtensor_calls"][name]
        with capsys.disabled():
            print(f"\n[lora_linear {name}] rank {rank}: {got.get('error') or 'returned a ' + got['type']}")
        assert got.get("error_type") == "ValueError", f"rank {rank}: {got.get('error') or 'no error'}"
        assert f"deltakern.lora_linear: {argument} is a DTensor" in got["error"], got["error"]
        assert f"{argument}.full_tensor()" in got["error"] and "fully_shard" in got["error"], got["error"]
