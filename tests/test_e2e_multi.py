"""The mixed-batch end-to-end benchmark (deltakern.benchmark.e2e_multi) on a tiny Llama model: every
provider passes its check against PEFT, the check fails when a model differs, the providers' steps
train what they should, and bad shapes are refused."""

import pytest
import torch

from deltakern.benchmark import e2e_multi

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")

SHAPE = e2e_multi.QUICK_SHAPES[0]


@pytest.fixture(scope="module")
def case():
    return e2e_multi.MultiAdapterCase(SHAPE, torch.float32, "cpu")


def test_shapes():
    cpu = e2e_multi.DEFAULT_SHAPES["cpu"][0]
    assert (cpu.adapters, cpu.hidden, cpu.layers, cpu.seq, cpu.batch) == (8, 512, 4, 128, 8)
    assert str(cpu) == "adapters=8,h=512,L=4,seq=128,b=8"
    with pytest.raises(ValueError, match=r"batch \(6\) must be a multiple of adapters \(4\)"):
        e2e_multi.MultiAdapterShape(4, 64, 2, 4, 2, 176, 256, 16, 6)


def test_every_provider_passes_its_check(case):
    providers = case.providers(["cpu", "reference"])
    assert list(providers) == ["single-adapter", "reference", "deltakern-cpu", "deltakern-reference"]
    assert case.names == [f"adapter{j % SHAPE.adapters}" for j in range(SHAPE.batch)]
    for name, fn in providers.items():
        ok, worst = case.check(name, fn)
        assert ok and worst < 0.1, (name, worst)
    # PEFT's n separate steps: n forwards, each on its adapter's sequences.
    assert len(providers["reference"].forwards) == SHAPE.adapters
    assert case.peft.training and case.mixed.training


def test_check_fails_when_an_adapter_differs(case):
    providers = case.providers(["cpu"])
    layer = case.mixed.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        original = layer.lora_B["adapter1"].clone()
        layer.lora_B["adapter1"].mul_(1.5)
        case._initial[[n for n, _, _ in case.pairs].index("model.layers.0.self_attn.q_proj.lora_B.adapter1")].mul_(1.5)
    try:
        ok, _ = case.check("deltakern-cpu", providers["deltakern-cpu"])
    finally:
        with torch.no_grad():
            index = [n for n, _, _ in case.pairs].index("model.layers.0.self_attn.q_proj.lora_B.adapter1")
            case._initial[index].copy_(original)
            case._expected.clear()
    assert not ok


def test_each_provider_steps_its_own_parameters_when_providers_are_rebuilt(case):
    """providers() builds new provider objects each call; a dropped one's id may come back for
    another provider, whose optimizer must still train its own parameters."""
    for _ in range(20):
        for fn in case.providers(["cpu"]).values():
            optimizer = case._optimizer(fn)
            trained = [id(p) for group in optimizer.param_groups for p in group["params"]]
            assert trained == [id(p) for p in fn.params]


@pytest.mark.parametrize("provider", ["reference", "deltakern-cpu"])
def test_a_training_step_moves_every_adapter(case, provider):
    """One timed step of the mixed batch (or PEFT's n steps) updates all n adapters."""
    providers = case.providers(["cpu"])
    step, setup = case.run_mode(provider, providers[provider], "full")
    assert setup is None
    fn = providers[provider]
    before = [p.detach().clone() for p in fn.params]
    step()
    moved = [not torch.equal(b, p) for b, p in zip(before, fn.params)]
    assert all(moved), f"{moved.count(False)} of {len(moved)} adapter parameters did not move"
    case._load_initial()
