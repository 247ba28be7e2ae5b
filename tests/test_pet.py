"""PET's pipeline and iPET on a tiny random BERT: the loss, the ensemble's soft labels and weights by
hand, distillation, a LoRA stand-in for fine-tuning, iPET's counts and labellers, errors."""

from types import SimpleNamespace

import pytest
import torch

import deltakern
from deltakern.ipet import _apportion, _draw, ipet
from deltakern.pet import distill, mask_tokens, pet_loss, pvp_weights, soft_labels, train_pvp_model
from deltakern.prompts import PVP, Template, Verbalizer

from .patch import models
from .test_prompts import HAND_WORDS, MASK_ID, PAD, WORDS, by_hand, ids, tokenizer  # noqa: F401 (fixture)

POSITIVE = ["the movie was great", "the acting is good", "great plot", "the movie is fine", "good acting",
            "the plot was great , the acting good"]
NEGATIVE = ["the movie was bad", "the acting is terrible", "awful plot", "the movie is awfully bad", "bad acting",
            "the plot was terrible , the acting bad"]
TEXTS = POSITIVE[:4] + NEGATIVE[:4]
LABELS = [0] * 4 + [1] * 4
UNLABELED = POSITIVE + NEGATIVE + ["the movie", "the plot is fine , yes", "no acting", "it is the plot ?",
                                   "the acting was fine", "the movie was good , the plot bad", "yes , great",
                                   "terrible , terrible movie"]


@pytest.fixture
def pvp(tokenizer):
    # "awful" is two tokens (aw ##ful), "awfully" three: HAND_WORDS of tests/test_prompts.py.
    return PVP(Template("{text} it was [MASK] ."),
               Verbalizer({"pos": ["great", "good"], "neg": ["bad", "awful", "awfully"]}, tokenizer))


@pytest.fixture
def other(tokenizer):
    return PVP(Template("{text} ? [MASK]"), Verbalizer({"pos": ["yes"], "neg": ["no"]}, tokenizer))


def test_mask_tokens_follows_bert_rule(tokenizer):
    g = torch.Generator().manual_seed(0)
    rows, length = 400, 60
    input_ids = torch.randint(5, len(WORDS), (rows, length), generator=g)
    input_ids[:, 0], input_ids[:, -1], input_ids[:, 7] = ids("[CLS]")[0], ids("[SEP]")[0], MASK_ID
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    attention_mask[::2, -12:] = 0
    input_ids[::2, -12:] = PAD
    before = input_ids.clone()
    masked, targets = mask_tokens(input_ids, attention_mask, tokenizer, torch.Generator().manual_seed(3))
    assert torch.equal(input_ids, before)  # the input is not modified
    selected = targets != -100
    candidates = (attention_mask == 1) & (input_ids > MASK_ID)  # ids 0..4 are the special tokens
    assert not (selected & ~candidates).any()  # never [CLS], [SEP], padding, or the pattern's [MASK]
    assert torch.equal(targets[selected], input_ids[selected])
    assert torch.equal(masked[~selected], input_ids[~selected])
    assert masked.max() < len(tokenizer)
    # Rates: 15% of candidates (about 21,000); of the selected (about 3,200), 80% [MASK], 10% random,
    # 10% kept. A random token equals the original or [MASK] with probability 1/25 each. Bounds ≈ 4 σ.
    rate = selected.sum() / candidates.sum()
    assert 0.14 < rate < 0.16
    n = selected.sum()
    to_mask = ((masked == MASK_ID) & selected).sum() / n
    kept = ((masked == input_ids) & selected).sum() / n
    assert 0.78 < to_mask < 0.83 and 0.08 < kept < 0.12 and 0.07 < 1 - to_mask - kept < 0.12
    again = mask_tokens(input_ids, attention_mask, tokenizer, torch.Generator().manual_seed(3))
    other_seed = mask_tokens(input_ids, attention_mask, tokenizer, torch.Generator().manual_seed(4))
    assert torch.equal(again[0], masked) and torch.equal(again[1], targets)
    assert not torch.equal(other_seed[1], targets)


