"""KPT (knowledgeable verbalizer) and ProtoVerb (prototypical verbalizer): scores and losses by hand on a
tiny BERT and on small tensors, calibration, refinement, learned weights, training on a planted task,
the ensemble with a manual verbalizer, errors."""

from types import SimpleNamespace

import pytest
import torch

import deltakern
from deltakern.prompts import PVP, Template, Verbalizer, ensemble
from deltakern.verbalizers import KnowledgeableVerbalizer, PrototypicalVerbalizer, instance_loss, prototype_loss
from tests.word_tokenizer import word_tokenizer

from .patch import models

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "was", "it", "great", "good", "bad",
         "terrible", "aw", "##ful", "##ly", "fine", ".", "?", ",", "yes", "no", "plot", "acting", "is",
         "nice", "poor", "fan", "##tastic", "a", "story", "film", "and"]
# "fantastic" is two tokens (fan ##tastic), "awful" two, "awfully" three.
LABEL_WORDS = {"pos": ["great", "good", "fantastic", "nice"], "neg": ["bad", "awful", "terrible", "poor", "awfully"]}
TEMPLATE = Template("{text} it was [MASK] .")
UNLABELED = ["the movie", "the plot is fine", "a story", "it is a film", "acting and plot"]


@pytest.fixture
def tokenizer(tmp_path):
    return word_tokenizer(tmp_path, WORDS)


def ids(*words):
    return [WORDS.index(w) for w in words]


WORD_TOKENS = {"great": ids("great"), "good": ids("good"), "fantastic": ids("fan", "##tastic"), "nice": ids("nice"),
               "bad": ids("bad"), "awful": ids("aw", "##ful"), "terrible": ids("terrible"), "poor": ids("poor"),
               "awfully": ids("aw", "##ful", "##ly")}


def word_log_prob(mask_logits, word):
    """[B] log p(word|x): mean over the word's tokens of the log-softmax, in fp64."""
    log_probs = torch.log_softmax(mask_logits.double(), dim=-1)
    return sum(log_probs[:, t] for t in WORD_TOKENS[word]) / len(WORD_TOKENS[word])


def kpt_by_hand(mask_logits, label_words, log_prior=None):
    """[B, C]: mean over each class's words of log p(w|x) (minus log prior(w) when given)."""
    columns = []
    for words in label_words.values():
        scores = [word_log_prob(mask_logits, w) - (0 if log_prior is None else log_prior[w]) for w in words]
        columns.append(sum(scores) / len(scores))
    return torch.stack(columns, dim=1)


def mask_logits_of(model, tokenizer, texts):
    batch = TEMPLATE.encode(tokenizer, texts)
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
    return logits[torch.arange(len(texts)), batch.mask_positions]


def prior_by_hand(model, tokenizer, texts):
    """{word: log prior}: each text run on its own (no padding), p(w|x) averaged over the texts."""
    logits = torch.cat([mask_logits_of(model, tokenizer, [text]) for text in texts])
    return {w: word_log_prob(logits, w).exp().mean().log() for w in WORD_TOKENS}


def test_kpt_class_logits_by_hand_without_calibration(tokenizer):
    kpt = KnowledgeableVerbalizer(LABEL_WORDS, tokenizer, calibration=False)
    assert kpt.labels == ["pos", "neg"] and kpt.num_classes == 2 and list(kpt.parameters()) == []
    mask_logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    got = kpt.class_logits(mask_logits)
    torch.testing.assert_close(got.double(), kpt_by_hand(mask_logits, LABEL_WORDS), rtol=1e-6, atol=1e-6)
    # PET's verbalizer averages raw logits: the two differ by the row's log-sum-exp, the same for every class.
    plain = Verbalizer(LABEL_WORDS, tokenizer).class_logits(mask_logits)
    torch.testing.assert_close(got - plain, -torch.logsumexp(mask_logits, -1, keepdim=True).expand(3, 2))
    # As a PET verbalizer on a tiny BERT: the mask row of the full logits, by hand.
    model, texts = models.build("bert"), ["the movie was great", "bad acting", "the plot"]
    pvp = PVP(TEMPLATE, kpt)
    with torch.no_grad():
        through_pvp = pvp.logits(model, pvp.encode(texts))
    torch.testing.assert_close(through_pvp.double(), kpt_by_hand(mask_logits_of(model, tokenizer, texts), LABEL_WORDS),
                               rtol=1e-5, atol=1e-5)


