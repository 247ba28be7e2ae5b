"""LST, ladder side-tuning (deltakern.patch.ladder_side): the ladder mixing against a hand-written
computation, the gates, the pruning init, that the backbone keeps nothing for backward and gets
no gradient, padding, gradient checkpointing, generate(), our checkpoint format, training, and the
documented errors."""

import copy
import json

import pytest
import torch

import deltakern
from deltakern.nn import LadderSideNetwork
from deltakern.patch.ladder_side import add_ladder_side, ladder_side_checkpoint, load_ladder_side

from . import models

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def side_of(model) -> LadderSideNetwork:
    return model.deltakern_ladder_side


def draw_side(model, seed: int = 5) -> None:
    """Every side parameter away from its init (up-projection non-zero, gates off 0.5, norms off 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in side_of(model).named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") or "layernorm" in name else 0.2 * noise)


def lm_batch(family: str = "llama", pad: int = 0) -> dict:
    data = models.inputs(family, pad=pad)
    return {**data, "labels": data["input_ids"]}


def test_outputs_unchanged_at_init_and_only_the_side_trains():
    model = models.build("llama")
    data = models.inputs("llama")
    with torch.no_grad():
        expected = model(**data).logits
    add_ladder_side(model, reduction=4)
    side = side_of(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**data).logits, expected, atol=0, rtol=0)  # up starts at zero
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in side.parameters()}
    # Width 32 / 4 = 8, FFN 48 / 4 = 12, 4 query and 2 key/value heads of head_dim 8 / 4 = 2, 2 layers.
    layer = side.layers[0]
    assert type(layer) is type(model.model.layers[0])
    assert layer.self_attn.q_proj.weight.shape == (4 * 2, 8) and layer.self_attn.k_proj.weight.shape == (2 * 2, 8)
    assert layer.mlp.gate_proj.weight.shape == (12, 8) and len(side.layers) == 2
    assert [d.weight.shape for d in side.downsamples] == [(8, 32)] * 3 and side.upsample.weight.shape == (32, 8)
    assert side.gate_logits.shape == (2,) and not side.gate_logits.any()
    # The backbone's config is not changed (the side has a copy).
    assert model.config.hidden_size == 32 and layer.self_attn.config is not model.config


def test_gate_is_sigmoid_of_alpha_over_temperature():
    model = add_ladder_side(models.build("llama"), reduction=4, gate_temperature=0.5)
    side = side_of(model)
    torch.testing.assert_close(side.gates(), torch.full((2,), 0.5), atol=0, rtol=0)
    with torch.no_grad():
        side.gate_logits.copy_(torch.tensor([0.5, -1.0]))
    # sigmoid(1) and sigmoid(-2), by their values.
    torch.testing.assert_close(side.gates(), torch.tensor([0.7310586, 0.1192029]), atol=1e-6, rtol=0)
    assert side_of(add_ladder_side(models.build("llama"), reduction=4)).gate_temperature == 0.1


def test_forward_and_gradients_match_the_ladder_written_by_hand():
    """A 1-layer model: side_in_1 = down_0(h_0), side_in_2 = mu down_1(h_1) + (1 - mu) side_1(side_in_1),
    logits = lm_head(norm(h_1 + up(norm_s(side_in_2)))), mu = sigmoid(alpha / 0.1)."""
    model = add_ladder_side(models.build("llama", num_hidden_layers=1), reduction=4, init="random")
    draw_side(model)
    side = side_of(model)
    ids = models.inputs("llama", pad=0)["input_ids"]
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    ours = {name: p.grad.clone() for name, p in side.named_parameters()}
    side.zero_grad()

    decoder = model.model
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        h0 = decoder.embed_tokens(ids)
        h1 = decoder.layers[0](h0, position_ids=positions, position_embeddings=decoder.rotary_emb(h0, positions))
    s = side.downsamples[0](h0)
    s_out = side.layers[0](s, position_ids=positions, position_embeddings=side.rotary_emb(s, positions))
    mu = torch.sigmoid(side.gate_logits[0] / 0.1)
    s = mu * side.downsamples[1](h1) + (1 - mu) * s_out
    logits = model.lm_head(decoder.norm(h1 + side.upsample(side.norm(s))))
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, models.VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    torch.testing.assert_close(out.logits, logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.loss, loss, atol=1e-6, rtol=1e-6)
    for name, p in side.named_parameters():
        assert ours[name].abs().max() > 0, name
        models.assert_grad_close(ours[name], p.grad)


def test_pruned_init_keeps_the_largest_rows():
    model = models.build("llama")
    backbone = copy.deepcopy(model)
    add_ladder_side(model, reduction=2)
    side = side_of(model)
    layers = backbone.model.layers

    def largest(scores, k):  # by hand: rank all, keep the first k, in index order
        return sorted(sorted(range(len(scores)), key=lambda i: -float(scores[i]))[:k])

    def row_energy(w):
        return (w.detach() ** 2).sum(dim=1)

    # Residual dims: rows writing the residual stream (o_proj and down_proj of both layers).
    kept = largest(sum(row_energy(l.self_attn.o_proj.weight) + row_energy(l.mlp.down_proj.weight) for l in layers), 16)
    for layer, mine in zip(layers, side.layers):
        channels = largest(row_energy(layer.mlp.gate_proj.weight) + row_energy(layer.mlp.up_proj.weight), 24)
        assert torch.equal(mine.mlp.gate_proj.weight, layer.mlp.gate_proj.weight[channels][:, kept])
        assert torch.equal(mine.mlp.up_proj.weight, layer.mlp.up_proj.weight[channels][:, kept])
        assert torch.equal(mine.mlp.down_proj.weight, layer.mlp.down_proj.weight[kept][:, channels])
        # Query/key dims as rotary pairs (t, t + 4) of head_dim 8, summed over the 4 + 2 heads; 2 pairs kept.
        energy = (row_energy(layer.self_attn.q_proj.weight).view(4, 8).sum(0)
                  + row_energy(layer.self_attn.k_proj.weight).view(2, 8).sum(0))
        pairs = largest(energy[:4] + energy[4:], 2)
        dims = pairs + [t + 4 for t in pairs]
        q_rows = [h * 8 + t for h in range(4) for t in dims]
        k_rows = [h * 8 + t for h in range(2) for t in dims]
        assert torch.equal(mine.self_attn.q_proj.weight, layer.self_attn.q_proj.weight[q_rows][:, kept])
        assert torch.equal(mine.self_attn.k_proj.weight, layer.self_attn.k_proj.weight[k_rows][:, kept])
        values = largest(row_energy(layer.self_attn.v_proj.weight).view(2, 8).sum(0), 4)
        assert torch.equal(mine.self_attn.v_proj.weight,
                           layer.self_attn.v_proj.weight[[h * 8 + t for h in range(2) for t in values]][:, kept])
        assert torch.equal(mine.self_attn.o_proj.weight,
                           layer.self_attn.o_proj.weight[kept][:, [h * 8 + t for h in range(4) for t in values]])
        assert torch.equal(mine.input_layernorm.weight, layer.input_layernorm.weight[kept])
    assert torch.equal(side.norm.weight, backbone.model.norm.weight[kept])
    selection = torch.zeros(16, 32)
    selection[range(16), kept] = 1
    assert all(torch.equal(down.weight, selection) for down in side.downsamples)
    assert not side.upsample.weight.any()


def test_qwen2_biases_are_pruned_and_mistral_runs():
    model = models.build("qwen2")
    bias = model.model.layers[0].self_attn.q_proj.bias.detach().clone()
    add_ladder_side(model, reduction=2)
    side_bias = side_of(model).layers[0].self_attn.q_proj.bias
    assert side_bias.shape == (4 * 4,) and side_bias.requires_grad
    assert all(any(torch.equal(b, bias[h * 8 + t]) for t in range(8)) for h, b in
               zip(range(4), side_bias.view(4, 4)[:, 0]))
    for family in ("qwen2", "mistral"):
        model = models.build(family)
        data = lm_batch(family, pad=3)
        with torch.no_grad():
            expected = model(**data).logits
        add_ladder_side(model, reduction=4)
        draw_side(model)
        out = model(**data)
        out.loss.backward()
        assert not torch.allclose(out.logits, expected, atol=1e-3)
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in side_of(model).parameters())


def saved_during(forward, model) -> list[torch.Tensor]:
    """The tensors autograd saves during ``forward()``, the model's parameters left out."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in parameters:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return saved


