"""deltakern.patch / unpatch on PEFT LoRA models: same outputs and gradients as PEFT's own path."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

import deltakern
from deltakern.ops.lora_linear import lora_linear
from deltakern.patch import peft_patch

from .models import FAMILIES, build, draw_normal, inputs
from .test_lora import R, ALPHA, TOL, assert_grad_close, peft_layers, peft_lora


@pytest.fixture
def calls(monkeypatch):
    """Counts the lora_linear calls made by patched layers."""
    count = {"n": 0}

    def counting(*args, **kwargs):
        count["n"] += 1
        return lora_linear(*args, **kwargs)

    monkeypatch.setattr(peft_patch, "lora_linear", counting)
    return count


def run(model, family, g=None):
    """Logits and {param name: grad} of a backward of sum(logits · g)."""
    model.zero_grad(set_to_none=True)
    y = model(**inputs(family)).logits
    g = torch.randn_like(y, generator=torch.Generator().manual_seed(5)) if g is None else g
    (y * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_keeps_outputs_and_gradients(family, calls):
    model = peft_lora(family)
    names_before = [n for n, _ in model.named_parameters()]
    y_peft, g_peft = run(model, family)
    report = deltakern.patch(model)
    n = len(peft_layers(model))
    assert str(report) == f"patched {n} of {n} LoRA layers" and not report.skipped
    y_ours, g_ours = run(model, family)
    assert calls["n"] == n  # every LoRA layer ran lora_linear once
    assert [name for name, _ in model.named_parameters()] == names_before
    torch.testing.assert_close(y_ours, y_peft, **TOL)
    assert g_ours.keys() == g_peft.keys() and len(g_ours) == 2 * n
    for name in g_peft:
        assert_grad_close(g_ours[name], g_peft[name])
    deltakern.unpatch(model)
    assert not any("forward" in layer.__dict__ for layer in peft_layers(model).values())
    y_back, _ = run(model, family)
    assert calls["n"] == n
    torch.testing.assert_close(y_back, y_peft, atol=0, rtol=0)


def _with_second_adapter(model, target_modules="all-linear"):
    model.add_adapter("other", LoraConfig(r=R, lora_alpha=ALPHA, target_modules=target_modules))
    draw_normal(model, "lora_B.other", 0.0, 0.5)
    return model


def _merged():
    model = peft_lora("llama", ["q_proj"])
    model.merge_adapter()
    return model


def _lora_bias():
    return get_peft_model(build("llama"), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"], lora_bias=True))


@pytest.mark.parametrize("make, reason", [(_merged, "merged weights"), (_lora_bias, "lora_bias")],
                         ids=["merged", "lora_bias"])
def test_unfusable_layers_are_skipped(make, reason, calls):
    model = make()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    expected = model(**inputs("llama")).logits
    report = deltakern.patch(model)
    assert report.patched == []
    assert report.skipped == [(f"model.layers.{i}.self_attn.q_proj", reason) for i in range(2)]
    assert str(report) == (f"patched 0 of 2 LoRA layers; skipped 2: model.layers.0.self_attn.q_proj ({reason}), "
                           f"model.layers.1.self_attn.q_proj ({reason})")
    torch.testing.assert_close(model(**inputs("llama")).logits, expected, atol=0, rtol=0)
    assert calls["n"] == 0


def test_other_layer_types_are_skipped(calls):
    model = peft_lora("llama", ["q_proj", "embed_tokens"])
    expected = model(**inputs("llama")).logits
    report = deltakern.patch(model)
    assert report.skipped == [("model.embed_tokens", "Embedding LoRA layer")]
    assert len(report.patched) == 2
    assert str(report).startswith("patched 2 of 3 LoRA layers; skipped 1: model.embed_tokens (Embedding LoRA layer)")
    torch.testing.assert_close(model(**inputs("llama")).logits, expected, **TOL)
    assert calls["n"] == 2


def test_state_changes_after_patch_stay_correct(calls):
    """Merging, switching or disabling adapters after patch gives PEFT's results."""
    model = _with_second_adapter(peft_lora("llama"))
    x = inputs("llama")
    out = {}
    for state in ("default", "other", "merged", "disabled"):
        model.base_model.set_adapter("other" if state == "other" else "default")
        if state == "merged":
            model.merge_adapter()
        if state == "disabled":
            with model.disable_adapter():
                out[state] = model(**x).logits
        else:
            out[state] = model(**x).logits
        if state == "merged":
            model.unmerge_adapter()
    deltakern.patch(model)
    n = len(peft_layers(model))
    for state in ("default", "other", "merged", "disabled"):
        model.base_model.set_adapter("other" if state == "other" else "default")
        before = calls["n"]
        if state == "merged":
            model.merge_adapter()
        if state == "disabled":
            with model.disable_adapter():
                y = model(**x).logits
        else:
            y = model(**x).logits
        if state == "merged":
            model.unmerge_adapter()
        torch.testing.assert_close(y, out[state], **TOL)
        assert calls["n"] - before == (n if state in ("default", "other") else 0), state
    assert not torch.allclose(out["default"], out["other"])


def test_dropout():
    """lora_dropout p > 0: eval outputs equal PEFT's; in training the patched layer computes
    lora_linear with p and the seed drawn from torch's generator (masks are deltakern's)."""
    model = get_peft_model(build("llama"), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.3, target_modules=["v_proj"]))
    draw_normal(model, "lora_B", 0.0, 0.5)
    model.eval()
    expected = model(**inputs("llama")).logits
    deltakern.patch(model)
    torch.testing.assert_close(model(**inputs("llama")).logits, expected, **TOL)
    layer = peft_layers(model)["model.layers.0.self_attn.v_proj"]
    model.train()
    x = torch.randn(3, 32)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    ref = lora_linear(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight,
                      layer.lora_B["default"].weight, layer.scaling["default"], 0.3)
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    no_drop = lora_linear(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight,
                          layer.lora_B["default"].weight, layer.scaling["default"], 0.0)
    assert not torch.allclose(y, no_drop)


def test_no_lora_layers_raise():
    with pytest.raises(ValueError, match="deltakern.patch: LlamaForCausalLM has no PEFT LoRA layers"):
        deltakern.patch(build("llama"))


def test_a_patched_model_pickles_whole_and_unpatches(tmp_path):
    """torch.save of the whole model (pickle) works after patch, as it does for PEFT's model; the
    loaded copy is still patched and computes the same; unpatch puts PEFT's forward back."""
    model = get_peft_model(build("llama"), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"]))
    draw_normal(model, "lora_B", std=0.1)
    assert len(deltakern.patch(model).patched) == 4
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    data = inputs("llama")
    assert torch.equal(loaded(**data).logits, model(**data).logits)
    layers = [m for m in loaded.modules() if "forward" in m.__dict__]
    assert len(layers) == 4 and all(peft_patch._is_patched(m) for m in layers)
    deltakern.unpatch(loaded)
    assert not any("forward" in m.__dict__ for m in loaded.modules())


def test_a_model_with_named_adapters_pickles_whole(tmp_path):
    model = deltakern.add_lora(build("llama"), r=4, adapter_name="a")
    deltakern.add_lora(model, r=4, adapter_name="b")
    draw_normal(model, "lora_B", std=0.1)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    data = inputs("llama")
    assert torch.equal(loaded(**data, adapter_names=["a", "b"]).logits, model(**data, adapter_names=["a", "b"]).logits)
    assert loaded.generate.args == (loaded,)  # generate takes adapter_names on the loaded model itself