def test_kpt_calibration_divides_by_the_prior(tokenizer):
    model = models.build("bert")
    kpt = KnowledgeableVerbalizer(LABEL_WORDS, tokenizer)
    raw = KnowledgeableVerbalizer(LABEL_WORDS, tokenizer, calibration=False)
    prior = kpt.calibrate(model, TEMPLATE, UNLABELED, batch_size=2)  # 3 padded batches
    log_prior = prior_by_hand(model, tokenizer, UNLABELED)
    torch.testing.assert_close(kpt.log_prior.double(), torch.stack([log_prior[w] for _, w in kpt.words_flat]),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prior, kpt.log_prior.exp())
    assert kpt.support_log_probs.shape == (5, 9)
    mask_logits = mask_logits_of(model, tokenizer, ["the movie was great", "bad acting"])
    calibrated = kpt.class_logits(mask_logits)
    torch.testing.assert_close(calibrated.double(), kpt_by_hand(mask_logits, LABEL_WORDS, log_prior),
                               rtol=1e-5, atol=1e-5)
    # In log space, dividing p(w|x) by prior(w) subtracts the class's mean log prior from every row.
    mean_log_prior = torch.stack([sum(log_prior[w] for w in words) / len(words) for words in LABEL_WORDS.values()])
    torch.testing.assert_close((calibrated - raw.class_logits(mask_logits)).double(),
                               -mean_log_prior.expand(2, 2), rtol=1e-5, atol=1e-5)
    print(f"\nKPT prior on {len(UNLABELED)} texts: "
          + ", ".join(f"{w}={p:.4f}" for (_, w), p in zip(kpt.words_flat, prior.tolist())))


def test_kpt_frequency_refinement_drops_exactly_the_low_prior_words(tokenizer):
    model = models.build("bert")
    kpt = KnowledgeableVerbalizer(LABEL_WORDS, tokenizer)
    prior = dict(zip((w for _, w in kpt.words_flat), kpt.calibrate(model, TEMPLATE, UNLABELED).tolist()))
    threshold = sorted(prior.values())[4]  # the median of the 9 priors
    expected_dropped = {label: [w for w in words if prior[w] < threshold] for label, words in LABEL_WORDS.items()}
    assert all(0 < len(d) < len(LABEL_WORDS[label]) for label, d in expected_dropped.items())  # a real cut
    assert kpt.refine(prior_threshold=threshold) == expected_dropped
    kept = {label: [w for w in words if prior[w] >= threshold] for label, words in LABEL_WORDS.items()}
    assert kpt.kept_words == kept
    mask_logits = mask_logits_of(model, tokenizer, ["the movie was great", "bad acting"])
    by_hand = kpt_by_hand(mask_logits, kept, {w: torch.tensor(p).log() for w, p in prior.items()})
    torch.testing.assert_close(kpt.class_logits(mask_logits).double(), by_hand, rtol=1e-5, atol=1e-5)
    # A threshold above every prior would empty both classes: each keeps its highest-prior word.
    kpt.refine(prior_threshold=1.0)
    assert kpt.kept_words == {label: [max(words, key=prior.get)] for label, words in kept.items()}


def planted_mlm(pattern_by_word):
    """A stand-in masked LM whose logits, at every position, depend on the first text token only:
    token "the" dominates the softmax (logit 12) and each label word's tokens get
    ``pattern_by_word[word][i]`` for the i-th text of UNLABELED_SINGLE."""
    table = torch.zeros(len(WORDS), 96)
    for i, text in enumerate(UNLABELED_SINGLE):
        table[ids(text)[0], ids("the")[0]] = 12.0
        for word, pattern in pattern_by_word.items():
            table[ids(text)[0], WORD_TOKENS[word]] = pattern[i]

    def model(input_ids, attention_mask):
        rows = table[input_ids[:, 1]]  # [B, V]: position 1 holds the text's token
        return SimpleNamespace(logits=rows.unsqueeze(1).expand(-1, input_ids.shape[1], -1))
    return model


UNLABELED_SINGLE = ["movie", "plot", "acting", "story", "film", "it"]


