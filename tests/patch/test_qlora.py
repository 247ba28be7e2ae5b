"""QLoRA model surgery: add_lora(quantize_base="nf4") and deltakern.quantize against PEFT over
bitsandbytes' Linear4bit on a tiny Llama, patch() of a PEFT QLoRA model, save/load in PEFT's
format, merge_lora on an NF4 base, and NF4Linear's module behaviour."""

from __future__ import annotations

import pytest
import torch

import deltakern
from deltakern.nn import LoRALinear, NF4Linear
from tests.patch.models import assert_grad_close, build, draw_normal, inputs, loss_of, named_layers, quantize_with_bitsandbytes

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bnb_llama(seed=0):
    """The tiny Llama with every targeted linear layer in bitsandbytes NF4 (fp32 absmax, as
    deltakern.quantize writes it), marked loaded in 4 bits as transformers marks it."""
    return quantize_with_bitsandbytes(build("llama", seed), TARGETS)


def peft_qlora(seed=0):
    torch.manual_seed(seed + 1)
    model = peft.get_peft_model(bnb_llama(seed), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    draw_normal(model, "lora_B", 0.0, 0.5)
    return model


def ours_from(peft_model, seed=0):
    """deltakern's QLoRA of the same Llama, holding the PEFT model's LoRA weights."""
    model = deltakern.add_lora(build("llama", seed), r=4, alpha=8, target_modules=TARGETS, quantize_base="nf4")
    lora = named_layers(peft_model.get_base_model(), peft.tuners.lora.LoraLayer)
    with torch.no_grad():
        for name, layer in named_layers(model, LoRALinear).items():
            layer.lora_A.copy_(lora[name].lora_A["default"].weight)
            layer.lora_B.copy_(lora[name].lora_B["default"].weight)
    return model.eval()


def forward_backward(model):
    model.zero_grad()
    out = model(**inputs("llama")).logits
    loss_of(out).backward()
    grads = {n.replace("base_model.model.", "").replace(".default", "").replace(".weight", ""): p.grad
             for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def test_add_lora_nf4_matches_peft_over_bitsandbytes():
    theirs_model = peft_qlora().eval()
    ours_model = ours_from(theirs_model)
    assert len(named_layers(ours_model, NF4Linear)) == 14
    for name, layer in named_layers(ours_model, NF4Linear).items():  # the same bytes as bitsandbytes'
        their = theirs_model.get_base_model().get_submodule(name).weight  # both named ...q_proj.base_layer
        assert torch.equal(layer.weight, their.reshape(-1)) and torch.equal(layer.weight_absmax, their.quant_state.absmax)
    theirs, their_grads = forward_backward(theirs_model)
    ours, our_grads = forward_backward(ours_model)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert our_grads.keys() == their_grads.keys() and len(our_grads) == 28
    for name in our_grads:
        assert_grad_close(our_grads[name], their_grads[name])


def test_patch_routes_peft_qlora_layers_and_keeps_their_checkpoint(tmp_path):
    model = peft_qlora().eval()
    reference, reference_grads = forward_backward(model)
    model.save_pretrained(tmp_path / "before")
    report = deltakern.patch(model)
    assert len(report.patched) == 14 and report.skipped == []
    out, grads = forward_backward(model)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    for name in grads:
        assert_grad_close(grads[name], reference_grads[name])
    model.save_pretrained(tmp_path / "after")
    from tests.patch.models import assert_same_adapter_tensors

    assert_same_adapter_tensors(tmp_path / "after", tmp_path / "before")


def test_save_and_load_keep_peft_format(tmp_path):
    """deltakern.save writes PEFT's adapter; PEFT loads it over bitsandbytes' base, and
    deltakern.load over a deltakern-quantised base: both give the model's outputs."""
    theirs_model = peft_qlora().eval()
    ours_model = ours_from(theirs_model)
    expected = ours_model(**inputs("llama")).logits
    deltakern.save(ours_model, tmp_path)
    loaded = deltakern.load(deltakern.quantize(build("llama"), TARGETS), tmp_path)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj.base_layer, NF4Linear)
    torch.testing.assert_close(loaded(**inputs("llama")).logits, expected, atol=1e-5, rtol=1e-5)
    peft_loaded = peft.PeftModel.from_pretrained(bnb_llama(), tmp_path).eval()
    torch.testing.assert_close(peft_loaded(**inputs("llama")).logits, expected, atol=1e-5, rtol=1e-5)


def test_merge_lora_requantises_and_says_so():
    """Each merged layer is NF4 again: the NF4 rounding of dequant(W) + s·B A, within half an NF4
    step of its block's scale of that sum."""
    from deltakern.nf4 import NF4_CODE

    model = ours_from(peft_qlora().eval())
    expected = {name: (layer.base_layer.dequantized(torch.float32) + layer.scaling * layer.lora_B @ layer.lora_A).detach()
                for name, layer in named_layers(model, LoRALinear).items()}
    deltakern.merge_lora(model)
    assert not named_layers(model, LoRALinear) and len(named_layers(model, NF4Linear)) == 14
    half_step = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2
    for name, dense in expected.items():
        merged = model.get_submodule(name)
        assert isinstance(merged, NF4Linear)
        error = (merged.dequantized(torch.float32) - dense).abs().reshape(-1)
        scale = merged.weight_absmax.repeat_interleave(merged.blocksize)[: error.numel()]
        assert (error <= half_step * scale + 1e-7).all(), name


def test_nf4_linear_moves_devices_and_changes_compute_dtype_without_touching_its_bytes():
    layer = NF4Linear.from_linear(torch.nn.Linear(100, 7), blocksize=32, nested=True)
    packed, absmax, scales = layer.weight.clone(), layer.weight_absmax.clone(), layer.weight_nested_absmax.clone()
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.weight, packed) and torch.equal(layer.weight_absmax, absmax)
    assert layer.weight_nested_absmax.dtype == torch.float32 and torch.equal(layer.weight_nested_absmax, scales)
    state = layer.state_dict()
    assert set(state) == {"weight", "weight_absmax", "weight_offset", "weight_nested_absmax", "weight_nested_code", "bias"}
    x = torch.randn(3, 100, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.dequantized(), layer.bias))