def test_the_backbone_keeps_nothing_for_backward():
    # reduction 2: the side's widths (16, FFN 24, head_dim 4) differ from the backbone's (32, 48, 8).
    model = add_ladder_side(models.build("llama"), reduction=2)
    draw_side(model)
    states = []  # h_0 (the first layer's input) and each layer's output
    model.model.layers[0].register_forward_pre_hook(lambda m, args: states.append(args[0]))
    for layer in model.model.layers:
        layer.register_forward_hook(lambda m, args, out: states.append(out))
    ids = models.inputs("llama", pad=0)["input_ids"]  # [2, 9]
    saved = saved_during(lambda: model(input_ids=ids, labels=ids), model)
    ladder_inputs = {s.untyped_storage().data_ptr() for s in states}
    assert len(ladder_inputs) == 3
    backbone_wide = [t for t in saved if t.untyped_storage().data_ptr() not in ladder_inputs
                     and t.dim() >= 2 and t.shape[-1] in (32, 48, 8)]  # d, the FFN, head_dim
    # Width 32: only the head's: the final norm's input h_L + up(side) (the LM head is frozen, so
    # its input is not kept). Nothing of the backbone's FFN (48) or attention heads (head_dim 8).
    assert {(t.untyped_storage().data_ptr(), tuple(t.shape[-1:])) for t in backbone_wide} == {
        (backbone_wide[0].untyped_storage().data_ptr(), (32,))}
    # The ladder down-projections keep their inputs h_0..h_2 (their weight gradients need them).
    assert {t.untyped_storage().data_ptr() for t in saved} >= ladder_inputs
    assert any(t.shape[-1] == 24 for t in saved) and any(t.shape[-1] == 4 for t in saved)  # the side's FFN, heads
    # The same criterion catches a backbone that runs with autograd (its FFN activations, its heads).
    plain = models.build("llama")
    plain.model.embed_tokens.weight.requires_grad_(True)
    widths = {t.shape[-1] for t in saved_during(lambda: plain(input_ids=ids, labels=ids), plain) if t.dim() >= 2}
    assert {48, 8} <= widths