def test_kpt_relevance_refinement_drops_words_that_follow_another_class(tokenizer):
    a = torch.tensor([2.0, -1.0, 1.5, -2.0, 0.5, -1.0])
    noise = torch.tensor([0.3, 0.2, -0.4, 0.1, -0.3, 0.1])
    # "terrible" is planted in "pos" and "poor" in "neg", each moving with the other class's anchor.
    label_words = {"pos": ["great", "good", "fantastic", "terrible"], "neg": ["bad", "awful", "poor"]}
    model = planted_mlm({"great": a, "good": 0.7 * a + noise, "fantastic": 0.9 * a, "terrible": -a,
                         "bad": -a, "awful": -0.8 * a + noise, "poor": a})
    kpt = KnowledgeableVerbalizer(label_words, tokenizer)
    kpt.calibrate(model, TEMPLATE, UNLABELED_SINGLE)
    assert kpt.refine(relevance=True) == {"pos": ["terrible"], "neg": ["poor"]}
    assert kpt.kept_words == {"pos": ["great", "good", "fantastic"], "neg": ["bad", "awful"]}
    # The rule by hand: r(w, y) = cos of the centred log p(w|x_i) with the anchor's; keep r_own > 0, r_own >= r_other.
    # The planted logits are the same at every position; take position 0.
    planted = model(**TEMPLATE.encode(tokenizer, UNLABELED_SINGLE).model_inputs()).logits[:, 0]
    vectors = {w: word_log_prob(planted, w)
               for w in WORD_TOKENS if w in sum(label_words.values(), [])}
    vectors = {w: v - v.mean() for w, v in vectors.items()}
    for label, words in label_words.items():
        other = "neg" if label == "pos" else "pos"
        for w in words:
            own = torch.cosine_similarity(vectors[w], vectors[label_words[label][0]], dim=0)
            against = torch.cosine_similarity(vectors[w], vectors[label_words[other][0]], dim=0)
            assert (w in kpt.kept_words[label]) == bool(own > 0 and own >= against), w


def test_kpt_weighted_aggregation(tokenizer):
    weighted = KnowledgeableVerbalizer(LABEL_WORDS, tokenizer, aggregation="weighted", calibration=False)
    mean = KnowledgeableVerbalizer(LABEL_WORDS, tokenizer, calibration=False)
    assert [name for name, _ in weighted.named_parameters()] == ["word_weights"]
    mask_logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(1))
    got = weighted.class_logits(mask_logits)
    torch.testing.assert_close(got, mean.class_logits(mask_logits))  # zero weights: uniform within a class
    torch.nn.functional.cross_entropy(got, torch.tensor([0, 1, 1, 0])).backward()
    grad = weighted.word_weights.grad
    assert grad is not None and (grad.abs() > 1e-6).all()
    # Non-uniform weights: softmax within each class, by hand.
    with torch.no_grad():
        weighted.word_weights.copy_(torch.randn(9, generator=torch.Generator().manual_seed(2)))
    weights = dict(zip((w for _, w in weighted.words_flat), weighted.word_weights.tolist()))
    columns = []
    for words in LABEL_WORDS.values():
        alpha = torch.softmax(torch.tensor([weights[w] for w in words], dtype=torch.float64), dim=0)
        columns.append(sum(a * word_log_prob(mask_logits, w) for a, w in zip(alpha, words)))
    torch.testing.assert_close(weighted.class_logits(mask_logits).double(), torch.stack(columns, 1),
                               rtol=1e-6, atol=1e-6)


