"""LM-BFF: demonstration sampling (one per class, seeded, by similarity by hand), encoding with
demonstrations (ids by hand, truncation keeps the query's mask and the label words), T5 template
generation (a tiny T5 taught one template, joint beam score by hand; on a random T5 a wide beam equals
the brute-force enumeration and a narrow one the beam by hand; well-formed candidates), dev-set
ranking by accuracy, macro-F1 and loss by hand, and errors."""

import re

import pytest
import torch
import transformers

from deltakern.lmbff import (DemonstrationPool, GeneratedTemplate, generate_templates, rank_templates,
                             sentence_embeddings)
from deltakern.prompts import PVP, Template, Verbalizer
from tests.word_tokenizer import word_tokenizer

from .patch import models

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "was", "it", "great", "good", "bad",
         "terrible", "aw", "##ful", "fine", ".", "?", ",", "yes", "no", "plot", "acting", "is", "boring", "film",
         "so", "really", "a"]
TEXTS = ["the movie was fine", "the acting is fine", "fine film", "the plot was boring", "boring acting",
         "it was boring movie"]
LABELS = ["pos", "pos", "pos", "neg", "neg", "neg"]
# A T5 vocabulary of whole-word pieces; the tokenizer appends <extra_id_0..2> as ids 21..23.
PIECES = ["<pad>", "</s>", "<unk>", "▁the", "▁movie", "▁was", "▁great", "▁bad", "▁it", ".", "▁good", "▁fine",
          "▁boring", "▁acting", "▁film", "▁plot", "▁is", "▁so", "▁really", "▁a", "▁"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tokenizer(tmp_path):
    return word_tokenizer(tmp_path, WORDS)


@pytest.fixture
def pvp(tokenizer):
    # "awful" is two tokens: a demonstration's label word may be longer than the mask it replaces.
    return PVP(Template("{text} it was [MASK] ."), Verbalizer({"pos": ["great", "good"], "neg": ["awful"]}, tokenizer))


def ids(*words):
    return [WORDS.index(w) for w in words]


def test_sampling_one_per_class_seeded(pvp):
    pool = DemonstrationPool(pvp, TEXTS, LABELS)
    chosen = pool.sample(20, seed=5)
    assert len(chosen) == 20
    assert all([LABELS[i] for i in row] == ["pos", "neg"] for row in chosen)
    assert pool.sample(20, seed=5) == chosen
    assert {i for row in chosen for i in row} == set(range(6))  # uniform within a class: all drawn
    # The query itself (a pool example in training) is never its own demonstration.
    own = pool.sample(6, seed=1, exclude=list(range(6)))
    assert all(b not in row for b, row in enumerate(own))


def test_similarity_sampling_by_hand(pvp):
    g = torch.Generator().manual_seed(0)
    pool_embeddings = torch.randn(6, 4, generator=g)
    queries = torch.randn(3, 4, generator=g)
    pool = DemonstrationPool(pvp, TEXTS, LABELS, embeddings=pool_embeddings)
    cosine = torch.stack([torch.stack([torch.dot(q, e) / (q.norm() * e.norm()) for e in pool_embeddings])
                          for q in queries])
    members = {"pos": [0, 1, 2], "neg": [3, 4, 5]}
    # top_fraction small enough to keep one example per class: the most similar one, by hand.
    nearest = [[max(members[c], key=lambda i: float(cosine[b, i])) for c in ("pos", "neg")] for b in range(3)]
    assert pool.sample(queries, seed=0, top_fraction=0.01) == nearest
    # The paper's top half: ceil(0.5 * 3) = 2 most similar per class, never the least similar one.
    for seed in range(5):
        for b, row in enumerate(pool.sample(queries, seed=seed)):
            for c, index in zip(("pos", "neg"), row):
                ranked = sorted(members[c], key=lambda i: -float(cosine[b, i]))
                assert index in ranked[:2]
    # Excluding the most similar example moves the choice to the next one.
    second = [sorted(members["pos"], key=lambda i: -float(cosine[0, i]))[1]]
    assert pool.sample(queries[:1], seed=0, top_fraction=0.01, exclude=[nearest[0][0]])[0][0] == second[0]


def test_sentence_embeddings_are_masked_means(tokenizer):
    model = models.build("bert")
    got = sentence_embeddings(model, tokenizer, ["the movie was fine", "bad"], batch_size=1)
    with torch.no_grad():
        for row, text in enumerate(["the movie was fine", "bad"]):
            encoded = tokenizer(text, return_tensors="pt")
            hidden = model(**encoded, output_hidden_states=True).hidden_states[-1][0]
            torch.testing.assert_close(got[row], hidden.mean(0), rtol=1e-5, atol=1e-6)
    # Padding of the batched call does not change the means.
    torch.testing.assert_close(sentence_embeddings(model, tokenizer, ["the movie was fine", "bad"]), got,
                               rtol=1e-5, atol=1e-6)


def test_encode_with_demonstrations_by_hand(pvp, tokenizer):
    pool = DemonstrationPool(pvp, TEXTS, LABELS)
    batch = pool.encode(["the film", "bad"], [[2, 4], [0, 3]])
    query0 = ids("[CLS]", "the", "film", "it", "was", "[MASK]", ".", "[SEP]")
    demo2 = ids("fine", "film", "it", "was", "great", ".", "[SEP]")
    demo4 = ids("boring", "acting", "it", "was", "aw", "##ful", ".", "[SEP]")
    query1 = ids("[CLS]", "bad", "it", "was", "[MASK]", ".", "[SEP]")
    demo0 = ids("the", "movie", "was", "fine", "it", "was", "great", ".", "[SEP]")
    demo3 = ids("the", "plot", "was", "boring", "it", "was", "aw", "##ful", ".", "[SEP]")
    first, second = query0 + demo2 + demo4, query1 + demo0 + demo3
    assert batch.input_ids.tolist() == [first + [0] * (len(second) - len(first)), second]
    assert batch.attention_mask.sum(1).tolist() == [len(first), len(second)]
    assert batch.mask_positions.tolist() == [5, 4]
    # Class logits at the query's mask, as PET reads them.
    model = models.build("bert")
    with torch.no_grad():
        full = model(**batch.model_inputs()).logits
        got = pvp.logits(model, batch)
    great, good, aw, ful = ids("great", "good", "aw", "##ful")
    row = full[0, 5]
    torch.testing.assert_close(got[0], torch.stack([(row[great] + row[good]) / 2, (row[aw] + row[ful]) / 2]),
                               rtol=1e-6, atol=1e-6)


def test_truncation_keeps_the_query_mask(pvp, tokenizer):
    pool = DemonstrationPool(pvp, TEXTS, LABELS)
    demos = [[0, 3]]
    demo0 = ids("the", "movie", "was", "fine", "it", "was", "great", ".", "[SEP]")
    demo3 = ids("the", "plot", "was", "boring", "it", "was", "aw", "##ful", ".", "[SEP]")
    query = "the movie was fine it was great"
    whole = pool.encode([query], demos)
    assert whole.input_ids[0].tolist() == ids("[CLS]", *query.split(), "it", "was", "[MASK]", ".", "[SEP]") + \
        demo0 + demo3
    # Demonstrations (9 + 10 tokens) stay whole; the query keeps its pattern and mask, its text 2 tokens.
    cut = pool.encode([query], demos, max_length=27)
    assert cut.input_ids[0].tolist() == ids("[CLS]", "the", "movie", "it", "was", "[MASK]", ".", "[SEP]") + \
        demo0 + demo3
    assert cut.mask_positions.tolist() == [5]
    with pytest.raises(ValueError, match=r"max_length=24 cannot hold query 0's pattern next to its demonstrations "
                                         r"\(19 tokens\)"):
        pool.encode([query], demos, max_length=24)
    # A demonstration limit counts the demonstration as it appears in the row: its text is cut, never
    # its pattern or its label word ("awful" is two tokens: no text is left next to it).
    short = pool.encode(["bad"], demos, demonstration_max_length=6)
    assert short.input_ids[0].tolist() == ids("[CLS]", "bad", "it", "was", "[MASK]", ".", "[SEP]") + \
        ids("the", "it", "was", "great", ".", "[SEP]") + ids("it", "was", "aw", "##ful", ".", "[SEP]")
    assert short.mask_positions.tolist() == [4]
    with pytest.raises(ValueError, match=r"demonstration_max_length=5 cannot hold pool example 3 as a demonstration "
                                         r"\(pattern, label word 'awful' and special tokens\)"):
        pool.encode(["bad"], demos, demonstration_max_length=5)


def test_pool_errors(pvp, tokenizer):
    with pytest.raises(ValueError, match=r"exactly one \[MASK\], found 0"):
        PVP(Template("{text} it was good ."), pvp.verbalizer)
    with pytest.raises(ValueError, match="the words of class 'neg' must be a non-empty list"):
        Verbalizer({"pos": ["great"], "neg": []}, tokenizer)
    with pytest.raises(ValueError, match="the pool has no example of class 'neg'; LM-BFF needs one demonstration "
                                         "per class"):
        DemonstrationPool(pvp, TEXTS[:3], LABELS[:3])
    with pytest.raises(ValueError, match=r"label 'meh' is not one of the classes \['pos', 'neg'\]"):
        DemonstrationPool(pvp, TEXTS, LABELS[:5] + ["meh"])
    pool = DemonstrationPool(pvp, TEXTS[:4], LABELS[:4])
    with pytest.raises(ValueError, match=r"class 'neg' has no example left for query 0 once the query itself "
                                         r"\(pool index 3\) is excluded"):
        pool.sample(1, exclude=[3])
    with pytest.raises(ValueError, match="similarity sampling needs the pool's embeddings"):
        pool.sample(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"top_fraction must be in \(0, 1\], got 0"):
        pool.sample(2, top_fraction=0)
    with pytest.raises(ValueError, match=r"embeddings must be \[N=4, H\], got \(3, 8\)"):
        DemonstrationPool(pvp, TEXTS[:4], LABELS[:4], embeddings=torch.zeros(3, 8))
    with pytest.raises(ValueError, match=r"demonstrations must be 1 lists of pool indices in \[0, 4\)"):
        pool.encode(["bad"], [[0, 9]])
    with pytest.raises(ValueError, match=r"exclude must be a list of 2 pool indices or None, got \['a', None\]"):
        pool.sample(2, exclude=["a", None])


@pytest.fixture(scope="module")
def t5_tokenizer():
    vocab = [(piece, 0.0 if i < 3 else -1.0 - i / 100) for i, piece in enumerate(PIECES)]
    # transformers' T5Tokenizer is backed by the tokenizers library: a Unigram vocabulary builds it,
    # with no sentencepiece model file; extra_ids=3 appends <extra_id_0..2>.
    return transformers.T5Tokenizer(vocab=vocab, extra_ids=3)


TARGET = "<extra_id_0> it was <extra_id_1> . <extra_id_2>"
WORD = {"pos": "great", "neg": "bad"}


def t5_inputs(t5_tokenizer, form=lambda text, word: f"{text} <extra_id_0> {word} <extra_id_1>"):
    return t5_tokenizer([form(t, WORD[y]) for t, y in zip(TEXTS, LABELS)], padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def random_t5(t5_tokenizer):
    return models.build("t5", vocab_size=len(t5_tokenizer))


@pytest.fixture(scope="module")
def taught_t5(t5_tokenizer):
    """A tiny random T5 taught, for every training input, the answer "it was" / "." to the two blanks."""
    model = models.build("t5", vocab_size=len(t5_tokenizer))
    inputs = t5_inputs(t5_tokenizer)
    target = t5_tokenizer([TARGET] * len(TEXTS), return_tensors="pt")["input_ids"]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        optimizer.zero_grad()
        model(**inputs, labels=target).loss.backward()
        optimizer.step()
    return model.eval()


def collapse(pattern):
    return re.sub(r"\s+", " ", pattern).strip()


def test_generated_templates_by_hand(taught_t5, t5_tokenizer, pvp):
    candidates = generate_templates(taught_t5, t5_tokenizer, WORD, TEXTS, LABELS, num_beams=4, max_new_tokens=8)
    assert candidates[0].pattern == "{text} it was [MASK] ."
    assert candidates[0].fills == ["it was", "."]
    assert 1 < len(candidates) <= 4
    for candidate in candidates:  # well-formed: the form with the fills in its blanks, a valid template
        assert candidate.pattern == collapse(f"{{text}} {candidate.fills[0]} [MASK] {candidate.fills[1]}")
        assert candidate.template.pattern == candidate.pattern
    assert [c.log_prob for c in candidates] == sorted((c.log_prob for c in candidates), reverse=True)
    assert len({c.pattern for c in candidates}) == len(candidates)
    # The joint beam score by hand: Σ over examples of log p(output | that example's input), the
    # forced <extra_id_0> excluded; position t of the decoder predicts output token t.
    output = t5_tokenizer(TARGET, add_special_tokens=False)["input_ids"]
    assert t5_tokenizer.convert_ids_to_tokens(output) == ["<extra_id_0>", "▁it", "▁was", "<extra_id_1>", "▁", ".",
                                                          "<extra_id_2>"]
    decoder = torch.tensor([[taught_t5.config.decoder_start_token_id] + output[:-1]] * len(TEXTS))
    with torch.no_grad():
        log_probs = taught_t5(**t5_inputs(t5_tokenizer), decoder_input_ids=decoder).logits.log_softmax(-1)
    by_hand = sum(float(log_probs[n, t, output[t]]) for n in range(len(TEXTS)) for t in range(1, len(output)))
    assert candidates[0].log_prob == pytest.approx(by_hand, rel=1e-5)
    # A PVP gives the label words too (each class's first word: "great", and "awful" for neg).
    from_pvp = generate_templates(taught_t5, t5_tokenizer, pvp, TEXTS, LABELS, num_beams=4, max_new_tokens=8)
    assert all(c.pattern == collapse(f"{{text}} {c.fills[0]} [MASK] {c.fills[1]}") for c in from_pvp)
    # Generated candidates go straight into the dev-set ranking.
    ranked = rank_templates(models.build("bert"), pvp.verbalizer, candidates, TEXTS, LABELS)
    assert sorted(r.pattern for r in ranked) == sorted(c.pattern for c in candidates)
    print(f"\nT5 candidates: {[(c.pattern, round(c.log_prob, 3)) for c in candidates]}")


def test_exhaustive_beam_equals_brute_force(random_t5, t5_tokenizer):
    # One blank, at most one token in it: every possible output is "<extra_id_1>" (empty fill) or
    # "w <extra_id_1>" with w an ordinary token. A beam wide enough keeps them all, so the candidates
    # are every distinct pattern, each with the best joint score of the outputs that spell it.
    inputs = t5_inputs(t5_tokenizer, lambda text, word: f"{text} <extra_id_0> {word}")
    sentinel0, sentinel1 = t5_tokenizer.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_1>"])
    ordinary = [t for t in range(len(t5_tokenizer)) if t not in t5_tokenizer.all_special_ids]
    assert len(ordinary) == 18
    start = random_t5.config.decoder_start_token_id
    with torch.no_grad():
        first = random_t5(**inputs, decoder_input_ids=torch.tensor([[start, sentinel0]] * len(TEXTS))).logits
        first = first[:, -1].log_softmax(-1).sum(0)  # [V]: Σ_n log p(token | prefix, input n)
        best = {"{text} [MASK]": float(first[sentinel1])}
        closing = {}  # token: Σ_n log p(<extra_id_1> | prefix, token, input n)
        for token in ordinary:
            decoder = torch.tensor([[start, sentinel0, token]] * len(TEXTS))
            second = random_t5(**inputs, decoder_input_ids=decoder).logits[:, -1].log_softmax(-1).sum(0)
            closing[token] = second[sentinel1]
            fill = t5_tokenizer.decode([token], skip_special_tokens=True).strip()
            pattern = collapse(f"{{text}} {fill} [MASK]")
            best[pattern] = max(best.get(pattern, -float("inf")), float(first[token] + second[sentinel1]))
    expected = sorted(best.items(), key=lambda item: -item[1])
    assert min(a[1] - b[1] for a, b in zip(expected, expected[1:])) > 1e-3  # the order is not float noise
    got = generate_templates(random_t5, t5_tokenizer, WORD, TEXTS, LABELS, form="{text} [BLANK] {label}",
                             num_beams=400, max_new_tokens=2)
    assert [c.pattern for c in got] == [pattern for pattern, _ in expected]
    assert [c.log_prob for c in got] == pytest.approx([score for _, score in expected], rel=1e-5)
    # A beam of 3: the first step keeps the 3 best one-token fills (and finishes the empty fill if
    # it ranks among them); the second step must close every fill (the budget is spent).
    allowed = ordinary + [sentinel1]
    first_step = sorted(allowed, key=lambda t: -float(first[t]))
    kept = [t for t in first_step if t != sentinel1][:3]
    cut = first_step.index(kept[-1])
    outputs = {token: float(first[token] + closing[token]) for token in kept}
    if sentinel1 in first_step[:cut]:
        outputs[sentinel1] = float(first[sentinel1])
    top3 = sorted(outputs.items(), key=lambda item: -item[1])[:3]
    spelled = {}
    for token, score in top3:
        fill = "" if token == sentinel1 else t5_tokenizer.decode([token], skip_special_tokens=True).strip()
        spelled.setdefault(collapse(f"{{text}} {fill} [MASK]"), score)
    narrow = generate_templates(random_t5, t5_tokenizer, WORD, TEXTS, LABELS, form="{text} [BLANK] {label}",
                                num_beams=3, max_new_tokens=2)
    assert [c.pattern for c in narrow] == list(spelled)
    assert [c.log_prob for c in narrow] == pytest.approx(list(spelled.values()), rel=1e-5)
    # A form with {text_b} and the blanks before the label word: the candidates keep the form's layout.
    pairs = generate_templates(random_t5, t5_tokenizer, WORD, TEXTS, LABELS, TEXTS[::-1],
                               form="[BLANK] {label} [BLANK] {text} , {text_b}", num_beams=6, max_new_tokens=4)
    assert pairs
    for c in pairs:
        assert c.pattern == collapse(f"{c.fills[0]} [MASK] {c.fills[1]} {{text}} , {{text_b}}")
        assert c.template.has_text_b


def test_generation_errors(random_t5, t5_tokenizer):
    def generate(words=WORD, **kwargs):
        return generate_templates(random_t5, t5_tokenizer, words, TEXTS, LABELS, **kwargs)

    with pytest.raises(ValueError, match=r"the form must contain \{label\} exactly once, found it 0 times"):
        generate(form="{text} [BLANK]")
    with pytest.raises(ValueError, match=r"the form must contain \[BLANK\] at least 1 time, found it 0 times"):
        generate(form="{text} {label}")
    with pytest.raises(ValueError, match=r"the form must contain \{text\} exactly once, found it 0 times"):
        generate(form="[BLANK] {label}")
    with pytest.raises(ValueError, match=r"marks the label word's place with \{label\}, not \[MASK\]"):
        generate(form="{text} [BLANK] {label} [MASK]")
    with pytest.raises(ValueError, match="the T5 tokenizer has no sentinel token <extra_id_3>"):
        generate(form="{text} [BLANK] {label} [BLANK] [BLANK]")
    with pytest.raises(ValueError, match=r"label 'neg' is not one of the classes \['pos'\]"):
        generate({"pos": "great"})
    with pytest.raises(ValueError, match="class 'neg' has the label word ''; expected a non-empty string"):
        generate({"pos": "great", "neg": ""})
    with pytest.raises(ValueError, match=r"the form has \{text_b\}: pass texts_b"):
        generate(form="{text} [BLANK] {label} {text_b}")
    with pytest.raises(ValueError, match="num_beams must be a positive int, got 0"):
        generate(num_beams=0)
    with pytest.raises(ValueError, match="max_new_tokens=1 cannot close the form's 2 blanks"):
        generate(max_new_tokens=1)


def test_ranking_follows_the_dev_scores(pvp):
    # Wider random weights than BERT's 0.02 spread the templates' dev scores apart.
    model = models.build("bert", initializer_range=0.5)
    dev_texts, dev_labels = TEXTS[1:5], LABELS[1:5]
    candidates = ["{text} it was [MASK] .", "{text} ? [MASK] ,", "[MASK] , {text}",
                  GeneratedTemplate("{text} so [MASK] really", -1.0, ["so", "really"]),
                  Template("a film {text} [MASK]")]
    patterns = ["{text} it was [MASK] .", "{text} ? [MASK] ,", "[MASK] , {text}", "{text} so [MASK] really",
                "a film {text} [MASK]"]
    gold = [0, 0, 1, 1]
    by_hand = {}
    with torch.no_grad():
        for pattern in patterns:
            candidate = PVP(Template(pattern), pvp.verbalizer)
            logits = candidate.logits(model, candidate.encode(dev_texts))
            predicted = logits.argmax(1).tolist()
            f1 = []
            for c in (0, 1):
                tp = sum(p == c and g == c for p, g in zip(predicted, gold))
                fp = sum(p == c and g != c for p, g in zip(predicted, gold))
                fn = sum(p != c and g == c for p, g in zip(predicted, gold))
                f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
            by_hand[pattern] = {"accuracy": sum(p == g for p, g in zip(predicted, gold)) / 4,
                                "macro_f1": sum(f1) / 2,
                                "loss": float(torch.nn.functional.cross_entropy(logits, torch.tensor(gold)))}
    losses = sorted(scores["loss"] for scores in by_hand.values())
    assert min(b - a for a, b in zip(losses, losses[1:])) > 1e-3  # the orders below are not float noise
    assert len({scores["accuracy"] for scores in by_hand.values()}) == 2
    for metric in ("accuracy", "macro_f1", "loss"):
        ranked = rank_templates(model, pvp.verbalizer, candidates, dev_texts, dev_labels, metric=metric, batch_size=3)
        assert sorted(r.pattern for r in ranked) == sorted(patterns)
        for r in ranked:
            assert r.accuracy == by_hand[r.pattern]["accuracy"]
            assert r.macro_f1 == pytest.approx(by_hand[r.pattern]["macro_f1"], rel=1e-12)
            assert r.loss == pytest.approx(by_hand[r.pattern]["loss"], rel=1e-5)
        if metric == "loss":
            order = sorted(patterns, key=lambda p: by_hand[p]["loss"])
        else:
            order = sorted(patterns, key=lambda p: (-by_hand[p][metric], by_hand[p]["loss"]))
        assert [r.pattern for r in ranked] == order
        print(f"\nranking by {metric}: {[(r.pattern, r.accuracy, round(r.macro_f1, 3), round(r.loss, 4)) for r in ranked]}")
    with pytest.raises(ValueError, match="candidates must be a non-empty list"):
        rank_templates(model, pvp.verbalizer, [], dev_texts, dev_labels)
    with pytest.raises(ValueError, match=r"exactly one \[MASK\], found 0"):
        rank_templates(model, pvp.verbalizer, ["{text} it was good"], dev_texts, dev_labels)
    with pytest.raises(ValueError, match=r"unknown metric 'f1'; expected one of \('accuracy', 'macro_f1', 'loss'\)"):
        rank_templates(model, pvp.verbalizer, patterns, dev_texts, dev_labels, metric="f1")
    with pytest.raises(ValueError, match=r"label 'meh' is not one of the classes \['pos', 'neg'\]"):
        rank_templates(model, pvp.verbalizer, patterns, dev_texts, dev_labels[:3] + ["meh"])
