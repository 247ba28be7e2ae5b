"""deltakern.patch on PEFT models holding several LoRA adapters (issue 17): mixed batches
(``adapter_names``) through ``segmented_lora_linear`` and several active adapters
(``set_adapter([...])``) through one ``lora_linear`` over concatenated factors, against PEFT's own
unpatched forward, ``generate``, gradients and errors, on a tiny Llama and GPT-2 (Conv1D bases).

Three adapters with non-zero (random) lora_B: ``r1`` (r=1, alpha 2, a dropout module), ``r8``
(r=8, rsLoRA) and ``r16`` (r=16) on fewer modules than the others, so some layers lack an adapter a
sequence asks for.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

import deltakern
from deltakern.ops.lora_linear import lora_linear
from deltakern.patch import peft_patch
from tests.tolerances import TOLERANCES

from .models import (
    assert_same_adapter_tensors,
    build,
    draw_normal,
    inputs,
    named_layers,
    quantize_with_bitsandbytes,
)

# ``r16`` targets these only (the other layers lack it).
R16_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
FAMILIES = ("llama", "gpt2")
NAMES = ["r1", "__base__", "r16", "r8", "r1"]  # one per sequence of a batch of 5


def tol(dtype):
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def multi_adapter_model(family: str, dtype=torch.float32, dora_c: bool = False):
    """A PEFT model with adapters r1 (r=1, s=2, dropout 0.1), r8 (r=8, rsLoRA, s=16/√8) and r16
    (r=16, s=2, fewer targets; DoRA with ``dora_c``), lora_B drawn at random, in eval mode and
    ``dtype``."""
    model = get_peft_model(build(family), LoraConfig(r=1, lora_alpha=2, lora_dropout=0.1,
                                                     target_modules="all-linear"), adapter_name="r1")
    model.add_adapter("r8", LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"))
    model.add_adapter("r16", LoraConfig(r=16, lora_alpha=32, target_modules=R16_TARGETS[family], use_dora=dora_c))
    torch.manual_seed(11)
    draw_normal(model, "lora_B", 0.0, 0.5)
    return model.to(dtype).eval()  # new adapters' dropout modules start in training mode


def lora_layers(model) -> dict[str, LoraLayer]:
    return named_layers(model.get_base_model(), LoraLayer)


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls of the fused ops (and of lora_segments) made by patched layers; empties
    the segment cache first so that counts do not depend on other tests."""
    count = {"segmented": 0, "lora_linear": 0, "segments": 0}

    def counter(key, fn):
        def wrapped(*args, **kwargs):
            count[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(peft_patch, "segmented_lora_linear", counter("segmented", peft_patch.segmented_lora_linear))
    monkeypatch.setattr(peft_patch, "lora_linear", counter("lora_linear", lora_linear))
    monkeypatch.setattr(peft_patch, "lora_segments", counter("segments", peft_patch.lora_segments))
    peft_patch._SEGMENTS.clear()
    return count


def batch(family):
    return inputs(family, batch=len(NAMES), length=7, pad=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_matches_peft(family, dtype, counted):
    model = multi_adapter_model(family, dtype)
    x = batch(family)
    names = list(NAMES)
    mutated = ["r8", "r16", "r1", "__base__", "r1"]  # the same adapters, on other sequences
    expected = model(**x, adapter_names=names).logits
    expected_mutated = model(**x, adapter_names=mutated).logits
    expected_single = model(**x).logits  # adapter r1 active
    names_before = [n for n, _ in model.named_parameters()]

    report = deltakern.patch(model)
    n = len(lora_layers(model))
    assert report.skipped == [] and len(report.patched) == n
    y = model(**x, adapter_names=names).logits
    torch.testing.assert_close(y, expected, **tol(dtype))
    assert not torch.allclose(expected, expected_single)  # the adapters differ from each other
    assert counted["segmented"] == n  # every layer ran segmented_lora_linear once
    # segments are built once per batch for each set of adapters a layer holds ({r1, r8, r16} and
    # {r1, r8}), not once per layer; a second forward on the same names reuses them.
    assert counted["segments"] == 2
    model(**x, adapter_names=names)
    assert counted["segments"] == 2 and counted["segmented"] == 2 * n
    # the same list object mutated in place: new segments, PEFT's result for the new names
    names[:] = mutated
    torch.testing.assert_close(model(**x, adapter_names=names).logits, expected_mutated, **tol(dtype))
    assert counted["segments"] == 4
    # no adapter_names: the active adapter through lora_linear, as before
    torch.testing.assert_close(model(**x).logits, expected_single, **tol(dtype))
    assert counted["lora_linear"] == n
    assert [name for name, _ in model.named_parameters()] == names_before

    deltakern.unpatch(model)
    assert not any("forward" in layer.__dict__ for layer in lora_layers(model).values())
    torch.testing.assert_close(model(**x, adapter_names=NAMES).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_adapter_names_matches_peft(family, counted):
    model = multi_adapter_model(family)
    x = inputs(family, batch=3, length=5, pad=2)
    names = ["r8", "__base__", "r16"]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "output_scores": True,
              "return_dict_in_generate": True}
    greedy = model.generate(**x, adapter_names=names, **kwargs)
    beams = model.generate(**x, adapter_names=names, num_beams=2, **kwargs)
    deltakern.patch(model)
    ours = model.generate(**x, adapter_names=names, **kwargs)
    assert counted["segmented"] > 0
    assert torch.equal(ours.sequences, greedy.sequences)
    for s, e in zip(ours.scores, greedy.scores, strict=True):
        torch.testing.assert_close(s, e, **tol(torch.float32))
    # beam search: PEFT repeats each name per beam; the layers get the longer list
    ours_beams = model.generate(**x, adapter_names=names, num_beams=2, **kwargs)
    assert torch.equal(ours_beams.sequences, beams.sequences)


def grads_of(model, x, g):
    model.zero_grad(set_to_none=True)
    y = model(**x).logits
    (y * g).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("active", [("r1", "r8", "r16"), ("r1", "r16")], ids=["3-scalings-differ", "2-same-scaling"])
@pytest.mark.parametrize("family", FAMILIES)
def test_several_active_adapters_match_peft(family, active, counted):
    """set_adapter([...]): outputs and the gradients of every adapter's factors equal PEFT's; each
    layer runs one lora_linear over the concatenated factors of the adapters it holds."""
    model = multi_adapter_model(family, torch.float64)
    model.base_model.set_adapter(list(active))  # makes the active adapters trainable
    x = batch(family)
    g = torch.randn(len(NAMES), 7, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y_peft, g_peft = grads_of(model, x, g)
    report = deltakern.patch(model)
    assert report.skipped == []
    y, g_ours = grads_of(model, x, g)
    torch.testing.assert_close(y, y_peft, **tol(torch.float64))
    assert counted["lora_linear"] == len(lora_layers(model))
    assert g_ours.keys() == g_peft.keys()
    assert {n.split(".")[-2] for n in g_ours if "lora_" in n} == set(active)
    for name in g_peft:
        torch.testing.assert_close(g_ours[name], g_peft[name], **tol(torch.float64), msg=name)


def test_several_active_adapters_with_dropout_in_training():
    """Training with several active adapters, two with dropout: the adapter without dropout (r8)
    runs with the base as one lora_linear (no mask), and each adapter with dropout (r1: p=0.1,
    drop: p=0.5) adds its own term with a mask of its own from torch's generator, as PEFT does: the
    output is that formula exactly, not the mask-free sum, and every adapter gets gradients."""
    model = multi_adapter_model("llama")
    model.add_adapter("drop", LoraConfig(r=8, lora_alpha=8, lora_dropout=0.5, target_modules="all-linear"))
    draw_normal(model, "lora_B.drop", 0.0, 0.5)
    model.base_model.set_adapter(["r1", "r8", "drop"])
    deltakern.patch(model)
    layer = lora_layers(model)["model.layers.0.mlp.down_proj"]
    model.train()
    x = torch.randn(6, layer.in_features, generator=torch.Generator().manual_seed(2), requires_grad=True)
    torch.manual_seed(9)
    y = layer(x)

    F = torch.nn.functional
    W, bias, s = layer.base_layer.weight, layer.base_layer.bias, layer.scaling
    adapters = ("r1", "r8", "drop")
    A = {k: layer.lora_A[k].weight for k in adapters}
    B = {k: layer.lora_B[k].weight for k in adapters}
    torch.manual_seed(9)
    ref = lora_linear(x, W, bias, A["r8"], B["r8"], s["r8"], 0.0)
    no_dropout = ref
    for k, p in (("r1", 0.1), ("drop", 0.5)):
        ref = ref + F.linear(F.linear(F.dropout(x, p, training=True), A[k]), B[k]) * s[k]
        no_dropout = no_dropout + F.linear(F.linear(x, A[k]), B[k]) * s[k]
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    assert not torch.allclose(y, no_dropout)
    y.sum().backward()
    assert all(layer.lora_A[k].weight.grad.abs().sum() > 0 for k in adapters) and x.grad is not None


def test_mixed_batch_in_training_mode_has_peft_gradients(counted):
    """PEFT refuses adapter_names on a model in training mode, but a layer called directly takes
    them: outputs and gradients (x, every adapter's factors; zeros for an adapter with no rows)
    equal PEFT's, dropout off."""
    model = multi_adapter_model("gpt2", torch.float64)
    for layer in lora_layers(model).values():
        layer.lora_dropout["r1"].p = 0.0
    model.base_model.set_adapter(["r1", "r8", "r16"])  # all trainable
    model.train()
    layer = lora_layers(model)["transformer.h.0.attn.c_attn"]  # Conv1D base, holds a, b and c
    x0 = torch.randn(4, 3, layer.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    names = ["r8", "__base__", "r8", "r1"]  # r16: no rows
    g = torch.randn(4, 3, layer.out_features, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def run():
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        y = layer(x, adapter_names=names)
        (y * g).sum().backward()
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in layer.named_parameters()
                 if p.requires_grad}
        return y.detach(), x.grad, grads

    y_peft, dx_peft, g_peft = run()
    deltakern.patch(model)
    y, dx, grads = run()
    assert counted["segmented"] == 1
    torch.testing.assert_close(y, y_peft, **tol(torch.float64))
    torch.testing.assert_close(dx, dx_peft, **tol(torch.float64))
    assert grads.keys() == g_peft.keys()
    for name in g_peft:
        torch.testing.assert_close(grads[name], g_peft[name], **tol(torch.float64), msg=name)
    assert grads["lora_B.r16.weight"].abs().sum() == 0 and grads["lora_B.r8.weight"].abs().sum() > 0


def test_bad_adapter_names_raise_as_peft():
    model = multi_adapter_model("llama")
    x = batch("llama")
    deltakern.patch(model)
    with pytest.raises(ValueError, match=r"Trying to infer with non-existing adapter\(s\): nope"):
        model(**x, adapter_names=["r1", "nope", "r8", "r8", "__base__"])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs"):
        model(**x, adapter_names=["r1", "r8"])
    model.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        model(**x, adapter_names=NAMES)


def test_dora_in_mixed_batches_and_several_active_dora():
    """Several active adapters one of which is DoRA stay on PEFT's path, with the reason in the
    report; a mixed batch of plain adapters on a model that also holds a DoRA adapter is fused, and
    one naming the DoRA adapter raises PEFT's error from the patched layer."""
    model = multi_adapter_model("llama", dora_c=True)
    x = batch("llama")
    model.base_model.set_adapter(["r1", "r16"])
    expected = model(**x).logits
    report = deltakern.patch(model)
    reason = "several active adapters with DoRA (PEFT chains their magnitude scales; not fused)"
    assert report.skipped == [(f"model.layers.{i}.self_attn.{p}", reason) for i in range(2) for p in R16_TARGETS["llama"]]
    torch.testing.assert_close(model(**x).logits, expected, atol=0, rtol=0)

    deltakern.unpatch(model)
    model.base_model.set_adapter("r1")
    names = ["r1", "r8", "__base__", "r1", "r8"]
    expected = model(**x, adapter_names=names).logits
    report = deltakern.patch(model)
    assert report.skipped == []
    torch.testing.assert_close(model(**x, adapter_names=names).logits, expected, **tol(torch.float32))
    # last: PEFT leaves its adapter_names hooks registered when a layer raises
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        model(**x, adapter_names=NAMES)


def test_save_pretrained_keeps_every_adapter(tmp_path):
    model = multi_adapter_model("llama")
    model.save_pretrained(tmp_path / "peft")
    deltakern.patch(model)
    model(**batch("llama"), adapter_names=NAMES)
    model.save_pretrained(tmp_path / "ours")
    for sub in ("r1", "r8", "r16"):  # PEFT writes each adapter not named "default" in a subfolder
        assert_same_adapter_tensors(tmp_path / "ours" / sub, tmp_path / "peft" / sub)


def test_qlora_mixed_batch_and_several_active_match_peft(counted):
    """Over bitsandbytes NF4 bases: a mixed batch (the NF4 weight dequantised for
    segmented_lora_linear) and several active adapters (one qlora_linear over the concatenated
    factors) equal PEFT's forward over Linear4bit."""
    pytest.importorskip("bitsandbytes")
    targets = ["q_proj", "v_proj", "down_proj"]
    model = quantize_with_bitsandbytes(build("llama"), targets)
    model = get_peft_model(model, LoraConfig(r=1, lora_alpha=2, target_modules=targets), adapter_name="r1")
    model.add_adapter("r16", LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=targets))
    torch.manual_seed(3)
    draw_normal(model, "lora_B", 0.0, 0.5)
    model.eval()
    x = batch("llama")
    names = ["r16", "r1", "__base__", "r1", "r16"]
    expected_mixed = model(**x, adapter_names=names).logits
    model.base_model.set_adapter(["r1", "r16"])
    expected_sum = model(**x).logits
    report = deltakern.patch(model)
    assert report.skipped == [] and len(report.patched) == 6
    torch.testing.assert_close(model(**x).logits, expected_sum, **tol(torch.float32))
    torch.testing.assert_close(model(**x, adapter_names=names).logits, expected_mixed, **tol(torch.float32))
    assert counted["segmented"] == 6
