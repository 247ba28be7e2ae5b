"""Named LoRA adapters on deltakern's own models (add_lora(..., adapter_name=...), set_adapter,
adapter_names mixed batches in forward, training and generate, per-adapter save/load) against
PEFT's multi-adapter LoRA with the same weights, in fp64 on tiny random models."""

import copy
import os

import peft
import pytest
import torch

import deltakern
from deltakern.nn import LoRALinear, MultiLoRALinear

from . import models

# Per family: adapter -> (r, alpha, targets); ranks 1, 8, 16 mixed, targets overlapping in part.
ADAPTERS = {
    "llama": {"a": (1, 4, ["q_proj", "v_proj"]), "b": (8, 16, "all-linear"), "c": (16, 8, ["o_proj", "down_proj"])},
    "gpt2": {"a": (1, 4, ["c_attn"]), "b": (8, 16, "all-linear"), "c": (16, 8, ["c_proj"])},
    "t5": {"a": (1, 4, ["q", "v"]), "b": (8, 16, "all-linear"), "c": (16, 8, ["o", "wo"])},
}
MIXED = ["a", "b", "__base__", "c"]
ATOL, RTOL = 1e-10, 1e-9  # fp64: the same sums in another order


def build_pair(family="llama", adapters=None, std=0.1):
    """(PEFT model, deltakern model) on the same fp64 base with the same adapters and weights."""
    adapters = adapters or ADAPTERS[family]
    base = models.build(family).double()
    ours = copy.deepcopy(base)
    theirs = None
    for name, (r, alpha, targets) in adapters.items():
        config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
        if theirs is None:
            theirs = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            theirs.add_adapter(name, config)
        deltakern.add_lora(ours, r=r, alpha=alpha, target_modules=targets, adapter_name=name)
    torch.manual_seed(5)
    models.draw_normal(theirs, "lora_", 0.0, std)
    copy_factors(theirs, ours)
    return theirs.eval(), ours.eval()


def copy_factors(theirs, ours):
    with torch.no_grad():
        for name, layer in models.named_layers(ours, MultiLoRALinear).items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            assert set(layer.adapter_names) == set(peft_layer.lora_A.keys()), name
            for adapter in layer.adapter_names:
                layer.lora_A[adapter].copy_(peft_layer.lora_A[adapter].weight)
                layer.lora_B[adapter].copy_(peft_layer.lora_B[adapter].weight)


def batch(family, size=4):
    return models.inputs(family, batch=size, length=7, pad=2)


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_mixed_batch_equals_peft(family):
    theirs, ours = build_pair(family)
    inputs = batch(family)
    expected = theirs(**inputs, adapter_names=MIXED).logits
    got = ours(**inputs, adapter_names=MIXED).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    # each adapter matters in its row, and the active adapter ("a") is not used by the others
    plain = ours(**inputs).logits
    with theirs.disable_adapter():
        base = theirs(**inputs).logits
    torch.testing.assert_close(got[2], base[2], atol=ATOL, rtol=RTOL)
    for row in (1, 3):
        assert not torch.allclose(got[row], plain[row]) and not torch.allclose(got[row], base[row])


def test_active_set_equals_peft_and_routing_ends_after_each_call():
    theirs, ours = build_pair()
    inputs = batch("llama")
    for active in (["b"], ["a", "b", "c"]):
        theirs.base_model.set_adapter(active)
        deltakern.set_adapter(ours, active if len(active) > 1 else active[0])
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="batch dimension of 4"):
        ours(**inputs, adapter_names=["a", "b"])
    # the failed call left no routing behind: the next call runs the active set
    torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, atol=ATOL, rtol=RTOL)


def test_segments_are_built_once_per_forward(monkeypatch):
    _, ours = build_pair()
    from deltakern.nn import multi_lora

    calls = []
    original = multi_lora.lora_segments
    monkeypatch.setattr(multi_lora, "lora_segments", lambda *a: calls.append(a) or original(*a))
    ours(**batch("llama"), adapter_names=MIXED)
    # one input shape: one host-synced segmentation, although the layers hold three adapter sets
    # ({a, b}: q, v; {b, c}: o, down; {b}: the rest)
    assert len(calls) == 1