def test_kpt_refined_weighted_words_get_no_gradient_and_plug_into_ensemble(tokenizer):
    model = models.build("bert")
    kpt = KnowledgeableVerbalizer(LABEL_WORDS, tokenizer, aggregation="weighted")
    kpt.calibrate(model, TEMPLATE, UNLABELED)
    dropped = kpt.refine(prior_threshold=float(kpt.prior.sort().values[4]))
    gone = torch.tensor([w in dropped[label] for label, w in kpt.words_flat])
    texts = ["the movie was great", "bad acting"]
    pvp_kpt = PVP(TEMPLATE, kpt)
    torch.nn.functional.cross_entropy(pvp_kpt.logits(model, pvp_kpt.encode(texts)), torch.tensor([0, 1])).backward()
    assert (kpt.word_weights.grad[gone] == 0).all() and (kpt.word_weights.grad[~gone].abs() > 0).all()
    with torch.no_grad():
        kpt.word_weights.sub_(kpt.word_weights.grad)  # one SGD step: non-uniform weights
    # state_dict carries the prior, the refinement and the weights.
    restored = KnowledgeableVerbalizer(LABEL_WORDS, tokenizer, aggregation="weighted")
    assert not restored.calibrated and restored.prior is None
    restored.load_state_dict(kpt.state_dict())
    assert restored.calibrated and restored.kept_words == kpt.kept_words
    mask_logits = mask_logits_of(model, tokenizer, texts)
    torch.testing.assert_close(restored.class_logits(mask_logits), kpt.class_logits(mask_logits), rtol=0, atol=0)
    with pytest.raises(ValueError, match="relevance refinement needs the calibration texts' log-probabilities"):
        restored.refine(relevance=True)
    manual = PVP(Template("{text} ? [MASK]"), Verbalizer({"pos": ["yes"], "neg": ["no"]}, tokenizer))
    both = ensemble([pvp_kpt, manual])
    with torch.no_grad():
        expected = (pvp_kpt.logits(model, pvp_kpt.encode(texts)) + manual.logits(model, manual.encode(texts))) / 2
        torch.testing.assert_close(both.logits(model, both.encode(texts)), expected)


def test_kpt_errors(tokenizer):
    with pytest.raises(ValueError, match="the words of class 'neg' must be a non-empty list of strings, got \\[\\]"):
        KnowledgeableVerbalizer({"pos": ["great"], "neg": []}, tokenizer)
    with pytest.raises(ValueError, match=r"the label word 'superb' of class 'pos' is not in the tokenizer's vocab"):
        KnowledgeableVerbalizer({"pos": ["great", "superb"], "neg": ["bad"]}, tokenizer)
    with pytest.raises(ValueError, match=r"aggregation must be one of \('mean', 'weighted'\), got 'max'"):
        KnowledgeableVerbalizer(LABEL_WORDS, tokenizer, aggregation="max")
    kpt = KnowledgeableVerbalizer(LABEL_WORDS, tokenizer)
    with pytest.raises(ValueError, match=r"class_logits: this verbalizer divides by the label words' prior; call "
                                         r"calibrate\(model, template, unlabeled_texts\) first"):
        kpt.class_logits(torch.randn(2, 40))
    with pytest.raises(ValueError, match=r"refine: refinement uses the prior on unlabeled texts; call calibrate"):
        kpt.refine(prior_threshold=0.01)
    model = models.build("bert")
    with pytest.raises(ValueError, match="template must be a deltakern.prompts.Template, got str"):
        kpt.calibrate(model, "{text} [MASK]", UNLABELED)
    with pytest.raises(ValueError, match="unlabeled_texts must be a string or a non-empty list of strings"):
        kpt.calibrate(model, TEMPLATE, [])
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        kpt.calibrate(model, TEMPLATE, UNLABELED, batch_size=0)
    kpt.calibrate(model, TEMPLATE, UNLABELED)
    with pytest.raises(ValueError, match=r"mask_logits must be \[B, vocab\], got \(2, 3, 40\)"):
        kpt.class_logits(torch.randn(2, 3, 40))
    with pytest.raises(ValueError, match="the label words use token id 28, but mask_logits has a vocabulary of 20"):
        kpt.class_logits(torch.randn(2, 20))
    with pytest.raises(ValueError, match="pass prior_threshold=<float> and/or relevance=True"):
        kpt.refine()
    with pytest.raises(ValueError, match="prior_threshold must be a finite non-negative number, got -0.1"):
        kpt.refine(prior_threshold=-0.1)