def test_gradients_reach_only_the_side_and_a_step_leaves_the_backbone():
    model = add_ladder_side(models.build("llama"), reduction=4)
    draw_side(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith("deltakern")}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(**lm_batch()).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith("deltakern_ladder_side."), name
    optimizer.step()
    for name, p in model.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]), name
    # Even with the backbone made trainable again, its layers run without autograd: only the head
    # (final norm, LM head), which reads the side's output, gets gradients.
    model.zero_grad(set_to_none=True)
    model.requires_grad_(True)
    model(**lm_batch()).loss.backward()
    with_grad = {name for name, p in model.named_parameters()
                 if p.grad is not None and not name.startswith("deltakern")}
    assert with_grad == {"model.norm.weight", "lm_head.weight"}


def test_padding_is_masked_in_the_side_network():
    model = add_ladder_side(models.build("llama"), reduction=4)
    draw_side(model)
    data = models.inputs("llama", pad=3)
    other = {**data, "input_ids": data["input_ids"].clone()}
    other["input_ids"][-1, :3] = 7  # different tokens under the padding
    with torch.no_grad():
        a, b = model(**data).logits, model(**other).logits
    torch.testing.assert_close(a[:, 3:], b[:, 3:], atol=1e-6, rtol=1e-5)
    # and the unmasked computation would differ
    with torch.no_grad():
        c = model(input_ids=other["input_ids"]).logits
    assert not torch.allclose(a[-1, 3:], c[-1, 3:], atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = add_ladder_side(models.build("llama"), reduction=4)
    draw_side(model)
    model.train()
    model(**lm_batch()).loss.backward()
    expected = [p.grad.clone() for p in side_of(model).parameters()]
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert side_of(model).layers[0].gradient_checkpointing
    model(**lm_batch()).loss.backward()
    for p, grad in zip(side_of(model).parameters(), expected):
        models.assert_grad_close(p.grad, grad)


def test_generate_without_a_cache_and_a_filled_cache_raises():
    model = add_ladder_side(models.build("llama"), reduction=4)
    draw_side(model)
    ids = models.inputs("llama", batch=1, pad=0)["input_ids"]
    generated = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, use_cache=False, pad_token_id=0)
    by_hand = ids
    with torch.no_grad():
        for _ in range(3):
            by_hand = torch.cat([by_hand, model(input_ids=by_hand).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, by_hand)
    with pytest.raises(NotImplementedError, match="keeps no KV cache.*use_cache=False"):
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=0)
    # The failed call left autograd on.
    assert torch.is_grad_enabled()