def test_generate_mixed_adapters_equals_each_sequence_alone_and_peft():
    theirs, ours = build_pair()
    ids = batch("llama")["input_ids"].clone()
    ids[-1, :2] = 5  # no padding: each sequence generates alone with the same positions
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    mixed = ours.generate(ids, adapter_names=MIXED, **options)
    for row, name in enumerate(MIXED):
        alone = ours.generate(ids[row:row + 1], adapter_names=[name], **options)
        assert torch.equal(mixed[row], alone[0]), name
    assert torch.equal(mixed, theirs.generate(input_ids=ids, adapter_names=MIXED, **options))
    assert not torch.equal(mixed, ours.generate(ids, adapter_names=["__base__"] * 4, **options))
    # beams repeat each sequence along the batch; its adapter goes with it
    beams = {**options, "num_beams": 2}
    assert torch.equal(ours.generate(ids, adapter_names=MIXED, **beams),
                       theirs.generate(input_ids=ids, adapter_names=MIXED, **beams))
    assert ours.__dict__["_deltakern_routing"].batch is None
    # num_return_sequences repeats each sequence too (PEFT expands only for beams): top-1 sampling is greedy
    repeated = ours.generate(ids, adapter_names=MIXED, do_sample=True, top_k=1, num_return_sequences=2,
                             **{k: v for k, v in options.items() if k != "do_sample"})
    assert torch.equal(repeated, mixed.repeat_interleave(2, dim=0))
    # a deep copy routes through its own layers (hooks and generate are the copy's)
    twin = copy.deepcopy(ours)
    assert twin.generate.args == (twin,)
    assert all(m.routing is twin.__dict__["_deltakern_routing"] for m in models.named_layers(twin, MultiLoRALinear).values())
    assert torch.equal(twin.generate(ids, adapter_names=MIXED, **options), mixed)


def test_generate_encoder_decoder_equals_peft():
    theirs, ours = build_pair("t5", std=1.0)
    ids = batch("t5")["input_ids"]
    options = {"max_new_tokens": 4, "do_sample": False, "num_beams": 2}
    mixed = ours.generate(ids, adapter_names=MIXED, **options)
    assert torch.equal(mixed, theirs.generate(input_ids=ids, adapter_names=MIXED, **options))
    assert not torch.equal(mixed, ours.generate(ids, adapter_names=["__base__"] * 4, **options))


