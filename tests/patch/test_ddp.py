"""Two CPU processes with DistributedDataParallel (gloo) train a LoRA model to the same
parameters as one process on the whole batch."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import deltakern

from . import models

STEPS = 3


def lora_llama():
    model = models.build("llama", seed=0)
    torch.manual_seed(1)
    deltakern.add_lora(model, r=4, alpha=8)
    models.draw_normal(model, "lora_B", std=0.1)  # B = 0 at init; start from a non-trivial LoRA
    return model.train()


def whole_batch():
    ids = torch.randint(3, models.VOCAB, (4, 12), generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "labels": ids}


def train(model, data):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(STEPS):
        optimizer.zero_grad()
        model(**data).loss.backward()
        optimizer.step()


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = lora_llama()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        data = {k: v.chunk(world)[rank] for k, v in whole_batch().items()}
        train(ddp, data)
        state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = lora_llama()
    train(single, whole_batch())
    expected = {n: p.detach() for n, p in single.named_parameters() if p.requires_grad}
    assert expected and all("lora_" in n for n in expected)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for name in expected:
            # DDP averages the two half-batch gradients (equal token counts), which is the
            # whole-batch mean-loss gradient up to fp32 summation order.
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