def test_a_deep_copy_runs_its_own_side_network():
    model = add_ladder_side(models.build("llama"), reduction=4)
    draw_side(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        side_of(twin).upsample.weight.mul_(2)
        data = models.inputs("llama")
        assert not torch.allclose(model(**data).logits, twin(**data).logits, atol=1e-4)


def test_save_load_round_trip(tmp_path):
    model = add_ladder_side(models.build("llama"), reduction=4, gate_temperature=0.2)
    draw_side(model)
    deltakern.save(model, tmp_path)
    assert json.loads((tmp_path / "deltakern_lst.json").read_text()) == {
        "format": "deltakern-lst", "format_version": 1, "reduction": 4, "gate_temperature": 0.2}
    loaded = deltakern.load(models.build("llama"), tmp_path)
    mine, theirs = dict(side_of(model).named_parameters()), dict(side_of(loaded).named_parameters())
    assert mine.keys() == theirs.keys() and "gate_logits" in mine and "downsamples.2.weight" in mine
    assert all(torch.equal(mine[name], theirs[name]) for name in mine)
    data = models.inputs("llama")
    with torch.no_grad():
        assert torch.equal(model(**data).logits, loaded(**data).logits)
    config, state = ladder_side_checkpoint(model)
    with pytest.raises(ValueError, match="lacks 1 tensor.*gate_logits"):
        load_ladder_side(models.build("llama"), config, {k: v for k, v in state.items() if k != "gate_logits"})
    with pytest.raises(ValueError, match="must be of format 'deltakern-lst'"):
        load_ladder_side(models.build("llama"), {**config, "format": "other"}, state)
    with pytest.raises(ValueError, match="has no ladder side network"):
        ladder_side_checkpoint(models.build("llama"))


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    model = add_ladder_side(models.build("llama"), reduction=4)
    model.train()
    batch = lm_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"LST tiny Llama, 20 AdamW steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0] - 0.4


def test_errors():
    with pytest.raises(ValueError, match=r"reduction=3 must divide the backbone's hidden_size \(32\)"):
        add_ladder_side(models.build("llama"), reduction=3)
    with pytest.raises(ValueError, match=r"reduction=16 must divide the backbone's head_dim \(8\)"):
        add_ladder_side(models.build("llama", hidden_size=64), reduction=16)
    with pytest.raises(ValueError, match=r"head_dim 8 / 8 = 1, which must be even"):
        add_ladder_side(models.build("llama"), reduction=8)
    with pytest.raises(ValueError, match=r"reduction=4 must divide the backbone's intermediate_size \(50\)"):
        add_ladder_side(models.build("llama", intermediate_size=50), reduction=4)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="reduction must be an int >= 1"):
            add_ladder_side(models.build("llama"), reduction=bad)
    with pytest.raises(ValueError, match="gate_temperature must be a number > 0, got 0"):
        add_ladder_side(models.build("llama"), reduction=4, gate_temperature=0)
    with pytest.raises(ValueError, match="init must be one of 'pruned', 'random', got 'fisher'"):
        add_ladder_side(models.build("llama"), reduction=4, init="fisher")
    for family in ("gpt2", "bert", "t5"):
        with pytest.raises(NotImplementedError, match=r"LST supports Llama-style models \(llama, qwen2, mistral\)"):
            add_ladder_side(models.build(family), reduction=4)
    model = add_ladder_side(models.build("llama"), reduction=4)
    with pytest.raises(ValueError, match="has a ladder side network already"):
        add_ladder_side(model, reduction=4)
    with pytest.raises(ValueError, match="carries other deltakern delta parameters"):
        add_ladder_side(deltakern.add_lora(models.build("llama")), reduction=4)


def test_side_mlp_product_keeps_gate_and_up_only_and_has_autograd_gradients():
    from deltakern.nn.ladder_side import SwiGLUSideMLP, _SiluMul

    gate = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SiluMul.apply, (gate, up))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _SiluMul.apply(gate, up)
    assert len(saved) == 2 and saved[0] is gate and saved[1] is up
    model = add_ladder_side(models.build("llama"), reduction=2)
    assert all(isinstance(layer.mlp, SwiGLUSideMLP) for layer in side_of(model).layers)
