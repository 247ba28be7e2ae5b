"""deltakern.add_lora / merge_lora / LoRA checkpoints against PEFT LoRA with the same weights."""

import json

import pytest
import torch
from peft import LoHaConfig, LoraConfig, PeftModel, get_peft_model

import deltakern
from deltakern.nn import LoRALinear
from deltakern.patch import lora as lora_method

from .models import FAMILIES, assert_grad_close, assert_same_adapter_tensors, build, draw_normal, logits, named_layers

R, ALPHA = 4, 8
TOL = dict(atol=2e-5, rtol=1e-4)


def peft_lora(family, target_modules="all-linear", use_rslora=False, seed=0):
    """A PEFT LoRA model of ``family`` with random (non-zero) lora_B."""
    model = get_peft_model(build(family, seed), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                           target_modules=target_modules, use_rslora=use_rslora))
    torch.manual_seed(123)
    draw_normal(model, "lora_B", 0.0, 0.5)
    return model


def peft_layers(peft_model):
    """{qualified name relative to the base model: PEFT lora layer}."""
    from peft.tuners.lora import LoraLayer

    return named_layers(peft_model.get_base_model(), LoraLayer)


def ours_like(family, peft_model, target_modules="all-linear", use_rslora=False, seed=0):
    model = deltakern.add_lora(build(family, seed), r=R, alpha=ALPHA, target_modules=target_modules,
                               use_rslora=use_rslora)
    theirs = peft_layers(peft_model)
    with torch.no_grad():
        for name, layer in theirs.items():
            mine = model.get_submodule(name)
            mine.lora_A.copy_(layer.lora_A["default"].weight)
            mine.lora_B.copy_(layer.lora_B["default"].weight)
    return model


def ours_layers(model):
    return named_layers(model, LoRALinear)


@pytest.mark.parametrize("family", FAMILIES)
def test_add_lora_matches_peft(family):
    """Same targeted layers, logits and lora_A / lora_B gradients as PEFT "all-linear"."""
    theirs = peft_lora(family)
    ours = ours_like(family, theirs)
    peft_map, our_map = peft_layers(theirs), ours_layers(ours)
    assert set(our_map) == set(peft_map)
    y_theirs, y_ours = logits(theirs, family), logits(ours, family)
    torch.testing.assert_close(y_ours, y_theirs, **TOL)
    g = torch.randn_like(y_ours)
    (y_theirs * g).sum().backward()
    (y_ours * g).sum().backward()
    for name, layer in peft_map.items():
        mine = our_map[name]
        assert_grad_close(mine.lora_A.grad, layer.lora_A["default"].weight.grad)
        assert_grad_close(mine.lora_B.grad, layer.lora_B["default"].weight.grad)
        assert mine.lora_B.grad.abs().max() > 0


def test_rslora_and_target_list():
    """A suffix list selects what PEFT selects; rsLoRA scaling alpha / sqrt(r) as PEFT."""
    targets = ["q_proj", "v_proj", "down_proj"]
    theirs = peft_lora("llama", targets, use_rslora=True)
    ours = ours_like("llama", theirs, targets, use_rslora=True)
    peft_map, our_map = peft_layers(theirs), ours_layers(ours)
    assert set(our_map) == set(peft_map) and len(our_map) == 6
    for name, layer in peft_map.items():
        assert our_map[name].scaling == pytest.approx(layer.scaling["default"]) == pytest.approx(ALPHA / R**0.5)
    torch.testing.assert_close(logits(ours, "llama"), logits(theirs, "llama"), **TOL)


def test_base_frozen_and_only_lora_trains():
    model = deltakern.add_lora(build("gpt2"), r=R, alpha=ALPHA)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == 2 * len(ours_layers(model)) == 16
    count = deltakern.trainable_parameters(model)
    assert count.trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable)


def test_unknown_targets_raise():
    with pytest.raises(ValueError, match=r"\['nope', 'c_attn'\] match no nn.Linear.*q_proj"):
        deltakern.add_lora(build("llama"), target_modules=["q_proj", "nope", "c_attn"])
    with pytest.raises(ValueError, match="target_modules must be 'all-linear'"):
        deltakern.add_lora(build("llama"), target_modules="q_proj")