def test_pet_loss_is_weighted_ce_plus_mlm_by_hand(tokenizer, pvp):
    model = models.build("bert")
    batch = pvp.encode(TEXTS[:3] + TEXTS[-2:])
    labels = [0, 0, 0, 1, 1]
    mlm_batch = pvp.encode(UNLABELED[:8])
    alpha = 0.3
    got = pet_loss(pvp, model, batch, labels, mlm_batch, alpha, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        class_logits = by_hand(model(**batch.model_inputs()).logits, batch.mask_positions, HAND_WORDS)
        log_q = class_logits - class_logits.logsumexp(-1, keepdim=True)
        ce = -sum(log_q[b, y] for b, y in enumerate(labels)) / len(labels)
        masked, targets = mask_tokens(mlm_batch.input_ids, mlm_batch.attention_mask, tokenizer,
                                      torch.Generator().manual_seed(7))
        rows, cols = (targets != -100).nonzero(as_tuple=True)
        assert len(rows) >= 5
        logits = model(input_ids=masked, attention_mask=mlm_batch.attention_mask).logits
        log_p = logits - logits.logsumexp(-1, keepdim=True)
        mlm = -sum(log_p[r, c, targets[r, c]] for r, c in zip(rows, cols)) / len(rows)
    torch.testing.assert_close(got.detach(), (1 - alpha) * ce + alpha * mlm, rtol=1e-6, atol=1e-6)
    assert abs(mlm - ce) > 1.0  # the two terms are far apart, so the weighting is pinned down
    # Without unlabelled text: cross-entropy alone.
    plain = pet_loss(pvp, model, batch, torch.tensor(labels))
    torch.testing.assert_close(plain.detach(), ce, rtol=1e-6, atol=1e-6)
    # Nothing to mask (every token special): the MLM term is 0.
    specials = {"input_ids": torch.tensor([[2, 4, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    torch.testing.assert_close(pet_loss(pvp, model, batch, labels, specials, alpha).detach(), (1 - alpha) * ce,
                               rtol=1e-6, atol=1e-6)
    got.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_soft_labels_average_the_weighted_logits_then_softmax(pvp, other):
    first, second = models.build("bert"), models.build("bert", seed=1)
    first.train()  # soft_labels must evaluate without dropout and put the mode back
    texts = UNLABELED[:5]
    got = soft_labels([pvp, other], [first, second], texts, [2.0, 0.5], temperature=2.0, batch_size=2)
    assert first.training and not second.training
    first.eval()
    with torch.no_grad():
        l1 = pvp.logits(first, pvp.encode(texts))
        l2 = other.logits(second, other.encode(texts))
    expected = torch.softmax((2.0 * l1 + 0.5 * l2) / 2.5 / 2.0, dim=-1)
    assert got.shape == (5, 2)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # Not the average of the probabilities (the other rule one could pick): the random models'
    # class logits differ by ~0.03, too little to tell the rules apart, so scale them by 30.
    scaled = [lambda **kw: SimpleNamespace(logits=30 * first(**kw).logits),
              lambda **kw: SimpleNamespace(logits=30 * second(**kw).logits)]
    got = soft_labels([pvp, other], scaled, texts, [2.0, 0.5], temperature=2.0)
    torch.testing.assert_close(got, torch.softmax(30 * (2.0 * l1 + 0.5 * l2) / 2.5 / 2.0, dim=-1), rtol=0, atol=1e-6)
    averaged_probs = (2.0 * torch.softmax(30 * l1 / 2, -1) + 0.5 * torch.softmax(30 * l2 / 2, -1)) / 2.5
    assert (got - averaged_probs).abs().max() > 1e-2
    # One PVP with temperature 1 is that PVP's own softmax.
    torch.testing.assert_close(soft_labels([pvp], [first], texts, [3.0], temperature=1.0),
                               torch.softmax(l1, -1), rtol=0, atol=1e-6)


def test_pvp_weights_are_accuracies_on_the_labelled_set(pvp, other):
    first, second = models.build("bert"), models.build("bert", seed=1)
    labels = [0, 1, 1, 0, 1, 0, 0, 1]
    weights = pvp_weights([pvp, other], [first, second], TEXTS, labels, batch_size=3)
    with torch.no_grad():
        p1 = pvp.logits(first, pvp.encode(TEXTS)).argmax(-1)
        p2 = other.logits(second, other.encode(TEXTS)).argmax(-1)
    truth = torch.tensor(labels)
    assert weights == [int((p1 == truth).sum()) / 8, int((p2 == truth).sum()) / 8]
    flipped = pvp_weights([pvp, other], [first, second], TEXTS, [1 - y for y in labels])
    assert flipped == [1 - weights[0], 1 - weights[1]]


def test_lora_stands_in_for_fine_tuning(pvp):
    # initializer_range 0.2 instead of BERT's 0.02: with the output embeddings frozen (tied to the
    # input ones) and this small, the class-logit margin could not grow past ~0.6.
    model = deltakern.add_lora(models.build("bert", initializer_range=0.2), r=4)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    # The pure-PyTorch LoRA op: conftest's Triton interpreter on CPU would take ~30 s here.
    with deltakern.use_backend("reference"):
        same, losses = train_pvp_model(pvp, model, TEXTS, LABELS, unlabeled_texts=UNLABELED, steps=12,
                                       batch_size=8, unlabeled_batch_size=4, lr=1e-2, weight_decay=0.0, seed=0)
    assert same is model and len(losses) == 12
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name  # bit for bit
        else:
            assert not torch.equal(p, trainable[name]), name
    assert losses[-1] < 0.2 * losses[0]
    with torch.no_grad():
        assert pvp.logits(model, pvp.encode(TEXTS)).argmax(-1).tolist() == LABELS
    # The same seed from the same start gives the same run.
    again = deltakern.add_lora(models.build("bert", initializer_range=0.2), r=4)
    with torch.no_grad():
        for name, p in again.named_parameters():
            if p.requires_grad:
                p.copy_(trainable[name])
    with deltakern.use_backend("reference"):
        assert train_pvp_model(pvp, again, TEXTS, LABELS, unlabeled_texts=UNLABELED, steps=3, batch_size=8,
                               unlabeled_batch_size=4, lr=1e-2, weight_decay=0.0, seed=0)[1] == losses[:3]


def test_distillation_matches_kl_by_hand_and_learns(tokenizer):
    model = models.build("bert", task="cls", initializer_range=0.2)  # 3 classes; 0.2: see the LoRA test
    texts = POSITIVE[:3] + NEGATIVE[:3] + ["the movie", "the plot", "it is the acting"]
    q = torch.tensor([[0.8, 0.15, 0.05]] * 3 + [[0.05, 0.15, 0.8]] * 3 + [[0.2, 0.6, 0.2]] * 3)
    with torch.no_grad():
        z = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
        log_p = torch.log_softmax(z / 2.0, -1)
        by_hand = 4.0 * (q * (q.log() - log_p)).sum(-1).mean()
    losses = distill(model, tokenizer, texts, q, temperature=2.0, steps=20, lr=1e-2, batch_size=9, weight_decay=0.0)
    assert len(losses) == 20
    assert losses[0] == pytest.approx(by_hand.item(), abs=1e-6)  # the first step's batch is every text
    assert losses[-1] < 0.1 * losses[0]


@pytest.mark.parametrize("pvp_count,share", [(2, 1.0), (3, 0.5)])
def test_ipet_labels_the_promised_examples(pvp, other, tokenizer, pvp_count, share):
    third = PVP(Template("[MASK] : {text}"), Verbalizer({"pos": ["good"], "neg": ["bad"]}, tokenizer))
    pvps = [pvp, other, third][:pvp_count]
    train_texts, train_labels = POSITIVE[:3] + NEGATIVE[:1], [0, 0, 0, 1]
    unlabeled = UNLABELED[:20]
    generations = 4 if pvp_count == 2 else 2
    result = ipet(pvps, lambda i: models.build("bert", seed=i), train_texts, train_labels, unlabeled,
                  generations=generations, scale_factor=2, share=share, steps=2, batch_size=4, lr=1e-3, seed=0)
    # (2^j - 1) · |T| with |T| = 4, capped at |U| = 20.
    assert [g.num_labeled for g in result] == [0, 4, 12, 20][:generations]
    assert [g.index for g in result] == list(range(generations))
    assert result[0].labeled_indices == [[]] * pvp_count and result[0].annotators == [[]] * pvp_count
    for previous, generation in zip(result, result[1:]):
        n = generation.num_labeled
        quotas = _apportion(n, [3, 1])  # T's label distribution 3:1
        assert quotas == {4: [3, 1], 12: [9, 3], 20: [15, 5]}[n]
        for i in range(pvp_count):
            chosen, classes = generation.labeled_indices[i], generation.labeled_classes[i]
            assert len(chosen) == n and chosen == sorted(set(chosen)) and all(0 <= u < 20 for u in chosen)
            annotators = generation.annotators[i]
            assert i not in annotators and len(annotators) == max(1, round(share * (pvp_count - 1)))
            # The classes are the argmax of the weighted ensemble of the other models, by hand.
            weights = [previous.weights[k] for k in annotators]
            weights = weights if sum(weights) > 0 else [1.0] * len(weights)
            with torch.no_grad():
                logits = [pvps[k].logits(previous.models[k], pvps[k].encode(unlabeled)) for k in annotators]
            mean = sum(w * l for w, l in zip(weights, logits)) / sum(weights)
            predicted = mean.argmax(-1)
            assert classes == predicted[chosen].tolist()
            # Per class: the quota when the ensemble predicts enough of it, the rest filled from others.
            available = torch.bincount(predicted, minlength=2).tolist()
            counts = torch.bincount(torch.tensor(classes, dtype=torch.long), minlength=2).tolist()
            floor = [min(qu, av) for qu, av in zip(quotas, available)]
            assert all(c >= f for c, f in zip(counts, floor))
            if sum(floor) == n:
                assert counts == quotas
            if n == 20:
                assert chosen == list(range(20))
        assert len(generation.models) == pvp_count and all(len(h) == 2 for h in generation.losses)
        assert all(w * 4 == int(w * 4) for w in generation.weights)  # accuracies on 4 examples


def test_pseudo_label_draw_is_class_proportional_and_fills_shortfalls():
    assert _apportion(5, [3, 1]) == [4, 1]  # 3.75 and 1.25: the larger remainder gets the extra one
    assert _apportion(4, [1, 1, 1]) == [2, 1, 1]  # ties: the lower class
    assert _apportion(7, [2, 0]) == [7, 0]  # a class absent from T gets none
    # 10 examples: rows 0-5 predicted class 0, rows 6-9 class 1, with varied confidence.
    g = torch.Generator().manual_seed(0)
    top = 0.55 + 0.4 * torch.rand(10, generator=g)
    probs = torch.stack([top, 1 - top], dim=1)
    probs[6:] = probs[6:].flip(1)
    for quotas in ([3, 1], [6, 2], [1, 4]):
        chosen, classes = _draw(probs, sum(quotas), quotas, torch.Generator().manual_seed(1))
        assert chosen == sorted(set(chosen)) and len(chosen) == sum(quotas)
        assert classes == [0 if u < 6 else 1 for u in chosen]
        assert [classes.count(0), classes.count(1)] == quotas
    # Class 1 wants 6 but only 4 are predicted: all 4 are taken, the 2 missing come from class 0.
    chosen, classes = _draw(probs, 8, [2, 6], torch.Generator().manual_seed(1))
    assert len(chosen) == 8 and len(set(chosen)) == 8 and set(range(6, 10)) <= set(chosen)
    assert [classes.count(0), classes.count(1)] == [4, 4]
    # Every example asked for: all of them, each once.
    assert _draw(probs, 10, [5, 5], torch.Generator().manual_seed(1))[0] == list(range(10))


def test_errors_name_the_argument(tokenizer, pvp, other):
    model = models.build("bert")
    batch = pvp.encode(TEXTS[:2])
    with pytest.raises(ValueError, match="pvps must be a non-empty list"):
        pvp_weights([], [], TEXTS, LABELS)
    swapped = PVP(Template("{text} [MASK]"), Verbalizer({"neg": ["bad"], "pos": ["good"]}, tokenizer))
    with pytest.raises(ValueError, match=r"every PVP must have the labels \['pos', 'neg'\] in this order; pvps\[1\]"):
        soft_labels([pvp, swapped], [model, model], TEXTS, [1, 1])
    with pytest.raises(ValueError, match="models must be a list of 2 models, one per PVP, got a list of 1"):
        pvp_weights([pvp, other], [model], TEXTS, LABELS)
    with pytest.raises(ValueError, match=r"labels\[1\] = 2 is out of range for 2 classes \(valid: 0..1\)"):
        pet_loss(pvp, model, batch, [0, 2])
    with pytest.raises(ValueError, match=r"labels\[0\] = -1 is out of range"):
        train_pvp_model(pvp, model, TEXTS[:2], [-1, 0], steps=1)
    with pytest.raises(ValueError, match="labels has 3 entries, expected 2"):
        pet_loss(pvp, model, batch, [0, 1, 1])
    for weights in ([1.0], [1.0, -1.0], [0, 0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="weights must be 2 finite non-negative numbers"):
            soft_labels([pvp, other], [model, model], TEXTS, weights)
    for temperature in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="soft_labels: temperature must be a finite number in"):
            soft_labels([pvp], [model], TEXTS, [1.0], temperature=temperature)
    with pytest.raises(ValueError, match="alpha must be a finite number in"):
        pet_loss(pvp, model, batch, [0, 1], alpha=1.5)
    with pytest.raises(ValueError, match="mlm_batch must be an EncodedBatch"):
        pet_loss(pvp, model, batch, [0, 1], mlm_batch=["the movie"])
    frozen = models.build("bert")
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="model BertForMaskedLM has no trainable parameters"):
        train_pvp_model(pvp, frozen, TEXTS, LABELS)
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        train_pvp_model(pvp, model, TEXTS, LABELS, steps=0)
    with pytest.raises(ValueError, match="texts must be a string or a non-empty list"):
        train_pvp_model(pvp, model, [], [])
    factory = lambda i: models.build("bert")  # noqa: E731
    with pytest.raises(ValueError, match="generations must be an int >= 1, got 0"):
        ipet([pvp, other], factory, TEXTS, LABELS, UNLABELED, generations=0)
    with pytest.raises(ValueError, match="scale_factor must be an int >= 2, got 1"):
        ipet([pvp, other], factory, TEXTS, LABELS, UNLABELED, scale_factor=1)
    with pytest.raises(ValueError, match=r"share must be a finite number in \(0.0, 1.0\]"):
        ipet([pvp, other], factory, TEXTS, LABELS, UNLABELED, share=0)
    with pytest.raises(ValueError, match="pvps must hold at least 2 PVPs for generations > 1"):
        ipet([pvp], factory, TEXTS, LABELS, UNLABELED, generations=2)
    with pytest.raises(ValueError, match="model_factory must be a callable"):
        ipet([pvp, other], "bert", TEXTS, LABELS, UNLABELED)
    with pytest.raises(ValueError, match=r"model_factory\(0\) returned a str"):
        ipet([pvp, other], lambda i: "bert", TEXTS, LABELS, UNLABELED, generations=1)
    classifier = models.build("bert", task="cls")
    with pytest.raises(ValueError, match=r"soft_labels must be a float tensor \[N=2, C\], got \(3, 3\)"):
        distill(classifier, tokenizer, TEXTS[:2], torch.full((3, 3), 1 / 3))
    with pytest.raises(ValueError, match="soft_labels must hold probabilities"):
        distill(classifier, tokenizer, TEXTS[:2], torch.tensor([[0.5, 0.6, 0.0], [1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"class logits \[B=2, C=2\] \(C from soft_labels\), got shape \(2, 3\)"):
        distill(classifier, tokenizer, TEXTS[:2], torch.full((2, 2), 0.5), steps=1, batch_size=2)
    with pytest.raises(ValueError, match="distill: temperature must be a finite number in"):
        distill(classifier, tokenizer, TEXTS[:2], torch.full((2, 3), 1 / 3), temperature=0)
    with pytest.raises(ValueError, match=r"input_ids and attention_mask must both be \[B, L\]"):
        mask_tokens(batch.input_ids, batch.attention_mask[:, :-1], tokenizer)
