"""deltakern.add_adapters on every family and placement against an eager reference, the near-identity
init, the save/load round trip and the errors."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

import deltakern
from deltakern.patch import adapters as adapters_method
from deltakern.patch.adapters import ParallelAdapter, PostNormParallelAdapter, SequentialAdapter
from deltakern.patch.families import blocks

from . import models

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
# Written out here rather than imported, so the reference does not share code with the op.
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
               "silu": F.silu, "tanh": torch.tanh}
WRAPPERS = (SequentialAdapter, ParallelAdapter, PostNormParallelAdapter)


def wrappers(model):
    return models.named_layers(model, WRAPPERS)


def expected_targets(model, placement):
    found = blocks(model, "test")
    if placement == "houlsby":
        return [n for b in found for n in (b.attention_output_name, b.ffn_output_name)]
    if placement == "pfeiffer":
        return [b.ffn_output_name for b in found]
    return [b.ffn_name for b in found]


def randomise(model, seed=0):
    """Non-trivial adapter weights, so the adapter path changes the output and its gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.endswith("weight") else 0.1))


def add_reference_hooks(model, dk_model):
    """Put the adapters of ``dk_model`` on the plain ``model`` as forward hooks written with torch ops,
    on the modules the placement names; returns the reference's adapter parameters by qualified name."""
    params = {}
    for name, wrapper in wrappers(dk_model).items():
        a = wrapper.adapter
        w = {k: p.detach().clone().requires_grad_(True) for k, p in a.named_parameters()}
        params.update({f"{name}.adapter.{k}": t for k, t in w.items()})

        def delta(z, w=w, act=ACTIVATIONS[a.activation], s=a.scaling):
            return s * F.linear(act(F.linear(z, w["down.weight"], w["down.bias"])), w["up.weight"], w["up.bias"])

        target = model.get_submodule(name)
        if isinstance(wrapper, SequentialAdapter):  # after the projection: y + s·A(y)
            target.register_forward_hook(lambda m, args, out, delta=delta: out + delta(out))
        elif isinstance(wrapper, ParallelAdapter):  # alongside the FFN: ffn(x) + s·A(x)
            target.register_forward_hook(lambda m, args, out, delta=delta: out + delta(args[0]))
        else:
            # BERT: the FFN is intermediate + output.dense, its input the attention output, which
            # BertOutput receives as its second argument; add s·A(x) to output.dense's result.
            stash = {}
            target.register_forward_pre_hook(lambda m, args, stash=stash: stash.update(x=args[1]))
            target.dense.register_forward_hook(lambda m, args, out, delta=delta, stash=stash: out + delta(stash["x"]))
    return params


def loss_of(logits):
    g = torch.Generator().manual_seed(7)
    return (logits * torch.randn(logits.shape, generator=g)).sum()


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("family", models.FAMILIES)
def test_logits_and_gradients_match_eager_hooks(family, placement):
    activation = list(ACTIVATIONS)[(models.FAMILIES.index(family) + PLACEMENTS.index(placement)) % len(ACTIVATIONS)]
    model = models.build(family)
    targets = expected_targets(model, placement)
    deltakern.add_adapters(model, bottleneck=8, placement=placement, activation=activation, scaling=0.7)
    randomise(model)
    found = wrappers(model)
    n_blocks = len(blocks(model, "test"))
    assert len(found) == (2 if placement == "houlsby" else 1) * n_blocks
    assert sorted(found) == sorted(targets)
    assert all(w.adapter.activation == activation and w.adapter.scaling == 0.7 for w in found.values())

    reference = models.build(family)
    ref_params = add_reference_hooks(reference, model)
    x = models.inputs(family)
    with torch.no_grad():
        base_logits = models.build(family)(**x).logits
    out = model(**x).logits
    ref = reference(**x).logits
    assert (ref - base_logits).abs().max() > 1e-2  # the adapters change the output
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)

    loss_of(out).backward()
    loss_of(ref).backward()
    dk_params = {n: p for n, p in model.named_parameters() if ".adapter." in n}
    assert dk_params.keys() == ref_params.keys()
    for name, p in dk_params.items():
        assert ref_params[name].grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=2e-5, rtol=1e-4, msg=name)
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapter." not in n)


@pytest.mark.parametrize("family", models.FAMILIES)
def test_houlsby_init_is_near_identity_and_only_adapters_train(family):
    base = models.build(family)
    model = models.build(family)
    deltakern.add_adapters(model)  # bottleneck 64, houlsby, relu
    x = models.inputs(family)
    with torch.no_grad():
        base_logits, logits = base(**x).logits, model(**x).logits
    # Weights of std 1e-2 perturb the residual stream by O(1e-4..1e-3) per sublayer.
    delta = (logits - base_logits).abs().max().item()
    assert 0 < delta < 1e-2 * base_logits.abs().max().item()

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter_names = {f"{w}.adapter.{k}" for w in wrappers(model) for k in
                     ("down.weight", "down.bias", "up.weight", "up.bias")}
    assert trainable == adapter_names
    n_adapters = 2 * len(blocks(model, "test"))
    assert deltakern.trainable_parameters(model).trainable == n_adapters * (2 * 64 * 32 + 64 + 32)
    # The base parameters keep their names under base_layer.
    base_names = {n for n, _ in base.named_parameters()}
    stripped = {n.replace(".base_layer", "") for n, _ in model.named_parameters() if n not in adapter_names}
    assert stripped == base_names


