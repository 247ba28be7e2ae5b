"""DoRA through deltakern: add_lora(use_dora=True) and patch() of PEFT DoRA models against PEFT's own
DoRA (outputs and the gradients of lora_A, lora_B and the magnitude, dropout off and on with the
same mask), PEFT DoRA checkpoints both ways, merge_lora, the ‖W‖² cache, QDoRA over NF4, and
what patch() leaves on PEFT's path."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

import deltakern
import deltakern.nn.lora as nn_lora
from deltakern.nn import LoRALinear, NF4Linear
from deltakern.ops._common import draw_seed
from deltakern.ops.dora_linear import dora_linear
from deltakern.patch import lora as lora_method
from deltakern.patch import peft_patch
from deltakern.reference.dora_linear import dora_linear as dora_reference
from deltakern.reference.lora_linear import dropout as philox_dropout

from .models import (
    assert_grad_close,
    assert_same_adapter_tensors,
    build,
    draw_normal,
    inputs,
    logits,
    loss_of,
    named_layers,
    quantize_with_bitsandbytes,
)

R, ALPHA = 4, 8
# fp32, summed in another order than PEFT's chain (the norm by the identity, not the dense sum).
TOL = {"atol": 2e-5, "rtol": 1e-4}
FAMILIES = ("llama", "gpt2", "bert")  # GPT-2: Conv1D weights [in, out]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class PhiloxDropout(nn.Module):
    """In place of PEFT's ``nn.Dropout(p)``: deltakern's dropout, the Philox mask of a seed drawn
    from torch's generator as ``dora_linear`` draws its own (one draw per call). Layers run in the
    same order on both sides, so after the same ``torch.manual_seed`` PEFT's DoRA and deltakern's
    drop the same elements."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seed = int(draw_seed())
        return philox_dropout(x.reshape(-1, x.shape[-1]), self.p, seed).reshape(x.shape)


