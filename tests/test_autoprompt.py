"""AutoPrompt: trigger templates, the trigger search (planted optimum on a hand-built MLM, gradient
candidates and losses by hand on a tiny BERT, monotone history, determinism) and the label-word search
(planted words on top, scores by hand), with their errors."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from deltakern.autoprompt import (TriggerTemplate, label_word_log_likelihood, mask_features, search_label_words,
                                  search_triggers)
from deltakern.prompts import PVP, Template, Verbalizer
from tests.word_tokenizer import word_tokenizer

from .patch import models

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "was", "it", "great", "good", "bad",
         "terrible", "aw", "##ful", "fine", ".", "?", ",", "yes", "no", "plot", "acting", "is", "superb", "boring",
         "so", "really", "film"]
TEXTS = ["the movie was fine", "the acting is fine", "fine film", "the plot was boring", "boring acting",
         "it was boring movie"]
LABELS = ["pos", "pos", "pos", "neg", "neg", "neg"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tokenizer(tmp_path):
    return word_tokenizer(tmp_path, WORDS)


def ids(*words):
    return [WORDS.index(w) for w in words]


def test_trigger_template_encode(tokenizer):
    template = TriggerTemplate("{text} [T] [T] [MASK] .")
    batch = template.encode(tokenizer, ["the movie was great", "bad"], trigger_ids=ids("so", "really"))
    first = ids("[CLS]", "the", "movie", "was", "great", "so", "really", "[MASK]", ".", "[SEP]")
    second = ids("[CLS]", "bad", "so", "really", "[MASK]", ".", "[SEP]") + ids("[PAD]") * 3
    assert batch.input_ids.tolist() == [first, second]
    assert batch.attention_mask.tolist() == [[1] * 10, [1] * 7 + [0] * 3]
    assert batch.mask_positions.tolist() == [7, 4]
    assert batch.trigger_positions.tolist() == [[5, 6], [2, 3]]
    # Without trigger ids the slots hold the mask token (AutoPrompt's start).
    start = template.encode(tokenizer, ["bad"])
    assert start.input_ids[0].tolist() == ids("[CLS]", "bad", "[MASK]", "[MASK]", "[MASK]", ".", "[SEP]")
    assert start.mask_positions.tolist() == [4]
    # Truncation cuts the text, never a trigger; left padding moves every position.
    tokenizer.padding_side = "left"
    cut = TriggerTemplate("{text} [T] [MASK] . {text_b}", trigger_ids=ids("so")).encode(
        tokenizer, ["the movie was great", "bad"], ["the plot is fine", "yes"], max_length=8)
    # 5 fixed tokens leave 3 for the texts: (4, 4) -> (3, 4) -> (3, 3) -> (2, 3) -> (2, 2) -> (1, 2).
    assert cut.input_ids.tolist() == [ids("[CLS]", "the", "so", "[MASK]", ".", "the", "plot", "[SEP]"),
                                      ids("[PAD]", "[CLS]", "bad", "so", "[MASK]", ".", "yes", "[SEP]")]
    assert cut.trigger_positions.tolist() == [[2], [3]]
    assert cut.mask_positions.tolist() == [3, 4]


def test_trigger_template_in_a_pvp_equals_the_plain_template(tokenizer):
    verbalizer = Verbalizer({"pos": ["great"], "neg": ["bad"]}, tokenizer)
    model = models.build("bert")
    texts = ["the movie was fine", "boring acting"]
    found = PVP(TriggerTemplate("{text} [T] [T] [MASK] .", trigger_ids=ids("so", "really")), verbalizer)
    written = PVP(Template("{text} so really [MASK] ."), verbalizer)
    with torch.no_grad():
        torch.testing.assert_close(found.logits(model, found.encode(texts)),
                                   written.logits(model, written.encode(texts)), rtol=0, atol=0)


def test_template_and_search_errors(tokenizer):
    with pytest.raises(ValueError, match=r"at least one \[T\] trigger slot, found none in '\{text\} it was \[MASK\]'"):
        TriggerTemplate("{text} it was [MASK]")
    with pytest.raises(ValueError, match=r"exactly one \[MASK\], found 0"):
        TriggerTemplate("{text} [T] [T] good")
    with pytest.raises(ValueError, match=r"trigger_ids must be 2 non-negative token ids \(one per \[T\]"):
        TriggerTemplate("{text} [T] [T] [MASK]", trigger_ids=[5])
    template = TriggerTemplate("{text} [T] [MASK]")
    with pytest.raises(ValueError, match="trigger id 500 is outside the tokenizer's 29 tokens"):
        template.encode(tokenizer, ["bad"], trigger_ids=[500])
    with pytest.raises(ValueError, match=r"row 0 has 2 pad tokens .* a text contains the pad token '\[PAD\]'"):
        template.encode(tokenizer, ["bad [PAD]"])
    verbalizer = Verbalizer({"pos": ["great"], "neg": ["bad"]}, tokenizer)
    model = models.build("bert")
    with pytest.raises(ValueError, match="template must be a TriggerTemplate"):
        search_triggers(model, Template("{text} [MASK]"), verbalizer, TEXTS, LABELS)
    with pytest.raises(ValueError, match=r"label 'meh' is not one of the classes \['pos', 'neg'\]"):
        search_triggers(model, template, verbalizer, TEXTS, LABELS[:-1] + ["meh"])
    with pytest.raises(ValueError, match="labels must be a list of 6 labels"):
        search_triggers(model, template, verbalizer, TEXTS, LABELS[:-1])
    with pytest.raises(ValueError, match="num_candidates must be a positive int, got 0"):
        search_triggers(model, template, verbalizer, TEXTS, LABELS, num_candidates=0)
    with pytest.raises(ValueError, match=r"unknown slot_order 'left'; expected one of \('random', 'cyclic'\)"):
        search_triggers(model, template, verbalizer, TEXTS, LABELS, slot_order="left")
    with pytest.raises(ValueError, match=r"the pattern has no \{text_b\}: leave texts_b None"):
        search_triggers(model, template, verbalizer, TEXTS, LABELS, texts_b=TEXTS)
    with pytest.raises(ValueError, match="texts has 6 entries, texts_b has 5"):
        search_triggers(model, TriggerTemplate("{text} [T] [MASK] {text_b}"), verbalizer, TEXTS, LABELS,
                        texts_b=TEXTS[:5])
    with pytest.raises(ValueError, match="the words of class 'neg' must be a non-empty list of strings"):
        Verbalizer({"pos": ["great"], "neg": []}, tokenizer)  # a label with no words, before any search
    with pytest.raises(ValueError, match=r"labels must name at least 2 classes, got \['pos'\]"):
        search_label_words(model, template, tokenizer, TEXTS[:2], LABELS[:2])
    with pytest.raises(ValueError, match="no output embedding layer"):
        mask_features(BagOfWordsMLM(torch.zeros(29, 2), torch.zeros(29, 2)), template, tokenizer, TEXTS)


def test_label_word_log_likelihood_by_hand(tokenizer):
    # "awful" is two tokens: its log-probability is the mean of theirs; a class's words are marginalised.
    verbalizer = Verbalizer({"pos": ["great", "good"], "neg": ["awful"]}, tokenizer)
    logits = torch.randn(3, len(WORDS), generator=torch.Generator().manual_seed(0))
    got = label_word_log_likelihood(logits, verbalizer, torch.tensor([0, 1, 0]))
    p = logits.log_softmax(-1)
    great, good, aw, ful = ids("great", "good", "aw", "##ful")
    expected = torch.stack([torch.log(p[0, great].exp() + p[0, good].exp()), (p[1, aw] + p[1, ful]) / 2,
                            torch.log(p[2, great].exp() + p[2, good].exp())])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


class BagOfWordsMLM(nn.Module):
    """A hand-built masked LM: every position's logits are ``(Σ_tokens E_in[x]) E_outᵀ``, so the mask's
    prediction is a linear function of the summed input embeddings (one forward, no attention)."""

    def __init__(self, input_embeddings: torch.Tensor, output_embeddings: torch.Tensor):
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(input_embeddings, freeze=False)
        self.out = nn.Parameter(output_embeddings.clone())

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask):
        summed = (self.embed(input_ids) * attention_mask.unsqueeze(-1)).sum(dim=1, keepdim=True)
        return SimpleNamespace(logits=(summed @ self.out.t()).expand(-1, input_ids.shape[1], -1))


def planted_model():
    """Label words "great" (pos) and "bad" (neg) own the output directions u0 and u1; "fine" pushes
    towards pos, "boring" towards neg, and the planted trigger "so" towards both label words at once:
    it is the one token that lowers the loss of every example."""
    g = torch.Generator().manual_seed(0)
    hidden = 8
    e_in = 0.3 * torch.randn(len(WORDS), hidden, generator=g)
    e_out = 0.3 * torch.randn(len(WORDS), hidden, generator=g)
    e_in[:, :2] = 0
    e_out[:, :2] = 0
    u0, u1 = torch.eye(hidden)[0], torch.eye(hidden)[1]
    e_out[WORDS.index("great")], e_out[WORDS.index("bad")] = 4 * u0, 4 * u1
    e_in[WORDS.index("fine")], e_in[WORDS.index("boring")] = u0 - u1, u1 - u0
    e_in[WORDS.index("so")] = 2 * (u0 + u1)
    return BagOfWordsMLM(e_in, e_out)


def bag_of_words_loss(model, token_lists, classes):
    """-mean log p(label word | x) of the bag-of-words model, by hand."""
    label_ids = ids("great", "bad")
    losses = [-(model.out @ model.embed.weight[tokens].sum(0)).log_softmax(-1)[label_ids[c]]
              for tokens, c in zip(token_lists, classes)]
    return float(torch.stack(losses).mean())


def planted_rows(tokenizer, triggers):
    """The token rows the template "{text} [T].. [MASK] ." builds, by hand."""
    heads = [tokenizer(text)["input_ids"][:-1] for text in TEXTS]  # [CLS] text
    return [head + list(triggers) + ids("[MASK]", ".", "[SEP]") for head in heads]


CLASSES = [0, 0, 0, 1, 1, 1]


def test_search_finds_the_planted_trigger(tokenizer):
    model = planted_model()
    verbalizer = Verbalizer({"pos": ["great"], "neg": ["bad"]}, tokenizer)
    allowed = [t for t in range(len(WORDS)) if t not in tokenizer.all_special_ids and t not in ids("great", "bad")]
    with torch.no_grad():
        # "so" is the optimum: the best of every allowed token in the slot, by exhaustive search.
        one_slot = {t: bag_of_words_loss(model, planted_rows(tokenizer, [t]), CLASSES) for t in allowed}
        # Two slots add up (a bag of words): the best pair, exhaustively, is "so so".
        base = torch.stack([model.embed.weight[row].sum(0) for row in planted_rows(tokenizer, [])])  # [6, H]
        e = model.embed.weight[allowed]  # [A, H]
        pair = (base[:, None, None] + e[None, :, None] + e[None, None, :]) @ model.out.t()  # [6, A, A, V]
        gold = torch.tensor(ids("great", "bad"))[torch.tensor(CLASSES)]
        pair_loss = -pair.log_softmax(-1)[torch.arange(6), ..., gold].mean(0)  # [A, A]
    assert min(one_slot, key=one_slot.get) == WORDS.index("so")
    best_pair = divmod(int(pair_loss.argmin()), len(allowed))
    assert [allowed[i] for i in best_pair] == ids("so", "so")

    result = search_triggers(model, TriggerTemplate("{text} [T] [MASK] ."), verbalizer, TEXTS, LABELS,
                             num_steps=3, num_candidates=3)
    first = result.steps[0]
    assert first.candidates[0] == WORDS.index("so")  # the gradient ranks the planted token first
    assert first.accepted and result.trigger_ids == ids("so") and result.triggers == ["so"]
    assert not result.steps[1].accepted and not result.steps[2].accepted  # nothing beats it afterwards
    assert result.template.trigger_ids == ids("so")
    # The losses are the objective computed by hand on the rows the template builds.
    with torch.no_grad():
        before = bag_of_words_loss(model, planted_rows(tokenizer, ids("[MASK]")), CLASSES)
    assert first.loss_before == pytest.approx(before, rel=1e-5)
    assert first.loss_after == pytest.approx(one_slot[WORDS.index("so")], rel=1e-5)
    assert all(loss == pytest.approx(one_slot[t], rel=1e-5) for t, loss in zip(first.candidates, first.candidate_losses))
    assert result.loss_history == pytest.approx([before] + [one_slot[WORDS.index("so")]] * 3, rel=1e-5)
    assert result.loss_history[-1] < before / 100
    print(f"\nplanted trigger: loss {before:.4f} -> {result.loss_history[-1]:.6f}, found {result.triggers}")

    # Two slots, random and cyclic slot order: both reach the optimal pair; every accepted step
    # lowers the objective (recomputed by hand for the step's triggers), a rejected one keeps it.
    for slot_order, seed in (("random", 1), ("cyclic", 0)):
        two = search_triggers(model, TriggerTemplate("{text} [T] [T] [MASK] ."), verbalizer, TEXTS, LABELS,
                              num_steps=4, num_candidates=3, seed=seed, slot_order=slot_order)
        assert two.trigger_ids == ids("so", "so")
        assert two.loss_history[-1] == pytest.approx(float(pair_loss.min()), rel=1e-5)
        for step in two.steps:
            with torch.no_grad():
                by_hand = bag_of_words_loss(model, planted_rows(tokenizer, step.trigger_ids), CLASSES)
            assert step.loss_after == pytest.approx(by_hand, rel=1e-5)
            assert (step.loss_after < step.loss_before) if step.accepted else (step.loss_after == step.loss_before)
        assert sum(step.accepted for step in two.steps) == 2
    assert [step.slot for step in two.steps] == [0, 1, 0, 1]


def test_search_on_a_tiny_bert_by_hand(tokenizer):
    # Wider random weights than BERT's 0.02: the candidates' losses differ well above float noise.
    model = models.build("bert", initializer_range=0.2)
    model.train()
    verbalizer = Verbalizer({"pos": ["great", "good"], "neg": ["bad", "awful"]}, tokenizer)
    template = TriggerTemplate("{text} [T] [T] [T] [MASK] .")
    kwargs = dict(num_steps=5, num_candidates=4, seed=3)
    result = search_triggers(model, template, verbalizer, TEXTS, LABELS, **kwargs)
    assert model.training  # the mode is restored
    assert all(p.grad is None for p in model.parameters())  # the search leaves no gradient behind

    # Step 0 by hand: the gradient w.r.t. the slot's input embedding, -g·E, top-k over allowed tokens.
    model.eval()
    first = result.steps[0]
    batch = template.encode(tokenizer, TEXTS)
    classes = torch.tensor([0, 0, 0, 1, 1, 1])
    embeds = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
    rows = torch.arange(len(TEXTS))
    loss = -label_word_log_likelihood(logits[rows, batch.mask_positions], verbalizer, classes).mean()
    loss.backward()
    grad = embeds.grad[rows, batch.trigger_positions[:, first.slot]].sum(0)
    estimate = -(model.get_input_embeddings().weight[:len(WORDS)] @ grad)
    banned = set(tokenizer.all_special_ids) | set(ids("great", "good", "bad", "aw", "##ful"))
    ranked = [t for t in torch.argsort(estimate, descending=True).tolist() if t not in banned]
    assert first.candidates == ranked[:4]
    assert first.loss_before == pytest.approx(loss.item(), rel=1e-5)
    with torch.no_grad():
        for token, candidate_loss in zip(first.candidates, first.candidate_losses):
            trial = batch.input_ids.clone()
            trial[rows, batch.trigger_positions[:, first.slot]] = token
            trial_logits = model(input_ids=trial, attention_mask=batch.attention_mask).logits
            by_hand = -label_word_log_likelihood(trial_logits[rows, batch.mask_positions], verbalizer, classes).mean()
            assert candidate_loss == pytest.approx(float(by_hand), rel=1e-5)

    # Greedy acceptance, monotone history, consecutive steps chained, deterministic.
    for before, after in zip(result.steps, result.steps[1:]):
        assert after.loss_before == pytest.approx(before.loss_after, rel=1e-5)
    for step in result.steps:
        assert step.accepted == (min(step.candidate_losses) < step.loss_before)
        assert step.loss_after == (min(step.candidate_losses) if step.accepted else step.loss_before)
        assert not set(step.candidates) & banned
    history = result.loss_history
    assert all(b <= a for a, b in zip(history, history[1:]))
    assert all(step.loss_after < step.loss_before - 1e-3 for step in result.steps if step.accepted)
    assert [step.accepted for step in result.steps] == [True, True, False, True, False]
    assert any(step.accepted for step in result.steps) and history[-1] < history[0]
    again = search_triggers(model, template, verbalizer, TEXTS, LABELS, **kwargs)
    assert again.trigger_ids == result.trigger_ids and again.loss_history == history
    print(f"\ntiny BERT: triggers {result.triggers}, loss history {[round(x, 6) for x in history]}")

    # Mini-batches: each step draws batch_size rows, seeded.
    small = search_triggers(model, template, verbalizer, TEXTS, LABELS, num_steps=2, num_candidates=2,
                            batch_size=4, seed=3)
    assert [len(step.batch) for step in small.steps] == [4, 4]
    assert [step.batch for step in small.steps] == \
        [step.batch for step in search_triggers(model, template, verbalizer, TEXTS, LABELS, num_steps=2,
                                                num_candidates=2, batch_size=4, seed=3).steps]


def test_label_word_search_puts_the_planted_words_on_top(tokenizer):
    model = models.build("bert")
    template = Template("{text} it was [MASK] .")
    features = mask_features(model, template, tokenizer, TEXTS)
    assert features.shape == (6, 32)
    # Plant: the output embedding of "superb" along the pos-minus-neg direction of the mask features,
    # "terrible" against it, both longer than any other row. Neither word is in the texts, so the
    # features (tied input embeddings) do not move.
    direction = features[:3].mean(0) - features[3:].mean(0)
    out = model.get_output_embeddings().weight
    with torch.no_grad():
        length = 3 * out[:len(WORDS)].norm(dim=1).max()
        out[WORDS.index("superb")] = length * direction / direction.norm()
        out[WORDS.index("terrible")] = -length * direction / direction.norm()
    torch.testing.assert_close(mask_features(model, template, tokenizer, TEXTS), features, rtol=0, atol=0)

    result = search_label_words(model, template, tokenizer, TEXTS, LABELS, num_words=3, num_steps=100)
    assert list(result.label_words) == ["pos", "neg"]
    assert result.label_words["pos"][0] == "superb" and result.label_words["neg"][0] == "terrible"
    assert result.train_accuracy == 1.0
    for words in result.label_words.values():
        assert len(words) == 3
        assert all(word in WORDS and not word.startswith("##") and not word.startswith("[") for word in words)
    # Scores by hand: softmax over classes of W_out[w]·θ + β.
    expected = torch.softmax(out[:len(WORDS)].detach() @ result.weight.t() + result.bias, dim=1)
    torch.testing.assert_close(result.scores, expected, rtol=1e-6, atol=1e-6)
    pos_order = [tokenizer.decode([t]) for t in torch.argsort(expected[:, 0], descending=True).tolist()]
    whole = [w for w in pos_order if w in WORDS and not w.startswith(("##", "["))]
    assert result.label_words["pos"] == whole[:3]
    verbalizer = Verbalizer(result.label_words, tokenizer)  # usable as a PET verbalizer as it is
    assert verbalizer.labels == ["pos", "neg"]
    print(f"\nlabel search: {result.label_words}, p(pos|superb) = {float(result.scores[WORDS.index('superb'), 0]):.3f}")