def test_adapters_take_the_dtype_of_the_base_and_keep_its_training_mode():
    model = models.build("gpt2").double().train()
    deltakern.add_adapters(model, bottleneck=4, placement="parallel")
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert all(w.training for w in wrappers(model).values())
    x = models.inputs("gpt2")
    assert model.eval()(**x).logits.dtype == torch.float64


@pytest.mark.parametrize("family,placement", [("llama", "houlsby"), ("gpt2", "parallel"), ("bert", "parallel"),
                                              ("t5", "pfeiffer")])
def test_save_load_round_trip_reproduces_outputs(family, placement, tmp_path):
    model = deltakern.add_adapters(models.build(family), bottleneck=6, placement=placement, activation="gelu",
                                   scaling=0.5)
    randomise(model, seed=3)
    deltakern.save(model, tmp_path)
    config = json.loads((tmp_path / "deltakern_adapters.json").read_text())
    assert config == {"format": "deltakern-adapters", "format_version": 1, "bottleneck": 6, "placement": placement,
                      "activation": "gelu", "scaling": 0.5}

    loaded = deltakern.load(models.build(family), tmp_path)
    assert sorted(wrappers(loaded)) == sorted(wrappers(model))
    x = models.inputs(family)
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, model(**x).logits)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
           {n for n, p in model.named_parameters() if p.requires_grad}


def _saved(tmp_path):
    model = deltakern.add_adapters(models.build("llama"), bottleneck=4)
    deltakern.save(model, tmp_path)
    weights = tmp_path / "deltakern_adapters.safetensors"
    return load_file(weights), lambda state: save_file(state, weights)


def test_checkpoint_missing_key_is_named(tmp_path):
    state, write = _saved(tmp_path)
    key = "model.layers.1.mlp.down_proj.adapter.up.bias"
    del state[key]
    write(state)
    plain = models.build("llama")
    with pytest.raises(ValueError, match=r"deltakern.load: the adapter checkpoint lacks 1 tensor\(s\) .*: " + key):
        deltakern.load(plain, tmp_path)
    # Checked before any adapter goes in: the model is left as it was.
    assert not adapters_method.has_adapters(plain)
    assert all(p.requires_grad for p in plain.parameters())


def test_checkpoint_unexpected_key_and_wrong_shape_are_named(tmp_path):
    state, write = _saved(tmp_path)
    write({**state, "model.layers.9.mlp.down_proj.adapter.up.bias": torch.zeros(32)})
    with pytest.raises(ValueError, match=r"has 1 tensor\(s\) the model has no place for: model\.layers\.9\.mlp"):
        deltakern.load(models.build("llama"), tmp_path)
    key = "model.layers.0.self_attn.o_proj.adapter.down.weight"
    write({**state, key: torch.zeros(5, 32)})
    with pytest.raises(ValueError, match=rf"adapter tensor '{key}' has shape \(5, 32\) in the checkpoint, "
                                         r"the model expects \(4, 32\)"):
        deltakern.load(models.build("llama"), tmp_path)


def test_checkpoint_of_another_format_version(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "deltakern_adapters.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 2}))
    with pytest.raises(ValueError, match=r"the adapter config must be of format 'deltakern-adapters' version 1, "
                                         r"got format 'deltakern-adapters' version 2"):
        deltakern.load(models.build("llama"), tmp_path)


@pytest.mark.parametrize("kwargs,message", [
    (dict(placement="houlsbey"), r"unknown placement 'houlsbey'; expected one of houlsby, pfeiffer, parallel"),
    (dict(activation="swish"), r"unknown activation 'swish'; expected one of relu, gelu, gelu_tanh, silu, tanh"),
    (dict(bottleneck=0), r"bottleneck must be an int >= 1, got 0"),
    (dict(scaling=float("nan")), r"scaling must be a finite number, got nan"),
])
def test_bad_arguments(kwargs, message):
    model = models.build("qwen2")
    with pytest.raises(ValueError, match=r"deltakern.add_adapters: " + message):
        deltakern.add_adapters(model, **kwargs)
    assert not adapters_method.has_adapters(model)


def test_adding_adapters_twice_is_refused():
    model = deltakern.add_adapters(models.build("bert"), bottleneck=4)
    with pytest.raises(ValueError, match=r"deltakern.add_adapters: the model already has deltakern adapters"):
        deltakern.add_adapters(model, bottleneck=4)


def test_model_outside_the_families():
    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                 num_attention_heads=2, word_embed_proj_dim=16)
    with pytest.raises(ValueError, match=r"deltakern.add_adapters: OPTForCausalLM \(model_type='opt'\) is not a "
                                         r"supported family; looked for llama .*gpt2 .*bert .*t5 "):
        deltakern.add_adapters(transformers.OPTForCausalLM(cfg), bottleneck=4)