def peft_dora(family, dropout_p=0.0, target_modules="all-linear", seed=0):
    """A PEFT DoRA model of ``family`` with random lora_B and magnitudes scaled by U(0.5, 1.5), so
    the scale m / ‖W + s·B A‖ is far from 1 in every row."""
    model = get_peft_model(build(family, seed), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout_p,
                                                           target_modules=target_modules, use_dora=True))
    torch.manual_seed(123)
    draw_normal(model, "lora_B", 0.0, 0.5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    return model


def peft_layers(model):
    return named_layers(model.get_base_model(), LoraLayer)


def ours_like(family, peft_model, dropout_p=0.0, target_modules="all-linear", seed=0):
    """add_lora(use_dora=True) on the same base, holding the PEFT model's A, B and magnitudes."""
    model = deltakern.add_lora(build(family, seed), r=R, alpha=ALPHA, dropout_p=dropout_p,
                               target_modules=target_modules, use_dora=True)
    with torch.no_grad():
        for name, layer in peft_layers(peft_model).items():
            mine = model.get_submodule(name)
            mine.lora_A.copy_(layer.lora_A["default"].weight)
            mine.lora_B.copy_(layer.lora_B["default"].weight)
            mine.lora_magnitude.copy_(layer.lora_magnitude_vector["default"].weight)
    return model


def with_philox_dropout(peft_model, p):
    """Each DoRA layer's nn.Dropout replaced by :class:`PhiloxDropout`; returns the model."""
    for layer in peft_layers(peft_model).values():
        layer.lora_dropout["default"] = PhiloxDropout(p)
    return peft_model


def train_lora_layers(model, layer_type):
    """Eval mode but for the LoRA layers: their dropout is on, the model's own (BERT's, GPT-2's)
    off, so only the LoRA masks draw from torch's generator."""
    model.eval()
    for module in model.modules():
        if isinstance(module, layer_type):
            module.train()
    return model


def forward_backward(model, family, seed=7):
    """Logits, after ``torch.manual_seed(seed)``, and the backward of :func:`loss_of` of them."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**inputs(family)).logits
    loss_of(out).backward()
    return out.detach()


def dora_grads(layer):
    """(dA, dB, dm) of a deltakern LoRALinear or a PEFT DoRA layer."""
    if isinstance(layer, LoRALinear):
        return layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude.grad
    return (layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad,
            layer.lora_magnitude_vector["default"].weight.grad)


def assert_same_dora_grads(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and ours
    for name, layer in theirs.items():
        for mine, their in zip(dora_grads(ours[name]), dora_grads(layer)):
            assert mine.abs().max() > 0, name
            assert_grad_close(mine, their)


@pytest.fixture
def calls(monkeypatch):
    """Counts the dora_linear calls made by patched PEFT layers."""
    count = {"n": 0}

    def counting(*args, **kwargs):
        count["n"] += 1
        return dora_linear(*args, **kwargs)

    monkeypatch.setattr(peft_patch, "dora_linear", counting)
    return count


@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("family", FAMILIES)
def test_add_lora_dora_matches_peft(family, dropout_p):
    """Same targeted layers, outputs and gradients of lora_A, lora_B and the magnitude as PEFT's
    DoRA; with dropout both drop the same elements (PEFT's dropout applies deltakern's mask)."""
    theirs = peft_dora(family, dropout_p)
    ours = ours_like(family, theirs, dropout_p)
    their_layers, our_layers = peft_layers(theirs), named_layers(ours, LoRALinear)
    assert set(our_layers) == set(their_layers) and all(m.use_dora for m in our_layers.values())
    if dropout_p:
        with_philox_dropout(theirs, dropout_p)
        train_lora_layers(theirs, LoraLayer)
        train_lora_layers(ours, LoRALinear)
    expected = forward_backward(theirs, family)
    got = forward_backward(ours, family)
    torch.testing.assert_close(got, expected, **TOL)
    assert_same_dora_grads(our_layers, their_layers)
    if dropout_p:  # the masks mattered
        assert not torch.allclose(got, logits(ours.eval(), family), **TOL)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("family", FAMILIES)
def test_patch_routes_peft_dora_layers(family, dropout_p, calls):
    """patch() runs every DoRA layer through dora_linear with PEFT's parameters (names
    unchanged): PEFT's outputs and gradients (with dropout: PEFT on deltakern's mask); unpatch
    puts PEFT's forward back."""
    model = peft_dora(family, dropout_p)
    twin = copy.deepcopy(model)
    if dropout_p:
        with_philox_dropout(twin, dropout_p)
        train_lora_layers(twin, LoraLayer)
        train_lora_layers(model, LoraLayer)
    expected = forward_backward(twin, family)
    names = [name for name, _ in model.named_parameters()]
    report = deltakern.patch(model)
    n = len(peft_layers(model))
    assert str(report) == f"patched {n} of {n} LoRA layers" and not report.skipped
    got = forward_backward(model, family)
    assert calls["n"] == n
    assert [name for name, _ in model.named_parameters()] == names
    torch.testing.assert_close(got, expected, **TOL)
    assert_same_dora_grads(peft_layers(model), peft_layers(twin))
    deltakern.unpatch(model)
    assert not any({"forward", peft_patch._SQNORM_CACHE} & set(layer.__dict__) for layer in peft_layers(model).values())
    torch.testing.assert_close(logits(model.eval(), family), logits(twin.eval(), family), atol=0, rtol=0)
    assert calls["n"] == n


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dora_checkpoints_both_ways(family, tmp_path):
    """PEFT save_pretrained -> deltakern.load gives PEFT's outputs; deltakern.save writes PEFT's
    keys (lora_magnitude_vector included) and config, and PeftModel.from_pretrained of it gives
    deltakern's outputs."""
    theirs = peft_dora(family).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = deltakern.load(build(family), tmp_path / "peft")
    layers = named_layers(ours, LoRALinear)
    assert set(layers) == set(peft_layers(theirs)) and all(m.use_dora for m in layers.values())
    expected = logits(theirs, family)
    torch.testing.assert_close(logits(ours, family), expected, **TOL)
    deltakern.save(ours, tmp_path / "ours")
    assert_same_adapter_tensors(tmp_path / "ours", tmp_path / "peft")
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert mine["use_dora"] is True
    for key, value in mine.items():
        if key not in ("target_modules", "task_type", "auto_mapping"):
            assert value == peft_config[key], key
    loaded = PeftModel.from_pretrained(build(family), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded, family), logits(ours, family), **TOL)