def test_protoverb_losses_by_hand():
    # Orthogonal instances on their prototypes, tau = 1: positives at cos 1, negatives at cos 0.
    e1, e2 = torch.eye(2, dtype=torch.float64)
    z, labels = torch.stack([e1, 2 * e1, e2, 3 * e2]), torch.tensor([0, 0, 1, 1])
    e = torch.tensor(1.0, dtype=torch.float64).exp()
    torch.testing.assert_close(instance_loss(z, labels, 1.0), torch.log(1 + 2 / e))  # 1 positive vs 2 negatives
    torch.testing.assert_close(prototype_loss(z, torch.stack([e1, e2]), labels, 1.0), torch.log(1 + 1 / e))
    # Random instances, three classes, tau = 0.5: loops over the definitions.
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64)
    prototypes = torch.randn(3, 4, generator=g, dtype=torch.float64)
    labels, tau = torch.tensor([0, 1, 0, 2, 1, 0]), 0.5

    def s(a, b):
        return torch.cosine_similarity(a, b, dim=0) / tau

    pairs = []
    for i in range(6):
        negatives = sum(s(z[i], z[k]).exp() for k in range(6) if labels[k] != labels[i])
        pairs += [-torch.log(s(z[i], z[j]).exp() / (s(z[i], z[j]).exp() + negatives))
                  for j in range(6) if j != i and labels[j] == labels[i]]
    assert len(pairs) == 8  # 3·2 ordered pairs in class 0, 2 in class 1, none in class 2
    torch.testing.assert_close(instance_loss(z, labels, tau), sum(pairs) / len(pairs))
    proto = [-torch.log(s(z[i], prototypes[labels[i]]).exp() / sum(s(z[i], p).exp() for p in prototypes))
             for i in range(6)]
    torch.testing.assert_close(prototype_loss(z, prototypes, labels, tau), sum(proto) / 6)
    verbalizer = PrototypicalVerbalizer(["a", "b", "c"], hidden_size=4, proto_dim=4, temperature=tau).double()
    with torch.no_grad():
        verbalizer.projection.weight.copy_(torch.eye(4))
        verbalizer.prototypes.copy_(prototypes)
    torch.testing.assert_close(verbalizer.loss(z, labels), sum(pairs) / len(pairs) + sum(proto) / 6)


CLASS_WORDS = ["great", "bad", "fine"]
FILLERS = ["the", "movie", "plot", "acting", "story", "film", "it", "is", "a", "and"]


def planted_texts(per_class, seed):
    """Texts of 3 random fillers with the class's word at a random place; labels [n]."""
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(per_class):
        for c, word in enumerate(CLASS_WORDS):
            words = [FILLERS[int(i)] for i in torch.randint(len(FILLERS), (3,), generator=g)]
            words.insert(int(torch.randint(4, (1,), generator=g)), word)
            texts.append(" ".join(words))
            labels.append(c)
    return texts, torch.tensor(labels)