def test_training_gradients_of_each_adapter_come_from_its_rows():
    _, ours = build_pair()
    ours.train()  # dropout 0: the forward is deterministic
    inputs = batch("llama", size=5)
    names = ["b", "a", "b", "__base__", "a"]  # "c" has no rows
    weights = torch.randn(5, 7, models.VOCAB, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (ours(**inputs, adapter_names=names).logits * weights).sum().backward()
    mixed = {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}
    for adapter in ("a", "b"):
        single = copy.deepcopy(ours)
        single.zero_grad(set_to_none=True)
        deltakern.set_adapter(single, adapter)
        rows = [i for i, n in enumerate(names) if n == adapter]
        sub = {k: v[rows] for k, v in inputs.items()}
        (single(**sub).logits * weights[rows]).sum().backward()
        for name, parameter in single.named_parameters():
            if f".lora_A.{adapter}" in name or f".lora_B.{adapter}" in name:
                models.assert_grad_close(mixed[name], parameter.grad)
    no_rows = [g for n, g in mixed.items() if ".c" == n[-2:]]
    assert no_rows and all(torch.count_nonzero(g) == 0 for g in no_rows)  # zeros, not NaN or None


def test_unknown_adapter_names_list_the_known_ones():
    _, ours = build_pair()
    inputs = batch("llama")
    message = r"unknown adapter name\(s\) 'd'; the model's adapters are 'a', 'b', 'c'"
    with pytest.raises(ValueError, match=message):
        ours(**inputs, adapter_names=["a", "b", "d", "__base__"])
    with pytest.raises(ValueError, match=message):
        ours.generate(inputs["input_ids"], adapter_names=["a", "b", "d", "c"], max_new_tokens=2)
    with pytest.raises(ValueError, match=message):
        deltakern.set_adapter(ours, "d")
    with pytest.raises(ValueError, match=r"unknown adapter 'd'; the model's adapters are \['a', 'b', 'c'\]"):
        deltakern.trainable_parameters(ours, "d")


def test_unnamed_lora_becomes_default():
    base = models.build("llama").double()
    ours = deltakern.add_lora(copy.deepcopy(base), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    models.draw_normal(ours, "lora_B")
    old = dict(models.named_layers(ours, LoRALinear))
    deltakern.add_lora(ours, r=2, alpha=2, target_modules=["k_proj"], adapter_name="x")
    assert not models.named_layers(ours, LoRALinear)
    for name, layer in old.items():  # the same parameter objects, now named "default"
        assert ours.get_submodule(name).lora_A["default"] is layer.lora_A
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8,
                                                                        target_modules=["q_proj", "v_proj"]))
    theirs.add_adapter("x", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj"]))
    models.draw_normal(theirs, "lora_", 0.0, 0.1)
    copy_factors(theirs, ours)
    inputs = batch("llama")
    names = ["x", "default", "__base__", "x"]
    torch.testing.assert_close(ours(**inputs, adapter_names=names).logits,
                               theirs.eval()(**inputs, adapter_names=names).logits, atol=ATOL, rtol=RTOL)
    assert ours.__dict__["_deltakern_routing"].active == ("default",)


def test_refusals():
    model = models.build("llama")
    with pytest.raises(NotImplementedError, match="use_dora=True"):
        deltakern.add_lora(model, adapter_name="a", use_dora=True)
    with pytest.raises(NotImplementedError, match="quantize_base='nf4'"):
        deltakern.add_lora(model, adapter_name="a", quantize_base="nf4")
    dora = deltakern.add_lora(models.build("llama"), use_dora=True, target_modules=["q_proj"])
    with pytest.raises(NotImplementedError, match="DoRA"):
        deltakern.add_lora(dora, adapter_name="a")
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] match no"):
        deltakern.add_lora(model, adapter_name="a", target_modules=["nope"])
    assert not models.named_layers(model, MultiLoRALinear)  # a refused call changes nothing
    deltakern.add_lora(model, adapter_name="a", target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already has an adapter 'a'"):
        deltakern.add_lora(model, adapter_name="a")
    with pytest.raises(ValueError, match="give the new one an adapter_name"):
        deltakern.add_lora(model)
    with pytest.raises(NotImplementedError, match="merging named adapters"):
        deltakern.merge_lora(model)
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        model(**batch("llama", size=1), adapter_names=["a"])


def test_trainable_parameters_per_adapter():
    _, ours = build_pair()
    counts = {name: deltakern.trainable_parameters(ours, name).trainable for name in ("a", "b", "c")}
    # a: q_proj, v_proj (32 -> 32, 32 -> 16) at r = 1 in 2 layers; c: o_proj (32 -> 32) and down_proj (48 -> 32)
    assert counts["a"] == 2 * 1 * ((32 + 32) + (32 + 16))
    assert counts["c"] == 2 * 16 * ((32 + 32) + (48 + 32))
    assert sum(counts.values()) == deltakern.trainable_parameters(ours).trainable
    groups = [{"params": deltakern.adapter_parameters(ours, n), "lr": lr} for n, lr in (("a", 1e-3), ("b", 1e-4))]
    assert sum(p.numel() for p in groups[0]["params"]) == counts["a"]


def test_save_per_adapter_loads_in_peft_and_back(tmp_path):
    adapters = dict(ADAPTERS["llama"])
    adapters["default"] = (4, 8, ["k_proj", "up_proj"])
    theirs, ours = build_pair(adapters=adapters)
    names = ["a", "default", "__base__", "c"]
    inputs = batch("llama")
    expected = theirs(**inputs, adapter_names=names).logits

    deltakern.save(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    # PEFT's layout: "default" at the root, the others in subfolders, the same tensors bit for bit
    def adapter_files(root):
        return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
                      if f.startswith("adapter_"))

    assert adapter_files(tmp_path / "ours") == adapter_files(tmp_path / "peft")
    assert len(adapter_files(tmp_path / "ours")) == 8
    for sub in ("", "a", "b", "c"):
        models.assert_same_adapter_tensors(tmp_path / "ours" / sub, tmp_path / "peft" / sub)

    # deltakern's checkpoint in PEFT
    base = models.build("llama").double()
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    for name in ("a", "b", "c"):
        loaded.load_adapter(tmp_path / "ours" / name, adapter_name=name)
    torch.testing.assert_close(loaded(**inputs, adapter_names=names).logits, expected, atol=ATOL, rtol=RTOL)

    # PEFT's checkpoint in deltakern
    mine = deltakern.load(copy.deepcopy(base), tmp_path / "peft", adapter_name="default")
    for name in ("a", "b", "c"):
        deltakern.load(mine, tmp_path / "peft" / name, adapter_name=name)
    torch.testing.assert_close(mine(**inputs, adapter_names=names).logits, expected, atol=ATOL, rtol=RTOL)
    assert deltakern.trainable_parameters(mine, "c").trainable == deltakern.trainable_parameters(ours, "c").trainable

    deltakern.save(ours, tmp_path / "some", selected_adapters=["b"])
    assert os.listdir(tmp_path / "some") == ["b"]
    with pytest.raises(ValueError, match="selected_adapters must be"):
        deltakern.save(ours, tmp_path / "bad", selected_adapters=["zz"])
    with pytest.raises(ValueError, match="already has an adapter 'b'"):
        deltakern.load(mine, tmp_path / "peft" / "b", adapter_name="b")
