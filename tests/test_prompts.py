"""PET patterns and verbalizers: encoding, class logits by hand on a tiny BERT, ensembling, errors,
and prefix tuning + PVP (P-tuning v2 for NLU)."""

from types import SimpleNamespace

import pytest
import torch

import deltakern
from deltakern.prompts import PVP, Template, Verbalizer, ensemble
from tests.word_tokenizer import word_tokenizer

from .patch import models

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "was", "it", "great", "good", "bad",
         "terrible", "aw", "##ful", "##ly", "fine", ".", "?", ",", "yes", "no", "plot", "acting", "is"]
PAD, UNK, CLS, SEP, MASK_ID = 0, 1, 2, 3, 4


@pytest.fixture
def tokenizer(tmp_path):
    return word_tokenizer(tmp_path, WORDS)


def ids(*words):
    return [WORDS.index(w) for w in words]


@pytest.fixture
def pvp(tokenizer):
    # "awful" is two tokens (aw ##ful), "awfully" three; classes have 2 and 3 words.
    verbalizer = Verbalizer({"pos": ["great", "good"], "neg": ["bad", "awful", "awfully"]}, tokenizer)
    return PVP(Template("{text} it was [MASK] ."), verbalizer)


def by_hand(logits, positions, label_words):
    """Class logits from full MLM logits [B, L, V]: the mask row, mean over each word's tokens,
    mean over the class's words."""
    out = torch.zeros(logits.shape[0], len(label_words))
    for b in range(logits.shape[0]):
        row = logits[b, positions[b]]
        for c, words in enumerate(label_words):
            out[b, c] = sum(sum(row[t] for t in word) / len(word) for word in words) / len(words)
    return out


HAND_WORDS = [[ids("great"), ids("good")], [ids("bad"), ids("aw", "##ful"), ids("aw", "##ful", "##ly")]]


def test_template_encode(tokenizer):
    batch = Template("{text} it was [MASK] .").encode(tokenizer, ["the movie was great", "bad"])
    first = ids("[CLS]", "the", "movie", "was", "great", "it", "was", "[MASK]", ".", "[SEP]")
    second = ids("[CLS]", "bad", "it", "was", "[MASK]", ".", "[SEP]") + [PAD] * 3
    assert batch.input_ids.tolist() == [first, second]
    assert batch.attention_mask.tolist() == [[1] * 10, [1] * 7 + [0] * 3]
    assert batch.mask_positions.tolist() == [7, 4]
    tokenizer.padding_side = "left"
    left = Template("{text} it was [MASK] .").encode(tokenizer, ["the movie was great", "bad"])
    assert left.input_ids[1].tolist() == [PAD] * 3 + second[:7]
    assert left.mask_positions.tolist() == [7, 7]


def test_template_truncates_the_texts_never_the_pattern(tokenizer):
    template = Template("{text} ? [MASK] , {text_b}")
    # Fixed part: [CLS] ? [MASK] , [SEP] = 5 tokens; max_length 9 leaves 4 for the texts.
    batch = template.encode(tokenizer, ["the movie was great", "bad"], ["the plot is fine ,", "yes"], max_length=9)
    # Longest first: (4, 5) -> (4, 4) -> (3, 4) -> (3, 3) -> (2, 3) -> (2, 2).
    assert batch.input_ids[0].tolist() == ids("[CLS]", "the", "movie", "?", "[MASK]", ",", "the", "plot", "[SEP]")
    assert batch.input_ids[1].tolist() == ids("[CLS]", "bad", "?", "[MASK]", ",", "yes", "[SEP]") + [PAD] * 2
    assert batch.mask_positions.tolist() == [4, 3]
    with pytest.raises(ValueError, match="max_length=4 leaves no room: .* takes 5 tokens"):
        template.encode(tokenizer, ["bad"], ["yes"], max_length=4)


def test_template_errors(tokenizer):
    with pytest.raises(ValueError, match=r"exactly one \[MASK\], found 0"):
        Template("{text} it was good .")
    with pytest.raises(ValueError, match=r"exactly one \[MASK\], found 2"):
        Template("{text} [MASK] it was [MASK] .")
    with pytest.raises(ValueError, match=r"must contain \{text\} exactly once, found it 0 times"):
        Template("it was [MASK] .")
    with pytest.raises(ValueError, match=r"\{text_b\} at most once, found it 2 times"):
        Template("{text} {text_b} [MASK] {text_b}")
    with pytest.raises(ValueError, match=r"the pattern has \{text_b\}: pass texts_b"):
        Template("{text} [MASK] {text_b}").encode(tokenizer, ["bad"])
    with pytest.raises(ValueError, match=r"the pattern has no \{text_b\}: leave texts_b None"):
        Template("{text} [MASK]").encode(tokenizer, ["bad"], ["yes"])
    with pytest.raises(ValueError, match="texts has 2 entries, texts_b has 1"):
        Template("{text} [MASK] {text_b}").encode(tokenizer, ["bad", "good"], ["yes"])


