"""add_prefix against PEFT's prefix tuning (same prompt_embeddings), generate(), gradient
checkpointing, checkpoints in PEFT's format, and bad input.

PEFT references (peft 0.21.2 with transformers 5.24):
- decoder-only families: PeftModelForCausalLM; BERT/RoBERTa: PeftModelForFeatureExtraction on the
  bare model (PeftModelForSequenceClassification raises "Model does not support past key values"
  with transformers 5, whose BERT forward names the cache ``cache``);
- T5: PeftModelForSeq2SeqLM prefixes the decoder self-attention only, so the encoder prefix of
  add_prefix is checked against a hand-written reference instead (T5's own compute_bias over
  [prefix; input] with the prefix at positions 0..P-1, eager softmax);
- generate(): PEFT's own generate drops the prefix with transformers 5 (its prefix cache goes in as
  ``past_key_values`` while generate passes its empty ``cache``), so greedy generate is checked
  against greedy decoding with PEFT's forward on the whole sequence at each step, with the
  pad-aware position_ids generate computes (PEFT's forward shifts them by P, as add_prefix does).
"""

import warnings

import pytest
import torch
import transformers
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

import deltakern
from deltakern.patch import prefix as prefix_method

from . import models

P = 4
TOL = dict(atol=2e-5, rtol=2e-5)
PEFT_TASK = {"llama": "CAUSAL_LM", "qwen2": "CAUSAL_LM", "mistral": "CAUSAL_LM", "gpt2": "CAUSAL_LM",
             "bert": "FEATURE_EXTRACTION", "roberta": "FEATURE_EXTRACTION", "t5": "SEQ_2_SEQ_LM"}

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")


def build(family: str) -> torch.nn.Module:
    """A tiny model of ``family``; BERT/RoBERTa bare (the task PEFT's prefix tuning supports for them)."""
    if family in ("bert", "roberta"):
        torch.manual_seed(0)
        return transformers.AutoModel.from_config(models.config(family)).eval()
    return models.build(family)


def output(result) -> torch.Tensor:
    return result.last_hidden_state if getattr(result, "logits", None) is None else result.logits