def test_conv1d_weight_is_not_copied():
    """GPT-2's Conv1D weight [in, out] goes to lora_linear as a transposed view: no op in forward
    or backward copies a tensor of the weight's size."""
    model = deltakern.add_lora(build("gpt2"), r=R, alpha=ALPHA, target_modules=["c_fc"])
    layer = model.get_submodule("transformer.h.0.mlp.c_fc")
    assert layer.fan_in_fan_out and tuple(layer.base_layer.weight.shape) == (32, 128)
    x = torch.randn(5, 32, requires_grad=True)
    with torch.profiler.profile(record_shapes=True) as prof:
        layer(x).sum().backward()
    copies = [e.input_shapes for e in prof.events() if e.name in ("aten::clone", "aten::copy_", "aten::contiguous")]
    assert copies and not any(shape and shape[0] in ([32, 128], [128, 32]) for shape in copies)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_lora_equals_unmerged(family):
    model = ours_like(family, peft_lora(family))
    expected = logits(model, family)
    merged = deltakern.merge_lora(model)
    assert not ours_layers(merged)
    assert type(merged.get_submodule("model.layers.0.self_attn.q_proj" if family == "llama"
                                     else "transformer.h.0.attn.c_attn")).__name__ in ("Linear", "Conv1D")
    torch.testing.assert_close(logits(merged, family), expected, **TOL)


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_peft_checkpoint_loads(family, tmp_path):
    """PEFT save_pretrained -> deltakern.load on the plain base reproduces PEFT's outputs."""
    theirs = peft_lora(family)
    theirs.save_pretrained(tmp_path)
    expected = logits(theirs.eval(), family)
    ours = deltakern.load(build(family), tmp_path)
    assert set(ours_layers(ours)) == set(peft_layers(theirs))
    torch.testing.assert_close(logits(ours, family), expected, **TOL)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_deltakern_save_loads_in_peft(family, tmp_path):
    """deltakern.save -> PeftModel.from_pretrained gives our outputs; the config fields we write
    equal those PEFT writes for the same LoRA model."""
    theirs = peft_lora(family)
    ours = ours_like(family, theirs)
    deltakern.save(ours, tmp_path / "ours")
    loaded = PeftModel.from_pretrained(build(family), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded, family), logits(ours, family), **TOL)
    theirs.save_pretrained(tmp_path / "peft")
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key, value in mine.items():
        if key in ("target_modules", "task_type", "auto_mapping"):
            continue
        assert value == peft_config[key], key
    assert set(mine["target_modules"]) == set(peft_config["target_modules"])
    assert_same_adapter_tensors(tmp_path / "ours", tmp_path / "peft")


def test_other_peft_type_raises(tmp_path):
    model = get_peft_model(build("llama"), LoHaConfig(r=R, alpha=ALPHA, target_modules=["k_proj", "down_proj"]))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'LOHA'"):
        deltakern.load(build("llama"), tmp_path)


def test_unsupported_lora_options_raise(tmp_path):
    model = get_peft_model(build("llama"), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"],
                                                      layers_to_transform=[0]))
    model.save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match=r"layers_to_transform=\[0\]"):
        deltakern.load(build("llama"), tmp_path)
    config, state = lora_method.peft_lora_checkpoint(ours_like("llama", peft_lora("llama")))
    with pytest.raises(NotImplementedError, match="lora_bias=True"):
        lora_method.load_peft_lora(build("llama"), {**config, "lora_bias": True}, state)
    with pytest.raises(ValueError, match="unexpected keys"):
        lora_method.load_peft_lora(build("llama"), config, {**state, "base_model.model.extra.lora_A.weight": state[
            next(iter(state))]})


def test_all_linear_leaves_the_layers_of_other_delta_modules_alone():
    model = build("llama")
    deltakern.add_adapters(model, bottleneck=4)
    deltakern.add_lora(model, r=2)
    lora_layers = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(lora_layers) == 14 and not any(".adapter." in n for n in lora_layers)
    assert all(".adapter." in n or "lora_" in n for n, p in model.named_parameters() if p.requires_grad)
