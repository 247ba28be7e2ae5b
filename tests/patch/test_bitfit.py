"""BitFit: which parameters train, zero biases added where missing, LoRA beside it (the bias
gradient from lora_linear's own backward), our checkpoint format, and training."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltakern
from deltakern.nn import LoRALinear
from deltakern.patch.bitfit import bitfit_checkpoint, load_bitfit

from . import models
from .test_training import batch


def trainable_names(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def bias_names(model):
    return {name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"}


def randomise(parameters, seed, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_bert_trains_exactly_its_biases():
    model = deltakern.add_bitfit(models.build("bert"))
    names = bias_names(model)
    # 2 blocks x 8 biases (q, k, v, attention output dense and LayerNorm, intermediate dense, output dense
    # and LayerNorm), the embeddings' LayerNorm, the head's transform dense and LayerNorm, and the
    # output bias (tied to cls.predictions.decoder.bias: one parameter, listed once).
    assert len(names) == 2 * 8 + 1 + 3
    assert "cls.predictions.bias" in names
    assert trainable_names(model) == names
    expected = sum(p.numel() for name, p in model.named_parameters() if name in names)
    assert deltakern.trainable_parameters(model).trainable == expected


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_missing_biases_are_added_as_zeros_and_change_nothing(family):
    model = models.build(family)
    data = models.inputs(family)
    with torch.no_grad():
        expected = model(**data).logits
    linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with pytest.raises(ValueError, match="has no parameter named 'bias' to train; pass add_missing_biases=True"):
        deltakern.add_bitfit(model)
    deltakern.add_bitfit(model, add_missing_biases=True)
    assert trainable_names(model) == {f"{name}.bias" for name in linear}
    for name in linear:
        bias = model.get_submodule(name).bias
        assert bias.dtype == torch.float32 and not bias.any()
    with torch.no_grad():
        torch.testing.assert_close(model(**data).logits, expected, rtol=1e-6, atol=1e-6)


def test_lora_then_bitfit_trains_both():
    model = deltakern.add_bitfit(deltakern.add_lora(models.build("bert"), r=2))
    lora = {name for name in dict(model.named_parameters()) if "lora_" in name}
    assert lora and trainable_names(model) == lora | bias_names(model)
    assert "bert.encoder.layer.0.attention.self.query.base_layer.bias" in trainable_names(model)


def test_bitfit_then_lora_keeps_the_biases_trainable():
    # freeze_base (run by add_lora) must keep the biases BitFit marked trainable.
    model = deltakern.add_lora(deltakern.add_bitfit(models.build("bert")), r=2)
    lora = {name for name in dict(model.named_parameters()) if "lora_" in name}
    assert trainable_names(model) == lora | bias_names(model)


def test_adapter_biases_are_the_adapters_not_bitfits():
    model = deltakern.add_bitfit(deltakern.add_adapters(models.build("bert"), bottleneck=4))
    adapter = {name for name in dict(model.named_parameters()) if ".adapter." in name}
    base_biases = bias_names(model) - adapter
    assert adapter and trainable_names(model) == adapter | base_biases
    _, state = bitfit_checkpoint(model)
    # Plain names: ".base_layer" of the adapter wrappers left out, no adapter tensor.
    assert set(state) == {name.replace(".base_layer", "") for name in base_biases}
    assert "bert.encoder.layer.0.output.dense.bias" in state


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_lora_linear_computes_the_base_bias_gradient(backend):
    model = deltakern.add_bitfit(deltakern.add_lora(models.build("bert"), r=4, alpha=8))
    layer = model.bert.encoder.layer[0].intermediate.dense
    assert isinstance(layer, LoRALinear) and layer.base_layer.bias.requires_grad
    randomise([layer.lora_B, layer.base_layer.bias], seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 32, generator=g, requires_grad=True)
    grad_out = torch.randn(2, 5, 48, generator=g)
    with deltakern.use_backend(backend):
        (layer(x) * grad_out).sum().backward()
    # The plain formula y = x Wᵀ + b + s (x Aᵀ) Bᵀ on copies, differentiated by autograd.
    W, b, A, B = (t.detach().clone().requires_grad_(True)
                  for t in (layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B))
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref @ W.t() + b + layer.scaling * (x_ref @ A.t()) @ B.t()
    (y_ref * grad_out).sum().backward()
    assert layer.base_layer.weight.grad is None  # the frozen weight gets no gradient
    torch.testing.assert_close(layer.base_layer.bias.grad, b.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_bias_gradients_of_a_lora_bitfit_llama_match_plain_torch():
    # The fused CPU op against the reference backend (plain torch autograd) on a whole model.
    def grads(backend):
        model = models.build("llama", initializer_range=0.2)
        torch.manual_seed(5)
        deltakern.add_bitfit(deltakern.add_lora(model, r=2), add_missing_biases=True)
        randomise([p for p in model.parameters() if p.requires_grad], seed=6)
        with deltakern.use_backend(backend):
            model(**batch()).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    fused, plain = grads("cpu"), grads("reference")
    assert any(name.endswith("base_layer.bias") for name in fused)
    assert fused.keys() == plain.keys()
    for name in fused:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def bitfit_llama(with_lora):
    model = models.build("llama")
    torch.manual_seed(7)
    if with_lora:
        deltakern.add_lora(model, r=2)
    deltakern.add_bitfit(model, add_missing_biases=True)
    randomise([p for p in model.parameters() if p.requires_grad], seed=8)
    return model


def save_and_read(model, directory):
    """Write (config, state) as our files and read them back, as deltakern.save / load would."""
    config, state = bitfit_checkpoint(model)
    config_file, weights_file = directory / "deltakern_bitfit.json", directory / "deltakern_bitfit.safetensors"
    config_file.write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights_file))
    return json.loads(config_file.read_text()), load_file(str(weights_file))


@pytest.mark.parametrize("with_lora", [False, True], ids=["bitfit", "lora+bitfit"])
def test_checkpoint_round_trip(tmp_path, with_lora):
    model = bitfit_llama(with_lora)
    data = models.inputs("llama")
    with torch.no_grad():
        expected = model(**data).logits
    config, state = save_and_read(model, tmp_path)
    assert config["format"] == "deltakern-bitfit" and config["format_version"] == 1
    assert config["added_biases"] == sorted(name for name, m in models.build("llama").named_modules()
                                            if isinstance(m, torch.nn.Linear))
    assert set(state) == {f"{name}.bias" for name in config["added_biases"]}  # plain names, no ".base_layer"
    fresh = models.build("llama")
    if with_lora:  # LoRA present before the biases load: names still match
        deltakern.add_lora(fresh, r=2)
        fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    load_bitfit(fresh, config, state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**data).logits, expected, rtol=0, atol=0)
    assert trainable_names(fresh) == trainable_names(model)


def test_checkpoint_errors(tmp_path):
    config, state = save_and_read(bitfit_llama(False), tmp_path)
    key = "model.layers.0.self_attn.q_proj.bias"
    with pytest.raises(ValueError, match=f"the BitFit checkpoint lacks 1 tensor\\(s\\) the model needs: {key}"):
        load_bitfit(models.build("llama"), config, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="has 1 tensor\\(s\\) the model has no place for: model.extra.bias"):
        load_bitfit(models.build("llama"), config, {**state, "model.extra.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match=f"BitFit tensor '{key}' has shape \\(5,\\) in the checkpoint, the model expects \\(32,\\)"):
        load_bitfit(models.build("llama"), config, {**state, key: torch.zeros(5)})
    with pytest.raises(ValueError, match="the BitFit config must be of format 'deltakern-bitfit' version 1"):
        load_bitfit(models.build("llama"), {**config, "format": "other"}, state)
    with pytest.raises(ValueError, match="adds a bias to 'model.norm', which must be an nn.Linear without a bias"):
        load_bitfit(models.build("llama"), {**config, "added_biases": ["model.norm"]}, state)
    with pytest.raises(ValueError, match="has no BitFit biases"):
        bitfit_checkpoint(models.build("llama"))
