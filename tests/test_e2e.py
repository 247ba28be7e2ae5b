"""The end-to-end fine-tuning benchmark (deltakern.benchmark.e2e) on tiny Llama models: deltakern's step matches
PEFT's (or the eager adapters' or BitFit's) in loss and delta gradients for each method, the
providers, the loss over virtual tokens, the training step, the bytes saved for backward, and bad
input."""

import math

import pytest
import torch

import torch.nn.functional as F

from deltakern.benchmark import e2e, harness
from deltakern.patch import lora as lora_method
from deltakern.patch import prefix as prefix_method
from deltakern.patch import prompt as prompt_method
from deltakern.registry import methods
from deltakern.nn import LoRALinear
from deltakern.patch.bitfit import bitfit_biases

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")

SHAPES = {shape.method: shape for shape in e2e.E2E_QUICK_SHAPES}


@pytest.fixture(scope="module")
def cases():
    return {method: e2e.E2ECase(shape, torch.float32, "cpu") for method, shape in SHAPES.items()}


def test_shapes():
    assert [s.method for s in e2e.E2E_QUICK_SHAPES] == list(methods())
    for device in ("cpu", "cuda"):
        assert [s.method for s in e2e.E2E_DEFAULT_SHAPES[device]] == list(methods())
    cpu = e2e.E2E_DEFAULT_SHAPES["cpu"][0]
    assert (cpu.hidden, cpu.layers, cpu.seq, cpu.batch) == (512, 4, 256, 4)
    assert str(cpu) == "lora,h=512,L=4,seq=256,b=4"
    large = e2e.E2E_LARGE_SHAPES
    assert [s.method for s in large] == list(methods())
    assert (large[0].hidden, large[0].layers, large[0].seq, large[0].batch) == (1024, 8, 512, 4)
    assert e2e.E2ECase(SHAPES["lora"], torch.float32, "cpu").tokens == SHAPES["lora"].batch * SHAPES["lora"].seq


@pytest.mark.parametrize("method", list(methods()))
def test_deltakern_step_matches_the_reference(cases, method):
    case = cases[method]
    providers = case.providers(["cpu", "reference"], with_compile=True)
    # torch.compile of the reference is left out on CPU (compile time, see deltakern.benchmark.e2e).
    assert list(providers) == ["floor", "reference", "deltakern-cpu", "deltakern-reference"]
    assert providers["reference"].model is case.reference and providers["deltakern-cpu"].model is case.model
    assert providers["floor"].model is case.floor
    for name, fn in providers.items():
        ok, worst = case.check(name, fn)
        assert ok and worst < 0.1, (name, worst)
    assert case.check("reference", providers["reference"]) == (True, 0.0)
    # The check ran in eval mode; the models are back in train mode, where LoRA dropout is on.
    assert case.reference.training and case.model.training


def test_the_floor_is_the_frozen_base_with_a_gradient_to_its_embeddings(cases):
    case = cases["lora"]
    floor = case.providers([])["floor"]
    assert not any(p.requires_grad for p in case.floor.parameters())
    assert case.check("floor", floor) == (True, 0.0)
    base = e2e.llama_base(case.shape, torch.float32, "cpu", case.floor.config.max_position_embeddings)
    with torch.no_grad():
        expected = base(**case.inputs).loss
    assert floor().item() == expected.item()  # the untouched base model's loss, from its embeddings
    step, _ = case.run_mode("floor", floor, "full")
    step()
    embeddings = case.floor_inputs["inputs_embeds"]
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    case.run_mode("floor", floor, "full")[0]()  # zero_grad clears it: one step's gradient, not two
    first = embeddings.grad.clone()
    step()
    torch.testing.assert_close(embeddings.grad, first)
    # Saves the activations of every layer (the base's backward to the input), and no weight gradient.
    assert case.saved_bytes(floor) > 0 and all(p.grad is None for p in case.floor.parameters())


def test_summary_ratio_to_floor():
    rows = [harness.Result(harness.Row("e2e", provider, "full", "s", "float32", "cpu", "ms", ms, ms, ms))
            for provider, ms in (("floor", 100.0), ("reference", 150.0), ("deltakern-cpu", 110.0))]
    entries = {e["provider"]: e for e in harness.summarize(rows)}
    assert entries["deltakern-cpu"]["ratio_to_floor"] == pytest.approx(1.10)
    assert entries["deltakern-cpu"]["ratio_to_reference"] == pytest.approx(110 / 150)
    assert entries["floor"]["ratio_to_floor"] == 1.0


