"""deltakern.save / deltakern.load across methods: what goes in which file, and the errors."""

import pytest
import torch

import deltakern

from . import models


def randomise_deltas(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("adapters_first", [True, False], ids=["adapters-then-lora", "lora-then-adapters"])
def test_lora_and_adapters_share_a_directory(tmp_path, adapters_first):
    model = models.build("llama")
    if adapters_first:  # LoRA then wraps each adapter's base layer (".base_layer")
        deltakern.add_lora(deltakern.add_adapters(model, bottleneck=4), r=2)
    else:  # the adapters wrap LoRA layers
        deltakern.add_adapters(deltakern.add_lora(model, r=2), bottleneck=4)
    randomise_deltas(model, seed=4)
    data = models.inputs("llama")
    expected = model(**data).logits
    deltakern.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "deltakern_adapters.json", "deltakern_adapters.safetensors"]
    loaded = deltakern.load(models.build("llama"), tmp_path)
    assert not loaded.training
    torch.testing.assert_close(loaded(**data).logits, expected, rtol=0, atol=0)
    counts = deltakern.trainable_parameters(loaded)
    assert counts.trainable == deltakern.trainable_parameters(model).trainable > 0


def test_lora_and_prefix_do_not_fit_one_peft_checkpoint(tmp_path):
    model = deltakern.add_prefix(deltakern.add_lora(models.build("llama"), r=2), 3)
    with pytest.raises(NotImplementedError, match="both LoRA and a prefix; PEFT's format holds one method"):
        deltakern.save(model, tmp_path)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_save_without_a_delta_and_load_without_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"no deltakern LoRA, prefix, prompt, \(IA\)³, adapters, BitFit biases or ladder side network to save"):
        deltakern.save(models.build("gpt2"), tmp_path / "out")
    with pytest.raises(ValueError, match="holds none of adapter_config.json, deltakern_adapters.json, deltakern_bitfit.json"):
        deltakern.load(models.build("gpt2"), tmp_path)


def test_bitfit_and_lora_share_a_directory(tmp_path):
    model = deltakern.add_lora(deltakern.add_bitfit(models.build("bert"), add_missing_biases=False), r=2)
    randomise_deltas(model, seed=5)
    data = models.inputs("bert")
    expected = model(**data).logits
    deltakern.save(model, tmp_path)
    assert {"adapter_config.json", "deltakern_bitfit.json"} <= {p.name for p in tmp_path.iterdir()}
    loaded = deltakern.load(models.build("bert"), tmp_path)
    torch.testing.assert_close(loaded(**data).logits, expected, rtol=0, atol=0)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith(".bias") for n in trainable) and any("lora_A" in n for n in trainable)
