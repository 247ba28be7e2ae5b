"""deltakern.add_ia3 / IA3Linear / (IA)³ checkpoints against PEFT IA3 with the same vectors."""

import json

import pytest
import torch
import transformers
from peft import IA3Config, PeftModel, get_peft_model

import deltakern
from deltakern.nn import IA3Linear

from .models import VOCAB, assert_grad_close, assert_same_adapter_tensors, build, draw_normal, logits, named_layers

TOL = dict(atol=2e-5, rtol=1e-4)
FAMILIES = ("llama", "gpt2", "bert", "t5")


def peft_ia3(family, config=None, seed=0):
    """A PEFT IA3 model of ``family`` (PEFT's defaults for its model type unless ``config``) with
    random vectors around 1 (not ones, so every scale matters)."""
    model = get_peft_model(build(family, seed), config or IA3Config())
    torch.manual_seed(123)
    draw_normal(model, "ia3_l", 1.0, 0.5)
    return model


def peft_layers(peft_model):
    """{qualified name relative to the base model: PEFT IA3 layer}."""
    from peft.tuners.ia3 import IA3Layer

    return named_layers(peft_model.get_base_model(), IA3Layer)


def ours_layers(model):
    return named_layers(model, IA3Linear)


def ours_like(family, peft_model, seed=0, **kwargs):
    model = deltakern.add_ia3(build(family, seed), **kwargs)
    ours = ours_layers(model)
    with torch.no_grad():
        for name, layer in peft_layers(peft_model).items():
            ours[name].ia3_l.copy_(layer.ia3_l["default"].flatten())
    return model