def _floor_run_rows():
    return [harness.Result(harness.Row("e2e", provider, "full", "s", "float32", "cpu", "ms", ms - 5, ms, ms + 5))
            for provider, ms in (("floor", 100.0), ("reference", 150.0), ("deltakern-cpu", 110.0))]


def test_the_csv_has_the_full_steps_ratios_and_the_chart_labels_them(tmp_path, monkeypatch):
    results = _floor_run_rows()
    ratios = harness.ratio_results(results)
    found = {(r.row.provider, r.row.metric): r.row.p50 for r in ratios}
    assert found == pytest.approx({
        ("floor", "ratio_to_floor"): 1.0, ("floor", "ratio_to_reference"): 100 / 150,
        ("reference", "ratio_to_floor"): 1.5, ("reference", "ratio_to_reference"): 1.0,
        ("deltakern-cpu", "ratio_to_floor"): 1.1, ("deltakern-cpu", "ratio_to_reference"): 110 / 150})
    assert all(r.row.mode == "full" and r.row.p20 == r.row.p50 == r.row.p80 for r in ratios)
    # The summary reads the same ratios from the timing rows.
    entries = {e["provider"]: e for e in harness.summarize(results)}
    for (provider, metric), ratio in found.items():
        assert entries[provider][metric] == pytest.approx(ratio)
    # A case whose first provider is the reference has no floor: no ratio_to_floor rows.
    assert {r.row.metric for r in harness.ratio_results(results[1:])} == {"ratio_to_reference"}

    from deltakern import plots

    path = str(tmp_path / "e2e.csv")
    harness.write_csv([r.row for r in results + ratios], path)
    drawn = []
    monkeypatch.setattr("matplotlib.pyplot.close", drawn.append)
    plots.plot_times(path, str(tmp_path / "e2e_time.png"))
    labels = sorted(text.get_text() for ax in drawn[0].axes for text in ax.texts)
    assert labels == ["1.00x floor", "1.10x floor", "1.50x floor"]


@pytest.mark.parametrize("method", list(methods()))
def test_check_fails_when_the_models_differ(method):
    case = e2e.E2ECase(SHAPES[method], torch.float32, "cpu")
    providers = case.providers(["cpu"])
    gate = case.model.model.layers[0].mlp.gate_proj
    with torch.no_grad():  # an NF4 base: its block scales
        (gate.base_layer.weight_absmax if method == "qlora" else gate.weight).mul_(1.1)
    ok, worst = case.check("deltakern-cpu", providers["deltakern-cpu"])
    assert not ok and worst > 1.0


@pytest.mark.parametrize("method", list(methods()))
def test_bf16_check_is_against_the_reference_in_fp32(method):
    """In bf16 the expectation is the reference's step in fp32: deltakern's step passes, with an
    error within twice the bf16 reference's; the bf16 reference passes against itself; a model
    with one projection's weight doubled fails (10% moves the prompt methods' gradients by about
    1%, within bf16's noise there)."""
    case = e2e.E2ECase(SHAPES[method], torch.bfloat16, "cpu")
    providers = case.providers(["cpu"])
    ok, worst = case.check("deltakern-cpu", providers["deltakern-cpu"])
    assert ok and worst <= 1.0, worst
    ok, worst = case.check("reference", providers["reference"])
    assert ok and worst < 1 / e2e._LOW_PRECISION_FACTOR
    assert all(value.dtype == torch.float32 for value in case._expected_fp32.values())
    gate = case.model.model.layers[0].mlp.gate_proj
    with torch.no_grad():
        (gate.base_layer.weight_absmax if method == "qlora" else gate.weight).mul_(2.0)
    ok, worst = case.check("deltakern-cpu", providers["deltakern-cpu"])
    assert not ok and worst > 1.0