def test_add_lora_rejects_an_unknown_quantisation():
    with pytest.raises(ValueError, match="quantize_base must be None or 'nf4', got 'int8'"):
        deltakern.add_lora(build("llama"), quantize_base="int8")


def test_lora_trains_on_an_nf4_base_in_bf16():
    """A bf16 QLoRA model trains: the loss drops over a few AdamW steps on one batch."""
    model = deltakern.add_lora(build("llama").to(torch.bfloat16), r=4, quantize_base="nf4").train()
    draw_normal(model, "lora_B", 0.0, 0.1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = inputs("llama", pad=0)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_qlora_module_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    deltakern.add_lora(model, r=4, quantize_base="nf4")
    draw_normal(model, "lora_B")
    x = torch.randn(5, 64, requires_grad=True)
    eager = model(x)
    eager.sum().backward()
    eager_grad, x.grad = x.grad, None
    compiled = torch.compile(model, fullgraph=True)(x)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad, eager_grad, atol=1e-6, rtol=1e-6)


def test_quantize_keeps_the_modules_transformers_keeps_in_fp32_dense():
    """T5 declares ``_keep_in_fp32_modules = ["wo"]`` (its FFN casts its input to ``wo.weight.dtype``,
    which a uint8 NF4 weight would turn into bytes): ``quantize`` leaves ``wo`` dense as transformers
    does when loading in 4 bits, quantises every other target, and the QLoRA model still runs."""
    model = deltakern.add_lora(build("t5"), r=2, alpha=4, target_modules="all-linear", quantize_base="nf4")
    lora = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    dense = sorted(name for name, m in lora.items() if not isinstance(m.base_layer, NF4Linear))
    assert dense and all(name.endswith(".wo") for name in dense), dense
    assert len(lora) - len(dense) > len(dense)
    with torch.no_grad():
        assert model(**inputs("t5")).logits.isfinite().all()
