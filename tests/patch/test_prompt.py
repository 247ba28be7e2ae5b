"""add_prompt (prompt tuning, P-tuning v1) against PEFT with the same weights, fold_prompt_encoder,
generate(), checkpoints in PEFT's format, init from a text, training, and bad input.

PEFT references (peft 0.21.2 with transformers 5.24): PeftModelForCausalLM for the decoder-only
families, PeftModelForSequenceClassification for BERT/RoBERTa, PeftModelForSeq2SeqLM for T5 (prompt
before the encoder input only; PEFT's embedding has 2P rows, the first P used).
PEFT's own generate() is wrong for prompt tuning with transformers 5: its
prepare_inputs_for_generation looks for ``past_key_values`` (transformers 5 passes ``cache``), so it
prepends the prompt again at every decoding step. Greedy generate() is therefore checked against
greedy decoding with PEFT's forward on the whole sequence (which ignores position_ids, as generate
through PEFT would).
"""

import pytest
import torch
import transformers
from peft import PeftModel, PromptEncoderConfig, PromptTuningConfig, get_peft_model

import deltakern

from . import models

P = 4
TOL = dict(atol=2e-5, rtol=2e-5)
PEFT_TASK = {"llama": "CAUSAL_LM", "qwen2": "CAUSAL_LM", "mistral": "CAUSAL_LM", "gpt2": "CAUSAL_LM",
             "bert": "SEQ_CLS", "roberta": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")


def build(family: str) -> torch.nn.Module:
    """A tiny model of ``family``; BERT/RoBERTa with a classification head (PEFT's SEQ_CLS)."""
    return models.build(family, task="cls" if family in ("bert", "roberta") else "lm")


def batch_with_labels(family: str) -> dict:
    batch = models.inputs(family)
    if family in models.DECODER_ONLY:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    elif family == "t5":
        batch["labels"] = batch["decoder_input_ids"]
    else:
        batch["labels"] = torch.tensor([0, 2])
    return batch


def peft_model(family: str, encoder: str | None = None, seed: int = 5, dtype: torch.dtype = torch.float32):
    if encoder is None:
        config = PromptTuningConfig(task_type=PEFT_TASK[family], num_virtual_tokens=P)
    else:
        config = PromptEncoderConfig(task_type=PEFT_TASK[family], num_virtual_tokens=P, encoder_hidden_size=24,
                                     encoder_reparameterization_type=encoder.upper())
    reference = get_peft_model(build(family).to(dtype), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in reference.prompt_encoder["default"].parameters():
            parameter.normal_(std=0.5)
    return reference.eval()


def ours_like(reference, family: str, encoder: str | None = None, dtype: torch.dtype = torch.float32):
    hidden = None if encoder is None else 24
    model = deltakern.add_prompt(build(family).to(dtype), P, encoder=encoder, encoder_hidden_size=hidden)
    # Same parameter names and shapes as PEFT's encoder: a strict load.
    model.deltakern_prompt.load_state_dict(reference.prompt_encoder["default"].state_dict())
    return model.eval()


@pytest.mark.parametrize("family", models.FAMILIES)
def test_same_logits_loss_and_prompt_gradient_as_peft(family):
    reference = peft_model(family)
    ours = ours_like(reference, family)
    batch = batch_with_labels(family)
    theirs_out, ours_out = reference(**batch), ours(**batch)
    torch.testing.assert_close(ours_out.logits, theirs_out.logits, **TOL)
    torch.testing.assert_close(ours_out.loss, theirs_out.loss, **TOL)
    if family in models.DECODER_ONLY:
        assert ours_out.logits.shape[1] == P + batch["input_ids"].shape[1]
    (models.loss_of(theirs_out.logits) + theirs_out.loss).backward()
    (models.loss_of(ours_out.logits) + ours_out.loss).backward()
    theirs_grad = reference.prompt_encoder["default"].embedding.weight.grad
    ours_grad = ours.deltakern_prompt.embedding.weight.grad
    assert theirs_grad[:P].abs().max() > 1e-3
    torch.testing.assert_close(ours_grad, theirs_grad, **TOL)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {"deltakern_prompt.embedding.weight"}


def test_masked_lm_gets_prompt_mask_and_ignored_labels():
    """PEFT has no masked-LM task; the reference is the base model on [prompt; embeddings] by hand."""
    ours = deltakern.add_prompt(models.build("bert"), P)
    reference = models.build("bert")
    batch = models.inputs("bert")
    batch["token_type_ids"] = torch.ones_like(batch["input_ids"])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    prompt = ours.deltakern_prompt.embedding.weight.detach()
    embeds = torch.cat([prompt.expand(2, -1, -1), reference.get_input_embeddings()(batch["input_ids"])], dim=1)
    expected = reference(inputs_embeds=embeds,
                         attention_mask=torch.cat([torch.ones(2, P, dtype=torch.long), batch["attention_mask"]], 1),
                         token_type_ids=torch.cat([torch.zeros(2, P, dtype=torch.long), batch["token_type_ids"]], 1),
                         labels=torch.cat([torch.full((2, P), -100), labels], 1))
    got = ours(**batch, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits, **TOL)
    torch.testing.assert_close(got.loss, expected.loss, **TOL)


@pytest.mark.parametrize("family,encoder", [("llama", "lstm"), ("llama", "mlp"), ("t5", "lstm")])
def test_p_tuning_matches_peft(family, encoder):
    reference = peft_model(family, encoder)
    ours = ours_like(reference, family, encoder)
    batch = batch_with_labels(family)
    theirs_out, ours_out = reference(**batch).logits, ours(**batch).logits
    torch.testing.assert_close(ours_out, theirs_out, **TOL)
    models.loss_of(theirs_out).backward()
    models.loss_of(ours_out).backward()
    theirs = dict(reference.prompt_encoder["default"].named_parameters())
    ours_parameters = dict(ours.deltakern_prompt.named_parameters())
    assert ours_parameters.keys() == theirs.keys()
    for name, parameter in ours_parameters.items():
        assert parameter.requires_grad and theirs[name].grad.abs().max() > 1e-5, name
        torch.testing.assert_close(parameter.grad, theirs[name].grad, **TOL, msg=name)


@pytest.mark.parametrize("encoder", [None, "lstm", "mlp"])
def test_bf16_model_keeps_the_prompt_in_fp32_as_peft(encoder):
    """Over a bf16 model PEFT builds its prompt and P-tuning encoders in fp32 and casts their output
    to bf16 where it is used; so does add_prompt: same parameter dtypes, the same bf16 logits bit for
    bit, and the same fp32 gradients."""
    reference = peft_model("llama", encoder, dtype=torch.bfloat16)
    ours = ours_like(reference, "llama", encoder, dtype=torch.bfloat16)
    theirs = dict(reference.prompt_encoder["default"].named_parameters())
    ours_parameters = dict(ours.deltakern_prompt.named_parameters())
    assert {p.dtype for p in theirs.values()} == {p.dtype for p in ours_parameters.values()} == {torch.float32}
    batch = batch_with_labels("llama")
    theirs_out, ours_out = reference(**batch).logits, ours(**batch).logits
    assert ours_out.dtype == torch.bfloat16
    assert torch.equal(ours_out, theirs_out)
    models.loss_of(theirs_out.float()).backward()
    models.loss_of(ours_out.float()).backward()
    for name, parameter in ours_parameters.items():
        assert theirs[name].grad.abs().max() > 1e-5, name
        torch.testing.assert_close(parameter.grad, theirs[name].grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_fold_gives_the_same_logits(encoder):
    reference = peft_model("llama", encoder)
    ours = ours_like(reference, "llama", encoder)
    batch = models.inputs("llama")
    with torch.no_grad():
        before = ours(**batch).logits
        deltakern.fold_prompt_encoder(ours)
        after = ours(**batch).logits
    torch.testing.assert_close(after, before, **TOL)
    assert [n for n, _ in ours.deltakern_prompt.named_parameters()] == ["embedding.weight"]
    with pytest.raises(ValueError, match="fold_prompt_encoder: the prompt of LlamaForCausalLM has no prompt encoder"):
        deltakern.fold_prompt_encoder(ours)


@pytest.mark.parametrize("family,encoder", [("llama", None), ("llama", "lstm"), ("bert", None), ("t5", None)])
def test_checkpoints_round_trip_with_peft(tmp_path, family, encoder):
    reference = peft_model(family, encoder)
    reference.save_pretrained(tmp_path / "peft")
    batch = models.inputs(family)
    with torch.no_grad():
        expected = reference(**batch).logits
        loaded = deltakern.load(build(family), tmp_path / "peft")
        torch.testing.assert_close(loaded(**batch).logits, expected, **TOL)
        deltakern.save(loaded, tmp_path / "ours")
        back = PeftModel.from_pretrained(build(family), tmp_path / "ours").eval()
        torch.testing.assert_close(back(**batch).logits, expected, **TOL)
    assert back.peft_config["default"].peft_type == ("PROMPT_TUNING" if encoder is None else "P_TUNING")


def test_trained_p_tuning_saved_by_us_loads_in_peft(tmp_path):
    ours = deltakern.add_prompt(build("llama"), P, encoder="lstm")
    torch.manual_seed(4)
    with torch.no_grad():
        for parameter in ours.deltakern_prompt.parameters():
            parameter.normal_(std=0.5)
    batch = models.inputs("llama")
    deltakern.save(ours, tmp_path)
    with torch.no_grad():
        peft = PeftModel.from_pretrained(build("llama"), tmp_path).eval()
        torch.testing.assert_close(peft(**batch).logits, ours.eval()(**batch).logits, **TOL)
    assert peft.peft_config["default"].encoder_reparameterization_type == "LSTM"


def greedy_with_peft_forward(reference, batch, new_tokens):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(new_tokens):
        token = reference(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generate_matches_peft_reference_path(family):
    """Left padding on the second row; PEFT's forward numbers its positions from 0 over the padding too."""
    reference = peft_model(family, seed=11)
    ours = ours_like(reference, family)
    batch = models.inputs(family)
    new_tokens = 8
    with torch.no_grad():
        expected = greedy_with_peft_forward(reference, batch, new_tokens)
        generated = ours.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        plain = build(family).generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert generated.tolist() == expected.tolist()
    assert plain.tolist() != expected.tolist()  # the prompt changes what is generated
    assert (expected[:, -new_tokens:] != expected[:, -1:]).any()


def test_t5_greedy_generate_matches_peft_generate():
    reference = peft_model("t5", seed=11)
    ours = ours_like(reference, "t5")
    batch = models.inputs("t5")
    del batch["decoder_input_ids"]
    # The random tiny T5 prefers pad and eos; suppressed, it generates varied tokens.
    options = dict(max_new_tokens=6, do_sample=False, suppress_tokens=[0, 1])
    with torch.no_grad():
        expected = reference.generate(**batch, **options)
        generated = ours.generate(**batch, **options)
        plain = build("t5").generate(**batch, **options)
    assert generated.tolist() == expected.tolist()
    assert plain.tolist() != expected.tolist()  # the encoder prompt changes what is generated


def word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, "great": 7, "terrible": 9, "movie": 11}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


def test_init_from_text_and_vocabulary():
    model = deltakern.add_prompt(build("llama"), 5, init="great movie", tokenizer=word_tokenizer())
    words = model.get_input_embeddings().weight
    torch.testing.assert_close(model.deltakern_prompt.embedding.weight, words[[7, 11, 7, 11, 7]], atol=0, rtol=0)
    model = deltakern.add_prompt(build("llama"), 1, init="great terrible movie", tokenizer=word_tokenizer())
    torch.testing.assert_close(model.deltakern_prompt.embedding.weight, words[[7]], atol=0, rtol=0)
    torch.manual_seed(0)
    model = deltakern.add_prompt(build("llama"), 6, init="vocab")
    rows = model.deltakern_prompt.embedding.weight
    assert all((words == row).all(-1).any() for row in rows)
    assert not torch.equal(rows[0], rows[1])


def test_bad_input():
    with pytest.raises(ValueError, match=r"add_prompt: Linear has no input embeddings \(get_input_embeddings\(\) must "
                                         r"return an nn.Embedding, got NoneType\)"):
        deltakern.add_prompt(torch.nn.Linear(2, 2), P)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=rf"add_prompt: num_virtual_tokens must be an int >= 1, got {bad!r}"):
            deltakern.add_prompt(build("llama"), bad)
    with pytest.raises(ValueError, match="add_prompt: init='great movie' is a text to initialise from and needs "
                                         "tokenizer=, got tokenizer=None"):
        deltakern.add_prompt(build("llama"), P, init="great movie")
    with pytest.raises(ValueError, match="add_prompt: encoder must be None, 'lstm' or 'mlp', got 'gru'"):
        deltakern.add_prompt(build("llama"), P, encoder="gru")
    with pytest.raises(ValueError, match="add_prompt: encoder_hidden_size=8 needs encoder='lstm' or 'mlp'"):
        deltakern.add_prompt(build("llama"), P, encoder_hidden_size=8)
    model = deltakern.add_prompt(build("llama"), P)
    with pytest.raises(ValueError, match="add_prompt: LlamaForCausalLM already has a deltakern prompt"):
        deltakern.add_prompt(model, P)
    with pytest.raises(ValueError, match="fold_prompt_encoder: the prompt of LlamaForCausalLM has no prompt encoder"):
        deltakern.fold_prompt_encoder(model)


@pytest.mark.parametrize("family,encoder", [("llama", None), ("llama", "mlp"), ("bert", None), ("t5", None)])
def test_a_prompted_model_pickles_whole(tmp_path, family, encoder):
    """torch.save of the whole model works (the hooks are partials, not closures); the loaded
    model's hooks read its own prompt, not the saved model's."""
    model = deltakern.add_prompt(build(family), P, encoder=encoder).eval()
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    batch = batch_with_labels(family)
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    with torch.no_grad():
        for parameter in loaded.deltakern_prompt.parameters():  # not a uniform shift: LayerNorm drops that
            parameter.normal_(generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(loaded(**batch).logits, model(**batch).logits)