def test_same_base_and_delta_weights(cases):
    for method, case in cases.items():
        base = case.reference if method in ("adapter", "bitfit") else case.reference.get_base_model()
        reference = {name: p for name, p in base.named_parameters() if not p.requires_grad}
        ours = {name: p for name, p in case.model.named_parameters() if not p.requires_grad}
        if method == "qlora":  # the NF4 codes: frozen uint8 parameters on both sides
            for name, packed in ours.items():
                if packed.dtype == torch.uint8:
                    assert torch.equal(packed, reference[name].reshape(-1)), name
        assert len(ours) == len(reference) > 0, method
        ours_total = sum(p.numel() for p in ours.values())
        assert ours_total == sum(p.numel() for p in reference.values()), method
        embed = "model.embed_tokens.weight"
        assert torch.equal(ours[embed], reference[embed]), method
        for name, theirs, mine in case.pairs:
            assert torch.equal(theirs.reshape(mine.shape), mine), name
    lora = cases["lora"]
    assert len(lora.pairs) == 2 * 7 * SHAPES["lora"].layers  # q, k, v, o, gate, up, down; not lm_head
    assert all(mine.abs().max() > 0 for name, _, mine in lora.pairs if name.endswith("lora_B"))
    layers = [m for m in lora.model.modules() if isinstance(m, LoRALinear)]
    assert {m.dropout_p for m in layers} == {lora_method.E2E_DROPOUT_P}
    assert {(m.r, m.scaling) for m in layers} == {(16, 2.0)}
    assert cases["prefix"].pairs[0][2].shape[0] == prefix_method.E2E_VIRTUAL_TOKENS
    assert len(cases["adapter"].pairs) == 4 * 2 * SHAPES["adapter"].layers
    hidden = SHAPES["prompt"].hidden
    [(name, theirs, mine)] = cases["prompt"].pairs
    assert name == "prompt.embedding.weight" and mine is cases["prompt"].model.deltakern_prompt.embedding.weight
    assert mine.shape == (prompt_method.E2E_VIRTUAL_TOKENS, hidden)
    assert 0.5 < mine.std().item() < 1.5  # PEFT's random init, N(0, 1), copied
    # P-tuning's MLP encoder: embedding, then Linear(D, H), ReLU, Linear(H, H), ReLU, Linear(H, D), H = D.
    ptuning = {name: mine.shape for name, _, mine in cases["ptuning"].pairs}
    assert ptuning == {"prompt.embedding.weight": (prompt_method.E2E_VIRTUAL_TOKENS, hidden),
                       **{f"prompt.mlp_head.{i}.weight": (hidden, hidden) for i in (0, 2, 4)},
                       **{f"prompt.mlp_head.{i}.bias": (hidden,) for i in (0, 2, 4)}}
    # BitFit: a zero bias on every linear layer (q, k, v, o, gate, up, down per layer, and lm_head),
    # each the bias add_bitfit added, and nothing else trainable.
    bitfit = cases["bitfit"]
    names = [name for name, _, _ in bitfit.pairs]
    assert len(names) == 7 * SHAPES["bitfit"].layers + 1 and "lm_head.bias" in names
    assert list(bitfit_biases(bitfit.model)) == names
    assert all(not theirs.any() and not mine.any() for _, theirs, mine in bitfit.pairs)
    assert [p for p in bitfit.reference.parameters() if p.requires_grad] == [theirs for _, theirs, _ in bitfit.pairs]
    # (IA)³: PEFT's Llama defaults, output scales on k_proj and v_proj and an input scale on
    # down_proj, drawn around 1.
    ia3 = {name: mine for name, _, mine in cases["ia3"].pairs}
    kv = SHAPES["ia3"].hidden // SHAPES["ia3"].heads * SHAPES["ia3"].kv_heads
    assert {name: p.shape for name, p in ia3.items()} == {
        f"model.layers.{i}.{where}.ia3_l": (size,) for i in range(SHAPES["ia3"].layers)
        for where, size in (("self_attn.k_proj", kv), ("self_attn.v_proj", kv), ("mlp.down_proj", SHAPES["ia3"].intermediate))}
    assert all(0.0 < (p - 1.0).abs().max() < 1.0 for p in ia3.values())


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_virtual_tokens_are_not_targets(cases, method):
    # Both sides prepend -100 labels for the virtual tokens: the loss is the mean cross-entropy of
    # the batch * seq real tokens, the last virtual token predicting the first one.
    case = cases[method]
    ids = case.inputs["input_ids"]
    vocab = SHAPES[method].vocab
    for model in (case.reference, case.model):
        model.eval()
        try:
            with torch.no_grad():
                out = model(**case.inputs)
        finally:
            model.train()
        assert out.logits.shape == (*ids.shape[:1], prompt_method.E2E_VIRTUAL_TOKENS + ids.shape[1], vocab)
        by_hand = F.cross_entropy(out.logits[:, prompt_method.E2E_VIRTUAL_TOKENS - 1:-1].reshape(-1, vocab), ids.reshape(-1))
        assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_training_step(cases):
    case = cases["lora"]
    fn = case.providers(["cpu"])["deltakern-cpu"]
    loss = fn()
    assert loss.dim() == 0 and abs(loss.item() - math.log(SHAPES["lora"].vocab)) < 0.5
    timed, setup = case.run_mode("deltakern-cpu", fn, "bwd")
    timed(setup())
    assert all(mine.grad is not None and mine.grad.abs().max() > 0 for _, _, mine in case.pairs)
    assert all(p.grad is None for p in case.model.parameters() if not p.requires_grad)
    before = [mine.detach().clone() for _, _, mine in case.pairs]
    base_before = case.model.lm_head.weight.detach().clone()
    step, setup = case.run_mode("deltakern-cpu", fn, "full")
    assert setup is None
    step()
    moved = [not torch.equal(b, mine) for b, (_, _, mine) in zip(before, case.pairs)]
    assert all(moved)  # the optimizer step is part of the training step
    assert torch.equal(case.model.lm_head.weight, base_before)
    # check puts both models back on the same (initial) delta weights
    assert case.check("deltakern-cpu", fn)[0]