def test_verbalizer_weights_and_errors(tokenizer):
    verbalizer = Verbalizer({"pos": ["great"], "neg": ["bad", "awful"]}, tokenizer)
    assert verbalizer.labels == ["pos", "neg"]
    assert verbalizer.token_ids.tolist() == ids("great", "bad", "aw", "##ful")
    torch.testing.assert_close(verbalizer.weights, torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 0.25, 0.25]]))
    with pytest.raises(ValueError, match=r"the label word 'superb' of class 'pos' is not in the tokenizer's vocabulary "
                                         r"\(it tokenizes to \['\[UNK\]'\]\)"):
        Verbalizer({"pos": ["great", "superb"], "neg": ["bad"]}, tokenizer)
    with pytest.raises(ValueError, match="the words of class 'neg' must be a non-empty list of strings, got 'bad'"):
        Verbalizer({"pos": ["great"], "neg": "bad"}, tokenizer)
    with pytest.raises(ValueError, match="class 'neg' has the label word ''"):
        Verbalizer({"pos": ["great"], "neg": [""]}, tokenizer)


def test_pvp_class_logits_equal_the_computation_by_hand(pvp):
    model = models.build("bert")
    batch = pvp.encode(["the movie was great", "bad acting", "the plot"])
    with torch.no_grad():
        got = pvp.logits(model, batch)
        full = model(**batch.model_inputs()).logits
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, by_hand(full, batch.mask_positions, HAND_WORDS), rtol=1e-6, atol=1e-6)


def test_virtual_tokens_before_the_sequence_move_the_mask(pvp):
    # A prompt-tuned model returns logits for its P virtual tokens first (PEFT's layout).
    model = models.build("bert")
    batch = pvp.encode(["the movie was great", "bad acting"])

    def with_two_virtual_tokens(**inputs):
        logits = model(**inputs).logits
        return SimpleNamespace(logits=torch.cat([torch.full_like(logits[:, :2], 1e3), logits], dim=1))

    with torch.no_grad():
        got = pvp.logits(with_two_virtual_tokens, batch)
        full = model(**batch.model_inputs()).logits
    torch.testing.assert_close(got, by_hand(full, batch.mask_positions, HAND_WORDS), rtol=1e-6, atol=1e-6)


def test_ensemble_mean_and_weighted(tokenizer, pvp):
    other = PVP(Template("{text} ? [MASK]"), Verbalizer({"pos": ["yes"], "neg": ["no", "bad"]}, tokenizer))
    model = models.build("bert")
    texts = ["the movie was great", "bad"]
    with torch.no_grad():
        first = pvp.logits(model, pvp.encode(texts))
        second = other.logits(model, other.encode(texts))
        mean = ensemble([pvp, other])
        weighted = ensemble([pvp, other], weights=[3, 1])
        torch.testing.assert_close(mean.logits(model, mean.encode(texts)), (first + second) / 2, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(weighted.logits(model, weighted.encode(texts)), 0.75 * first + 0.25 * second,
                                   rtol=1e-6, atol=1e-6)
        # One model per PVP, as PET trains one per pattern.
        other_model = models.build("bert", seed=1)
        second_own = other.logits(other_model, other.encode(texts))
        torch.testing.assert_close(mean.logits([model, other_model], mean.encode(texts)), (first + second_own) / 2,
                                   rtol=1e-6, atol=1e-6)
    swapped = PVP(Template("{text} [MASK]"), Verbalizer({"neg": ["bad"], "pos": ["good"]}, tokenizer))
    with pytest.raises(ValueError, match=r"every PVP must have the labels \['pos', 'neg'\] in this order"):
        ensemble([pvp, swapped])
    for weights in ([1.0], [1.0, -1.0], [0, 0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="weights must be None or 2 finite non-negative numbers"):
            ensemble([pvp, other], weights=weights)
    with pytest.raises(ValueError, match="expected 2 batches and 1 or 2 models"):
        mean.logits(model, mean.encode(texts)[:1])


def test_prefix_plus_pvp_is_p_tuning_v2(pvp):
    model = models.build("bert")
    batch = pvp.encode(["the movie was great", "bad acting"])
    with torch.no_grad():
        plain = pvp.logits(model, batch)
    deltakern.add_prefix(model, 3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    got = pvp.logits(model, batch)
    with torch.no_grad():
        full = model(**batch.model_inputs()).logits
    torch.testing.assert_close(got.detach(), by_hand(full, batch.mask_positions, HAND_WORDS), rtol=1e-6, atol=1e-6)
    assert (got.detach() - plain).abs().max() > 1e-2  # the prefix changes the class logits
    torch.nn.functional.cross_entropy(got, torch.tensor([0, 1])).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(grad is not None and grad.abs().sum() > 0 for grad in grads)