def peft_model(family: str, projection_hidden=None, seed: int = 5, dtype: torch.dtype = torch.float32):
    config = PrefixTuningConfig(task_type=PEFT_TASK[family], num_virtual_tokens=P,
                                prefix_projection=projection_hidden is not None,
                                encoder_hidden_size=projection_hidden)
    reference = get_peft_model(build(family).to(dtype), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in reference.prompt_encoder["default"].parameters():
            parameter.normal_()
    return reference.eval()


def ours_like(reference, family: str, projection_hidden=None, dtype: torch.dtype = torch.float32):
    """A deltakern prefix with the PEFT model's weights (T5 in PEFT's decoder-only layout)."""
    encoder_state = reference.prompt_encoder["default"].state_dict()
    if family == "t5":
        config = {k: getattr(v, "value", v) for k, v in reference.peft_config["default"].to_dict().items()}
        state = {"prompt_embeddings": encoder_state["embedding.weight"]}
        return prefix_method.load_peft_prefix(build(family), config, state).eval()
    model = deltakern.add_prefix(build(family).to(dtype), P, projection_hidden=projection_hidden)
    model.deltakern_prefix.load_state_dict(encoder_state)
    return model.eval()


@pytest.mark.parametrize("family", models.FAMILIES)
def test_same_outputs_and_prefix_gradients_as_peft(family):
    reference = peft_model(family)
    ours = ours_like(reference, family)
    batch = models.inputs(family)
    theirs_out, ours_out = output(reference(**batch)), output(ours(**batch))
    torch.testing.assert_close(ours_out, theirs_out, **TOL)
    models.loss_of(theirs_out).backward()
    models.loss_of(ours_out).backward()
    theirs_grad = reference.prompt_encoder["default"].embedding.weight.grad
    ours_grad = ours.deltakern_prefix.embedding.weight.grad
    assert theirs_grad.abs().max() > 1e-3
    torch.testing.assert_close(ours_grad, theirs_grad, **TOL)
    # Only the prefix trains.
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {"deltakern_prefix.embedding.weight"}


def within_two_bf16_ulps(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Every element within 2**-7 (two bf16 ulps at 1) of the largest magnitude of ``expected``."""
    scale = expected.abs().max().item()
    assert scale > 1e-3
    assert (got - expected).abs().max().item() <= 2**-7 * scale


@pytest.mark.parametrize("projection_hidden", [None, 16])
def test_bf16_model_keeps_the_prefix_in_fp32_as_peft(projection_hidden):
    """Over a bf16 model PEFT builds its prefix encoder in fp32 and casts the keys and values to
    bf16; so does add_prefix (its attention runs on the bf16 model's path, PEFT's on SDPA over the
    concatenated keys, so the outputs agree to bf16 rounding)."""
    reference = peft_model("llama", projection_hidden, dtype=torch.bfloat16)
    ours = ours_like(reference, "llama", projection_hidden, dtype=torch.bfloat16)
    theirs = dict(reference.prompt_encoder["default"].named_parameters())
    ours_parameters = dict(ours.deltakern_prefix.named_parameters())
    assert {p.dtype for p in theirs.values()} == {p.dtype for p in ours_parameters.values()} == {torch.float32}
    batch = models.inputs("llama")
    theirs_out, ours_out = reference(**batch).logits, ours(**batch).logits
    assert ours_out.dtype == torch.bfloat16
    within_two_bf16_ulps(ours_out.float(), theirs_out.float())  # measured: 0.5% of the largest logit
    models.loss_of(theirs_out.float()).backward()
    models.loss_of(ours_out.float()).backward()
    for name, parameter in ours_parameters.items():
        within_two_bf16_ulps(parameter.grad, theirs[name].grad)  # measured: at most 0.6%


def test_projected_prefix_matches_peft():
    reference = peft_model("llama", projection_hidden=16)
    ours = ours_like(reference, "llama", projection_hidden=16)
    batch = models.inputs("llama")
    theirs_out, ours_out = reference(**batch).logits, ours(**batch).logits
    torch.testing.assert_close(ours_out, theirs_out, **TOL)
    models.loss_of(theirs_out).backward()
    models.loss_of(ours_out).backward()
    theirs = dict(reference.prompt_encoder["default"].named_parameters())
    for name, parameter in ours.deltakern_prefix.named_parameters():
        assert theirs[name].grad.abs().max() > 1e-4
        torch.testing.assert_close(parameter.grad, theirs[name].grad, **TOL)


def t5_reference_function(prefixes: dict, first_attention: dict):
    """Eager T5 attention over [prefix; input] written independently of deltakern: T5's own
    compute_bias over P + Lk keys with the prefix at positions 0..P-1."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_bias=None, **kwargs):
        batch, _, q_length, _ = query.shape
        kv_length = key.shape[2]
        if module not in prefixes:  # cross-attention
            scores = query @ key.transpose(2, 3) + position_bias
            prefix_length = 0
        else:
            prefix_k, prefix_v = prefixes[module]
            key = torch.cat([prefix_k.expand(batch, -1, -1, -1), key], dim=2)
            value = torch.cat([prefix_v.expand(batch, -1, -1, -1), value], dim=2)
            prefix_length = prefix_k.shape[1]
            bias = first_attention[module].compute_bias(q_length, prefix_length + kv_length,
                                                        past_seen_tokens=prefix_length + kv_length - q_length)
            scores = query @ key.transpose(2, 3) + bias
        if attention_mask is not None:
            keep = torch.nn.functional.pad(attention_mask, (prefix_length, 0), value=True)
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        out = torch.softmax(scores, dim=-1) @ value
        return out.transpose(1, 2), None

    return attention


def test_t5_encoder_and_decoder_prefix_matches_hand_written_reference():
    ours = deltakern.add_prefix(models.build("t5"), P).eval()
    torch.manual_seed(7)
    with torch.no_grad():
        ours.deltakern_prefix.embedding.weight.normal_()
    reference = models.build("t5")
    weight = ours.deltakern_prefix.embedding.weight.detach().clone().requires_grad_(True)
    width = 2 * 4 * 8  # (k, v) × Hkv × D
    prefixes, first_attention = {}, {}
    for slot, block_name in enumerate([f"{s}.block.{i}" for s in ("encoder", "decoder") for i in range(2)]):
        attention = reference.get_submodule(block_name + ".layer.0.SelfAttention")
        kv = weight[:, slot * width:(slot + 1) * width].reshape(P, 2, 4, 8).permute(1, 2, 0, 3)
        prefixes[attention] = (kv[0], kv[1])
        first_attention[attention] = reference.get_submodule(block_name.rsplit(".", 1)[0] + ".0.layer.0.SelfAttention")
    AttentionInterface.register("t5_prefix_reference", t5_reference_function(prefixes, first_attention))
    AttentionMaskInterface.register("t5_prefix_reference",
                                    lambda *a, **k: sdpa_mask(*a, **{**k, "allow_is_causal_skip": False}))
    reference.set_attn_implementation("t5_prefix_reference")

    batch = models.inputs("t5")
    theirs_out, ours_out = reference(**batch).logits, ours(**batch).logits
    torch.testing.assert_close(ours_out, theirs_out, **TOL)
    models.loss_of(theirs_out).backward()
    models.loss_of(ours_out).backward()
    assert weight.grad[:, :2 * width].abs().max() > 1e-3  # the encoder slots train
    torch.testing.assert_close(ours.deltakern_prefix.embedding.weight.grad, weight.grad, **TOL)


def test_layers_without_prefix_run_the_previous_implementation(monkeypatch):
    """PEFT's T5 layout: the encoder and the cross-attention have no prefix and run sdpa, unchanged."""
    calls = []
    sdpa = AttentionInterface._global_mapping["sdpa"]

    def counting_sdpa(module, *args, **kwargs):
        calls.append(module)
        return sdpa(module, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", counting_sdpa)
    reference = peft_model("t5")
    ours = ours_like(reference, "t5")
    # Frozen like ours: SDPA picks its CPU kernel by requires_grad, which changes the last bits.
    plain = models.build("t5").requires_grad_(False)
    batch = models.inputs("t5")
    calls.clear()
    ours_encoded = ours.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    plain_encoded = plain.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(ours_encoded, plain_encoded, atol=0, rtol=0)
    encoder_self = [ours.get_submodule(f"encoder.block.{i}.layer.0.SelfAttention") for i in range(2)]
    assert calls[:2] == encoder_self
    calls.clear()
    torch.testing.assert_close(ours(**batch).logits, reference(**batch).logits, **TOL)
    cross = [ours.get_submodule(f"decoder.block.{i}.layer.1.EncDecAttention") for i in range(2)]
    ours_calls = [m for m in calls if any(m is c for c in encoder_self + cross)]
    assert ours_calls == encoder_self + cross  # decoder self-attention never reaches sdpa


def greedy_with_peft_forward(reference, batch, new_tokens):
    """Greedy decoding with PEFT's forward on the whole sequence, at generate()'s positions."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(new_tokens):
        # PEFT's forward adds P to explicit position_ids itself.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        logits = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generate_matches_peft_reference_path(family, monkeypatch):
    query_lengths = []
    fused = prefix_method.prefix_attention

    def recording(q, *args, **kwargs):
        query_lengths.append(q.shape[2])
        return fused(q, *args, **kwargs)

    monkeypatch.setattr(prefix_method, "prefix_attention", recording)
    reference = peft_model(family, seed=11)
    ours = ours_like(reference, family)
    batch = models.inputs(family)
    new_tokens = 8
    with torch.no_grad():
        expected = greedy_with_peft_forward(reference, batch, new_tokens)
        query_lengths.clear()
        generated = ours.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert generated.tolist() == expected.tolist()
    plain = build(family).generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert plain.tolist() != expected.tolist()  # the prefix changes what is generated
    assert (expected[:, -new_tokens:] != expected[:, -1:]).any()  # not a constant continuation
    layers = 2
    assert query_lengths == [9] * layers + [1] * layers * (new_tokens - 1)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = deltakern.add_prefix(models.build("llama"), P, projection_hidden=16)
        torch.manual_seed(2)
        with torch.no_grad():
            for parameter in model.deltakern_prefix.parameters():
                parameter.normal_()
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.gradient_checkpointing_enable()
        model.train()
        batch = models.inputs("llama")
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 5
    for name in grads[0]:
        assert grads[0][name].abs().max() > 1e-5
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family,projection_hidden", [("llama", None), ("llama", 16), ("gpt2", None), ("t5", None)])
def test_checkpoints_round_trip_with_peft(tmp_path, family, projection_hidden):
    reference = peft_model(family, projection_hidden=projection_hidden)
    reference.save_pretrained(tmp_path / "peft")
    batch = models.inputs(family)
    with torch.no_grad():
        expected = output(reference(**batch))
        loaded = deltakern.load(build(family), tmp_path / "peft")
        torch.testing.assert_close(output(loaded(**batch)), expected, **TOL)

        deltakern.save(loaded, tmp_path / "ours")
        back = PeftModel.from_pretrained(build(family), tmp_path / "ours").eval()
        torch.testing.assert_close(output(back(**batch)), expected, **TOL)
    assert back.peft_config["default"].prefix_projection is False  # the saved prefixes are direct


def test_t5_prefix_in_the_encoder_has_no_peft_checkpoint(tmp_path):
    model = deltakern.add_prefix(models.build("t5"), P)
    with pytest.raises(NotImplementedError, match="PEFT's prefix tuning has the decoder only"):
        deltakern.save(model, tmp_path)


def test_bad_input():
    with pytest.raises(ValueError, match=r"add_prefix: Linear \(model_type=None\) is not a supported family; looked for llama"):
        deltakern.add_prefix(torch.nn.Linear(2, 2), P)
    no_layers = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**models.config("llama").to_dict(), "num_hidden_layers": 0}))
    with pytest.raises(ValueError, match=r"add_prefix: found no transformer blocks .* holding 'self_attn'"):
        deltakern.add_prefix(no_layers, P)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=rf"add_prefix: num_virtual_tokens must be an int >= 1, got {bad!r}"):
            deltakern.add_prefix(models.build("llama"), bad)
    with pytest.raises(ValueError, match="add_prefix: projection_hidden must be an int >= 1, got 0"):
        deltakern.add_prefix(models.build("llama"), P, projection_hidden=0)
    model = deltakern.add_prefix(models.build("llama"), P)
    with pytest.raises(ValueError, match="add_prefix: LlamaForCausalLM already has a deltakern prefix"):
        deltakern.add_prefix(model, P)
    # GPT-2 has 128 absolute positions: 125 virtual tokens + 9 inputs go beyond them.
    gpt2 = deltakern.add_prefix(models.build("gpt2"), 125)
    with pytest.raises(ValueError, match=r"position 133 \(P=125 virtual tokens .* beyond the 128 absolute positions of GPT2Model"):
        gpt2(**models.inputs("gpt2"))
    roberta = deltakern.add_prefix(build("roberta"), 120)
    with pytest.raises(ValueError, match=r"position 130 \(P=120 .* beyond the 130 absolute positions of RobertaEmbeddings"):
        roberta(**models.inputs("roberta"))


def test_classifier_prefix_checkpoint_holds_the_head_and_a_wrong_head_is_a_clear_error(tmp_path):
    """Prefix tuning of a sequence-classification model saves its task head beside the prefixes
    (PEFT's ``modules_to_save`` for SEQ_CLS) and loads it back; a saved head that does not fit the
    model raises before anything is loaded."""
    from safetensors.torch import load_file, save_file

    model = deltakern.add_prefix(models.build("bert", task="cls"), P)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    deltakern.save(model, tmp_path / "ckpt")
    state = load_file(tmp_path / "ckpt" / "adapter_model.safetensors")
    assert set(state) == {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}
    batch = models.inputs("bert")
    loaded = deltakern.load(models.build("bert", task="cls"), tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)
    state["base_model.classifier.weight"] = state["base_model.classifier.weight"][:2]
    save_file(state, tmp_path / "ckpt" / "adapter_model.safetensors")
    fresh = models.build("bert", task="cls")
    with pytest.raises(ValueError, match=r"task head tensor 'base_model.classifier.weight' has shape \(2, 32\) in the checkpoint, the model "
                                         r"expects \(3, 32\)"):
        deltakern.load(fresh, tmp_path / "ckpt")
    assert not prefix_method.has_prefix(fresh)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_a_prefixed_model_pickles_whole(tmp_path, family):
    """torch.save of the whole model works (the position hooks are partials, not closures); the
    loaded model's hooks and attention read its own prefix."""
    model = deltakern.add_prefix(build(family), P).eval()
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    batch = models.inputs(family)
    assert torch.equal(output(loaded(**batch)), output(model(**batch)))
    with torch.no_grad():
        loaded.deltakern_prefix.embedding.weight.normal_(generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(output(loaded(**batch)), output(model(**batch)))