def test_ia3_linear_by_hand():
    """Keys/values: base(x) * l (bias scaled too); feedforward: base(x * l); for nn.Linear and
    GPT-2's Conv1D ([in, out] weight); ones at initialisation leave the layer unchanged (up to
    fp32 rounding)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6)
    linear = torch.nn.Linear(6, 4)
    conv = transformers.pytorch_utils.Conv1D(4, 6)
    torch.nn.init.normal_(conv.bias)
    for base in (linear, conv):
        out_layer, ff_layer = IA3Linear(base, feedforward=False), IA3Linear(base, feedforward=True)
        assert out_layer.ia3_l.shape == (4,) and ff_layer.ia3_l.shape == (6,)
        # Not bitwise: the fused kernel runs its own GEMM, not nn.Linear's.
        torch.testing.assert_close(out_layer(x), base(x), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ff_layer(x), base(x), atol=1e-6, rtol=1e-5)
        with torch.no_grad():
            out_layer.ia3_l.normal_()
            ff_layer.ia3_l.normal_()
        w = base.weight if base is linear else base.weight.t()
        torch.testing.assert_close(out_layer(x), (x @ w.t() + base.bias) * out_layer.ia3_l, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ff_layer(x), (x * ff_layer.ia3_l) @ w.t() + base.bias, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="IA3Linear: base must be an nn.Linear"):
        IA3Linear(torch.nn.Embedding(3, 4), feedforward=False)


@pytest.mark.parametrize("feedforward", [False, True])
def test_fp32_vector_on_a_bf16_layer(feedforward):
    """A bf16 layer with an fp32 vector (mixed-precision training) keeps bf16 outputs, close to
    PEFT's product in the vector's dtype, and the vector's gradient stays fp32."""
    torch.manual_seed(0)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    base = torch.nn.Linear(16, 8).to(torch.bfloat16)
    layer = IA3Linear(base, feedforward=feedforward)
    layer.ia3_l = torch.nn.Parameter(1.0 + 0.5 * torch.randn(layer.ia3_l.shape[0]))
    y = layer(x)
    l32 = layer.ia3_l.detach()
    expected = (base((x.float() * l32).to(torch.bfloat16)) if feedforward
                else (base(x).float() * l32).to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    # The vector is rounded to bf16 for the op (half an ulp of it), then the product once more:
    # within two bf16 epsilons of the output's largest magnitude (about 1.6 % of it).
    bf16_eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(y.float(), expected.float(), atol=2 * bf16_eps * expected.abs().max().item(), rtol=0)
    y.float().square().sum().backward()
    assert layer.ia3_l.grad.dtype == torch.float32 and layer.ia3_l.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_add_ia3_matches_peft(family):
    """PEFT's default targets for the model type: same layers, same feedforward layers, same
    logits and ia3_l gradients with the same random vectors."""
    theirs = peft_ia3(family)
    ours = ours_like(family, theirs)
    peft_map, our_map = peft_layers(theirs), ours_layers(ours)
    assert set(our_map) == set(peft_map) and our_map
    assert {n for n, m in our_map.items() if m.feedforward} == {n for n, m in peft_map.items() if m.is_feedforward}
    assert any(m.feedforward for m in our_map.values()) and not all(m.feedforward for m in our_map.values())
    y_theirs, y_ours = logits(theirs, family), logits(ours, family)
    torch.testing.assert_close(y_ours, y_theirs, **TOL)
    g = torch.randn_like(y_ours)
    (y_theirs * g).sum().backward()
    (y_ours * g).sum().backward()
    for name, layer in peft_map.items():
        expected = layer.ia3_l["default"].grad.flatten()
        assert_grad_close(our_map[name].ia3_l.grad, expected)
        assert expected.abs().max() > 0


def test_target_list_and_feedforward_regex_match_peft():
    """A target list and a regular expression for the feedforward layers select what PEFT selects."""
    targets, feedforward = ["q_proj", "up_proj", "down_proj"], r".*\.mlp\.(up|down)_proj"
    theirs = peft_ia3("llama", IA3Config(target_modules=targets, feedforward_modules=feedforward))
    ours = ours_like("llama", theirs, target_modules=targets, feedforward_modules=feedforward)
    our_map, peft_map = ours_layers(ours), peft_layers(theirs)
    assert set(our_map) == set(peft_map) and len(our_map) == 6
    assert {n for n, m in our_map.items() if m.feedforward} == {n for n, m in peft_map.items() if m.is_feedforward}
    assert sum(m.feedforward for m in our_map.values()) == 4
    torch.testing.assert_close(logits(ours, "llama"), logits(theirs, "llama"), **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoints_round_trip_with_peft(family, tmp_path):
    """PEFT save_pretrained -> deltakern.load reproduces PEFT's outputs; deltakern.save ->
    PeftModel.from_pretrained reproduces ours; our config has PEFT's fields (all but peft_version)
    with PEFT's values, and our tensors PEFT's keys, shapes and values."""
    theirs = peft_ia3(family)
    theirs.save_pretrained(tmp_path / "peft")
    expected = logits(theirs.eval(), family)
    loaded = deltakern.load(build(family), tmp_path / "peft")
    assert set(ours_layers(loaded)) == set(peft_layers(theirs))
    torch.testing.assert_close(logits(loaded, family), expected, **TOL)

    ours = ours_like(family, theirs)
    deltakern.save(ours, tmp_path / "ours")
    in_peft = PeftModel.from_pretrained(build(family), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(in_peft, family), logits(ours, family), **TOL)
    assert {n for n, m in peft_layers(in_peft).items() if m.is_feedforward} == {
        n for n, m in ours_layers(ours).items() if m.feedforward}

    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # PEFT wrapped the model without a task type (so it records auto_mapping); we write the task
    # type of the model class, as deltakern's LoRA checkpoints do.
    assert set(mine) - {"auto_mapping"} == set(peft_config) - {"peft_version", "auto_mapping"}
    for key, value in mine.items():
        # target_modules / feedforward_modules: ours are full names, PEFT's the suffixes it was given.
        if key not in ("target_modules", "feedforward_modules", "task_type", "auto_mapping"):
            assert value == peft_config[key], key
    assert_same_adapter_tensors(tmp_path / "ours", tmp_path / "peft")


def test_ia3_with_lora_is_not_saved_in_one_peft_checkpoint(tmp_path):
    model = deltakern.add_lora(deltakern.add_ia3(build("llama")), r=2, target_modules=["q_proj"])
    with pytest.raises(NotImplementedError, match=r"both LoRA and \(IA\)³; PEFT's format holds one method"):
        deltakern.save(model, tmp_path)


def test_only_ia3_vectors_train():
    model = deltakern.add_ia3(build("gpt2"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.{site}.ia3_l" for i in range(2) for site in ("attn.c_attn", "mlp.c_proj")}
    # c_attn: keys, values and queries in one Conv1D (out 3 * 32); mlp.c_proj: its input, 4 * 32.
    assert deltakern.trainable_parameters(model).trainable == 2 * (96 + 128)


def test_bad_input_raises():
    phi3 = transformers.AutoModelForCausalLM.from_config(transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, eos_token_id=2, bos_token_id=1))
    with pytest.raises(ValueError, match=r"add_ia3: no default target_modules for Phi3ForCausalLM \(model type 'phi3'"):
        deltakern.add_ia3(phi3)
    with pytest.raises(ValueError, match="add_ia3: no default feedforward_modules .*'phi3'"):
        deltakern.add_ia3(phi3, target_modules=["qkv_proj", "down_proj"])
    deltakern.add_ia3(phi3, target_modules=["qkv_proj", "down_proj"], feedforward_modules=["down_proj"])
    assert sorted((n, m.feedforward) for n, m in ours_layers(phi3).items()) == [
            ("model.layers.0.mlp.down_proj", True), ("model.layers.0.self_attn.qkv_proj", False)]
    with pytest.raises(ValueError, match=r"feedforward_modules \['wo'\] match none of the targeted layers"):
        deltakern.add_ia3(build("llama"), target_modules=["k_proj"], feedforward_modules=["wo"])
    with pytest.raises(ValueError, match=r"add_ia3: target_modules \['c_attn'\] match no nn.Linear"):
        deltakern.add_ia3(build("llama"), target_modules=["k_proj", "c_attn"])