def test_protoverb_learns_a_planted_task_with_lora(tokenizer):
    # The class is the word "great", "bad" or "fine" among random fillers. A random tiny BERT's mask
    # states barely differ between texts (all cosines near 1), so the projection alone cannot pull the
    # classes apart: as in the paper the encoder is tuned too, here through a LoRA delta.
    torch.manual_seed(0)
    model = models.build("bert")
    deltakern.add_lora(model, r=8, alpha=16)
    verbalizer = PrototypicalVerbalizer(["pos", "neg", "neutral"], hidden_size=32, proto_dim=16, temperature=0.1)
    train_texts, train_labels = planted_texts(6, seed=1)
    test_texts, test_labels = planted_texts(10, seed=2)
    assert not set(train_texts) & set(test_texts)
    train_batch = TEMPLATE.encode(tokenizer, train_texts)
    delta = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(list(verbalizer.parameters()) + delta, lr=1e-2)
    losses = []
    for _ in range(40):
        mask_hidden, _ = verbalizer.mask_outputs(model, train_batch)
        loss = verbalizer.loss(mask_hidden, train_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        predicted = verbalizer.predict(model, TEMPLATE.encode(tokenizer, test_texts))
    accuracy = (predicted == test_labels).float().mean().item()
    print(f"\nProtoVerb + LoRA planted task: loss {losses[0]:.3f} -> {losses[-1]:.4f} in 40 steps, held-out accuracy "
          f"{accuracy:.2f} on {len(test_texts)} texts (chance 0.33)")
    assert losses[-1] < 0.1 * losses[0]
    assert accuracy >= 0.8


def test_protoverb_prediction_mask_states_and_manual_ensemble(tokenizer):
    torch.manual_seed(0)
    model = models.build("bert")
    manual = Verbalizer({"pos": ["great", "good"], "neg": ["bad", "awful"]}, tokenizer)
    alone = PrototypicalVerbalizer(["pos", "neg"], hidden_size=32, proto_dim=8, temperature=0.2)
    combined = PrototypicalVerbalizer(["pos", "neg"], hidden_size=32, proto_dim=8, temperature=0.2, manual=manual)
    combined.load_state_dict(alone.state_dict())
    texts = ["the movie was great", "bad acting", "the plot", "it is fine"]
    batch = TEMPLATE.encode(tokenizer, texts)
    with torch.no_grad():
        output = model(**batch.model_inputs(), output_hidden_states=True)
        rows = torch.arange(4)
        hidden, logits = output.hidden_states[-1][rows, batch.mask_positions], output.logits[rows, batch.mask_positions]
        got_hidden, got_logits = alone.mask_outputs(model, batch)
        torch.testing.assert_close(got_hidden, hidden)
        torch.testing.assert_close(got_logits, logits)
        # Cosine to the prototypes of the projected state, by hand; the prediction is its argmax.
        z = hidden @ alone.projection.weight.t()
        cosine = torch.stack([torch.cosine_similarity(z, p.expand_as(z), dim=1) for p in alone.prototypes], dim=1)
        torch.testing.assert_close(alone.logits(model, batch), cosine / 0.2)
        assert alone.predict(model, batch).tolist() == cosine.argmax(1).tolist()
        # The ensemble: sum of the two class log-probabilities.
        expected = torch.log_softmax(cosine / 0.2, 1) + torch.log_softmax(manual.class_logits(logits), 1)
        torch.testing.assert_close(combined.logits(model, batch), expected)

        # Prompt tuning puts virtual tokens first: hidden states and logits move by their number.
        def with_two_virtual_tokens(**inputs):
            out = model(**inputs)
            return SimpleNamespace(logits=torch.cat([torch.full_like(out.logits[:, :2], 1e3), out.logits], 1),
                                   hidden_states=[torch.cat([torch.full_like(h[:, :2], 1e3), h], 1)
                                                  for h in out.hidden_states])
        shifted_hidden, shifted_logits = alone.mask_outputs(with_two_virtual_tokens, batch)
        torch.testing.assert_close(shifted_hidden, hidden)
        torch.testing.assert_close(shifted_logits, logits)


def test_protoverb_errors(tokenizer):
    manual = Verbalizer({"neg": ["bad"], "pos": ["good"]}, tokenizer)
    with pytest.raises(ValueError, match=r"the manual verbalizer's labels \['neg', 'pos'\] differ from labels "
                                         r"\['pos', 'neg'\]"):
        PrototypicalVerbalizer(["pos", "neg"], hidden_size=32, manual=manual)
    with pytest.raises(ValueError, match="labels must be a non-empty list of class names"):
        PrototypicalVerbalizer([], hidden_size=32)
    with pytest.raises(ValueError, match="temperature must be a positive number, got 0"):
        PrototypicalVerbalizer(["pos", "neg"], hidden_size=32, temperature=0)
    verbalizer = PrototypicalVerbalizer(["pos", "neg"], hidden_size=32, proto_dim=8)
    with pytest.raises(ValueError, match=r"mask_hidden must be \[B, hidden_size=32\], got \(3, 16\)"):
        verbalizer.class_logits(torch.randn(3, 16))
    with pytest.raises(ValueError, match=r"no two instances share a class \(labels \[0, 1\]\)"):
        verbalizer.loss(torch.randn(2, 32), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\), got \[0, 2, 0\]"):
        verbalizer.loss(torch.randn(3, 32), torch.tensor([0, 2, 0]))
    with pytest.raises(ValueError, match=r"labels must be a long tensor \[B=3\]"):
        verbalizer.loss(torch.randn(3, 32), torch.tensor([0, 1]))
    combined = PrototypicalVerbalizer(["neg", "pos"], hidden_size=32, manual=manual)
    with pytest.raises(ValueError, match="ensembles a manual verbalizer and needs mask_logits"):
        combined.class_logits(torch.randn(2, 32))
    batch = TEMPLATE.encode(tokenizer, ["bad"])
    with pytest.raises(ValueError, match="the model returned no hidden_states"):
        verbalizer.mask_outputs(lambda **inputs: SimpleNamespace(logits=torch.randn(1, 5, 40)), batch)