def test_dora_checkpoint_errors(tmp_path):
    """A DoRA config without magnitudes, a use_dora that is not a bool, and a model mixing DoRA
    and plain LoRA (PEFT's config has one use_dora) are refused with the reason."""
    config, state = lora_method.peft_lora_checkpoint(ours_like("llama", peft_dora("llama", target_modules=["q_proj"]),
                                                               target_modules=["q_proj"]))
    assert config["use_dora"] is True
    magnitudes = [key for key in state if key.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == 2
    with pytest.raises(ValueError, match=r"missing keys: \['base_model.model.model.layers.0.self_attn.q_proj"
                                         r".lora_magnitude_vector'"):
        lora_method.load_peft_lora(build("llama"), config, {k: v for k, v in state.items() if k != magnitudes[0]})
    with pytest.raises(ValueError, match="use_dora must be true or false, got 'yes'"):
        lora_method.load_peft_lora(build("llama"), {**config, "use_dora": "yes"}, state)
    mixed = deltakern.add_lora(build("llama"), r=R, alpha=ALPHA, target_modules=["q_proj"], use_dora=True)
    deltakern.add_lora(mixed, r=R, alpha=ALPHA, target_modules=["v_proj"])
    with pytest.raises(NotImplementedError, match=r"differ in \(r, alpha, dropout_p, scaling, use_dora\)"):
        deltakern.save(mixed, tmp_path)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_lora_folds_dora(family):
    """merge_lora folds W ← (m / ‖W + s·B A‖) ⊙ (W + s·B A) (transposed for Conv1D): the merged
    plain model gives the DoRA model's outputs, and the weights PEFT's merge_and_unload gives."""
    theirs = peft_dora(family)
    ours = ours_like(family, theirs).eval()
    expected = logits(ours, family)
    merged = deltakern.merge_lora(ours)
    assert not named_layers(merged, LoRALinear)
    torch.testing.assert_close(logits(merged, family), expected, **TOL)
    their_state, our_state = theirs.merge_and_unload().state_dict(), merged.state_dict()
    assert their_state.keys() == our_state.keys()
    for key in their_state:
        torch.testing.assert_close(our_state[key], their_state[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_weight_norm_cache_follows_the_base_weight(monkeypatch, conv1d):
    """‖W‖²_row is computed once while the base weight stays as it is, and again after an
    in-place change or a replacement of the weight; the outputs follow the new weight."""
    from transformers.pytorch_utils import Conv1D

    passed = []

    def spy(*args, **kwargs):
        passed.append(kwargs["weight_sqnorm"])
        return dora_linear(*args, **kwargs)

    monkeypatch.setattr(nn_lora, "dora_linear", spy)
    torch.manual_seed(0)
    base = Conv1D(10, 24) if conv1d else nn.Linear(24, 10)
    nn.init.normal_(base.bias)
    base.requires_grad_(False)
    layer = LoRALinear(base, r=3, alpha=6, use_dora=True)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(torch.rand(10) + 0.5)
    x = torch.randn(5, 24)

    def check(y):
        dense = base.weight.t() if conv1d else base.weight
        torch.testing.assert_close(passed[-1], dense.square().sum(1), atol=1e-5, rtol=1e-5)
        expected = dora_reference(x.double(), dense.double(), base.bias.double(), layer.lora_A.double(),
                                  layer.lora_B.double(), layer.lora_magnitude.double(), layer.scaling)
        torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)

    first = layer(x)
    check(first)
    check(layer(x))
    assert passed[1] is passed[0]  # cached, not recomputed
    with torch.no_grad():
        base.weight.mul_(torch.rand_like(base.weight) + 0.5)  # in place: an optimizer step
    changed = layer(x)
    check(changed)
    kept = base.weight  # alive, so the new weight cannot reuse its memory
    base.weight = nn.Parameter(torch.randn_like(kept), requires_grad=False)
    check(layer(x))
    assert not torch.allclose(changed, first) and len({id(t) for t in passed}) == 3


def test_patched_dora_follows_peft_state_changes(calls):
    """After patch: a merged DoRA adapter runs PEFT's path (PEFT's merged outputs), unmerging
    brings dora_linear back with the unmerged weight's norms, disabled adapters give the base."""
    model = peft_dora("llama", target_modules=LLAMA_TARGETS).eval()
    x = inputs("llama")
    expected = model(**x).logits
    with model.disable_adapter():
        base_out = model(**x).logits
    deltakern.patch(model)
    n = len(peft_layers(model))
    torch.testing.assert_close(model(**x).logits, expected, **TOL)
    assert calls["n"] == n
    model.merge_adapter()
    torch.testing.assert_close(model(**x).logits, expected, **TOL)
    assert calls["n"] == n
    # PEFT writes the merge through .data (no version bump): the ‖W‖² caches are dropped.
    assert not any("_deltakern_weight_sqnorm" in layer.__dict__ for layer in peft_layers(model).values())
    model.unmerge_adapter()
    torch.testing.assert_close(model(**x).logits, expected, **TOL)
    assert calls["n"] == 2 * n
    with model.disable_adapter():  # PEFT's unmerge leaves W rounded: not bit for bit the base
        torch.testing.assert_close(model(**x).logits, base_out, **TOL)
    assert calls["n"] == 2 * n


def _two_active_dora():
    model = peft_dora("llama", target_modules=["q_proj"])
    model.add_adapter("other", LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"], use_dora=True))
    model.base_model.set_adapter(["default", "other"])
    return model


def _float64_magnitude():
    model = peft_dora("llama", target_modules=["q_proj"])
    for layer in peft_layers(model).values():
        layer.lora_magnitude_vector["default"].double()
    return model


@pytest.mark.parametrize("make, reason", [
    (_two_active_dora, "several active adapters with DoRA (PEFT chains their magnitude scales; not fused)"),
    (_float64_magnitude, "DoRA magnitude in torch.float64, LoRA weights in torch.float32"),
], ids=["two-active", "magnitude-dtype"])
def test_unfusable_dora_layers_stay_on_peft(make, reason, calls):
    model = make()
    expected = logits(model, "llama")
    report = deltakern.patch(model)
    assert report.patched == []
    assert report.skipped == [(f"model.layers.{i}.self_attn.q_proj", reason) for i in range(2)]
    torch.testing.assert_close(logits(model, "llama"), expected, atol=0, rtol=0)
    assert calls["n"] == 0


def _bnb_llama(seed=0):
    """The tiny Llama with its targeted layers in bitsandbytes NF4 (fp32 absmax), loaded in 4 bits."""
    return quantize_with_bitsandbytes(build("llama", seed), LLAMA_TARGETS)


def test_qdora_matches_peft_over_bitsandbytes_and_patch_routes_it(calls):
    """add_lora(use_dora=True, quantize_base="nf4") starts with PEFT's magnitudes (‖dequant W‖)
    and gives the outputs and gradients of PEFT's DoRA over bitsandbytes' Linear4bit (same NF4
    bytes); patch() routes PEFT's DoRA over an NF4 Linear4bit through dora_linear with the same
    outputs and gradients."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(1)
    theirs = get_peft_model(_bnb_llama(), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=LLAMA_TARGETS,
                                                         use_dora=True)).eval()
    ours = deltakern.add_lora(build("llama"), r=R, alpha=ALPHA, target_modules=LLAMA_TARGETS, quantize_base="nf4",
                              use_dora=True).eval()
    their_layers, our_layers = peft_layers(theirs), named_layers(ours, LoRALinear)
    assert set(our_layers) == set(their_layers) and len(our_layers) == 14
    for name, layer in our_layers.items():
        assert isinstance(layer.base_layer, NF4Linear)
        torch.testing.assert_close(layer.lora_magnitude, their_layers[name].lora_magnitude_vector["default"].weight,
                                   atol=1e-6, rtol=1e-6)
    torch.manual_seed(123)
    draw_normal(theirs, "lora_B", 0.0, 0.5)
    with torch.no_grad():
        for name, layer in our_layers.items():
            their = their_layers[name]
            their.lora_magnitude_vector["default"].weight.mul_(torch.empty(layer.out_features).uniform_(0.5, 1.5))
            layer.lora_A.copy_(their.lora_A["default"].weight)
            layer.lora_B.copy_(their.lora_B["default"].weight)
            layer.lora_magnitude.copy_(their.lora_magnitude_vector["default"].weight)
    expected = forward_backward(theirs, "llama")
    torch.testing.assert_close(forward_backward(ours, "llama"), expected, **TOL)
    assert_same_dora_grads(our_layers, their_layers)
    peft_grads = {name: [p.grad.clone() for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                                  layer.lora_magnitude_vector["default"].weight)]
                  for name, layer in their_layers.items()}
    report = deltakern.patch(theirs)
    assert len(report.patched) == 14 and report.skipped == []
    torch.testing.assert_close(forward_backward(theirs, "llama"), expected, **TOL)
    assert calls["n"] == 14
    for name, layer in their_layers.items():
        patched = (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                   layer.lora_magnitude_vector["default"].weight)
        for got, want in zip(patched, peft_grads[name]):
            torch.testing.assert_close(got.grad, want, **TOL)


def test_use_dora_must_be_a_bool():
    with pytest.raises(ValueError, match="deltakern.nn.LoRALinear: use_dora must be a bool, got 'yes'"):
        deltakern.add_lora(build("llama"), target_modules=["q_proj"], use_dora="yes")
    with pytest.raises(ValueError, match="use_dora must be a bool, got 1"):
        LoRALinear(nn.Linear(4, 4), r=2, alpha=4, use_dora=1)