def test_saved_bytes(cases):
    saved = {}
    for method, case in cases.items():
        providers = case.providers(["cpu"])
        saved[method] = {name: case.saved_bytes(fn) for name, fn in providers.items()}
    for method in ("lora", "prefix"):
        assert saved[method]["deltakern-cpu"] < saved[method]["reference"], saved[method]
    # No deltakern kernel for these: at most what PEFT / plain torch saves (P-tuning's encoder runs
    # once, not once per sequence as in PEFT, so it saves less).
    for method in ("adapter", "prompt", "bitfit"):
        assert saved[method]["deltakern-cpu"] <= saved[method]["reference"], saved[method]
    assert saved["ptuning"]["deltakern-cpu"] < saved["ptuning"]["reference"], saved["ptuning"]
    assert all(v > 0 for per in saved.values() for v in per.values())
    # Parameters are excluded: counting them adds at least every frozen linear weight (each is
    # saved for the input gradient) and at most all parameters.
    case = cases["lora"]
    fn = case.providers(["cpu"])["deltakern-cpu"]
    with_parameters = harness.saved_tensors_bytes(fn)
    linear = sum(m.base_layer.weight.nbytes for m in case.model.modules() if isinstance(m, LoRALinear))
    linear += case.model.lm_head.weight.nbytes
    everything = sum(p.nbytes for p in case.model.parameters())
    assert linear <= with_parameters - saved["lora"]["deltakern-cpu"] <= everything


def test_run_cases_rows(cases):
    # One method: the CPU profiler behind peak_MB takes seconds per provider even at this size.
    results = harness.run_cases("e2e", [cases["lora"]], ["cpu"], warmup=0, repeats=1, with_compile=True)
    assert all(r.ok for r in results), [(r.row.shape, r.row.provider, r.detail) for r in results if not r.ok]
    rows = {(r.row.shape, r.row.provider, r.row.mode, r.row.metric): r.row for r in results}
    for shape in [SHAPES["lora"]]:
        for provider in ("reference", "deltakern-cpu"):
            assert {metric for (s, p, mode, metric) in rows if (s, p) == (str(shape), provider)} == {
                "ms", "saved_MB", "peak_MB", "tokens_per_s"}
            assert {mode for (s, p, mode, metric) in rows if (s, p, metric) == (str(shape), provider, "ms")} == set(
                harness.MODES)
            step = rows[(str(shape), provider, "full", "ms")]
            rate = rows[(str(shape), provider, "full", "tokens_per_s")]
            assert rate.p50 == pytest.approx(shape.batch * shape.seq / (step.p50 / 1e3))
            assert rows[(str(shape), provider, "full", "peak_MB")].p50 > 0


def test_bad_input():
    fields = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176, vocab=256, seq=32, batch=2)
    with pytest.raises(ValueError, match="unknown method 'vera'"):
        e2e.E2EShape("vera", **fields)
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        e2e.E2EShape("lora", **{**fields, "batch": 0})
    with pytest.raises(ValueError, match="multiple of heads"):
        e2e.E2EShape("lora", **{**fields, "heads": 3})
    with pytest.raises(ValueError, match="must be an E2EShape"):
        e2e.E2ECase("lora", torch.float32, "cpu")
