"""PPT: the pre-training data builders (labels by construction, deterministic), a falling
pre-training loss on a tiny BERT masked LM for both formats, the saved prompt initialising
add_prompt bit for bit (file and tensor), and bad input.

The tiny BERT is built with initializer_range=0.5: at BERT's 0.02 a random 2-layer model's MLM
logits are all within ±0.2 of each other, so no prompt moves the class probabilities off uniform.
"""

import math
import re

import pytest
import torch

import deltakern
from deltakern.ppt import (
    PAIR_LABELS,
    MultipleChoiceTask,
    SentencePairTask,
    SingleSentenceTask,
    load_prompt,
    multiple_choice_examples,
    pretrain_prompt,
    save_prompt,
    sentence_pair_examples,
    single_sentence_examples,
)
from tests.word_tokenizer import word_tokenizer

from .patch import models

TOPICS = ["cat", "dog", "rain", "sun", "ship", "sea"]
VERBS = ["runs", "sleeps", "falls", "shines", "sails", "waits"]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", ",", ".", ":", "yes", "maybe", "no", "a", "b", "c",
         "answer", "it", "was", *TOPICS, *VERBS]
# Three documents of four distinct sentences ("cat runs", "cat sleeps", ...).
DOCUMENTS = [[f"{TOPICS[k]} {VERBS[(k + i) % 6]}" for i in range(4)] for k in range(3)]
P = 4

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture
def tokenizer(tmp_path):
    return word_tokenizer(tmp_path, WORDS)


def where(sentence):
    """(document, index) of a sentence of DOCUMENTS (all distinct)."""
    return next((d, i) for d, doc in enumerate(DOCUMENTS) for i, s in enumerate(doc) if s == sentence)


def test_sentence_pair_labels_by_construction_and_determinism():
    examples = sentence_pair_examples(DOCUMENTS, seed=3)
    # Every sentence with a next one (3 per document) anchors one pair of each class; each of
    # them has a sentence two or more away in its document.
    assert len(examples) == 27
    assert [sum(e.label == c for e in examples) for c in range(3)] == [9, 9, 9]
    for example in examples:
        (d, i), (e, j) = where(example.text), where(example.text_b)
        label = PAIR_LABELS[example.label]
        assert label == ("next" if (d, j) == (e, i + 1) else "same_document" if d == e and abs(j - i) >= 2
                         else "other_document" if d != e else "adjacent or equal: never built"), example
    assert sentence_pair_examples(DOCUMENTS, seed=3) == examples
    assert sentence_pair_examples(DOCUMENTS, seed=4) != examples
    # A document of 2 sentences has no sentence two away: its anchor gets no same-document pair.
    short = sentence_pair_examples([["cat runs", "cat sleeps"], ["dog runs"]])
    assert sorted(PAIR_LABELS[e.label] for e in short) == ["next", "other_document"]


def test_multiple_choice_answer_is_the_next_sentence():
    examples = multiple_choice_examples(DOCUMENTS, num_options=3, seed=3)
    assert len(examples) == 9
    for example in examples:
        d, i = where(example.text)
        assert len(example.options) == 3 and len(set(example.options)) == 3
        assert where(example.options[example.answer]) == (d, i + 1)
        assert all(where(o)[0] != d for k, o in enumerate(example.options) if k != example.answer)
    assert {e.answer for e in examples} == {0, 1, 2}  # the answer's position is shuffled
    assert multiple_choice_examples(DOCUMENTS, num_options=3, seed=3) == examples
    assert multiple_choice_examples(DOCUMENTS, num_options=3, seed=4) != examples


def wet(sentence: str) -> int:
    """A planted pseudo-labeler: 1 for the rain and sea documents' sentences, else 0."""
    return int(sentence.split()[0] in ("rain", "sea"))


# The single-sentence format reads "yes" for a wet sentence, "no" otherwise.
SINGLE = SingleSentenceTask(labeler=wet, label_words=(["no"], ["yes"]), pattern="{text} it was [MASK] .")


def test_single_sentence_examples_carry_the_labelers_classes():
    examples = single_sentence_examples(DOCUMENTS, wet, 2, seed=3)
    assert sorted(e.text for e in examples) == sorted(s for doc in DOCUMENTS for s in doc)
    assert all(e.label == wet(e.text) for e in examples) and {e.label for e in examples} == {0, 1}
    assert single_sentence_examples(DOCUMENTS, wet, 2, seed=3) == examples
    assert single_sentence_examples(DOCUMENTS, wet, 2, seed=4) != examples
    with pytest.raises(ValueError, match=r"labeler gave 2 for 'cat runs'; expected an int in \[0, 2\)"):
        single_sentence_examples(DOCUMENTS, lambda s: 2, 2)
    with pytest.raises(ValueError, match="labeler must be a callable"):
        single_sentence_examples(DOCUMENTS, "wet", 2)
    with pytest.raises(ValueError, match="takes one sentence"):
        SingleSentenceTask(labeler=wet, pattern="{text} [MASK] {text_b}").pvp(None)


@pytest.mark.parametrize("task", [SentencePairTask(), MultipleChoiceTask(num_options=3), SINGLE],
                         ids=["pair", "choice", "single"])
def test_pretraining_loss_falls_and_only_the_prompt_trains(tokenizer, task, tmp_path):
    model = models.build("bert", initializer_range=0.5)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    full_batch = len(task.examples(DOCUMENTS, 0))
    result = pretrain_prompt(model, tokenizer, DOCUMENTS, P, task=task, steps=15, batch_size=full_batch, lr=0.1,
                             save_to=tmp_path / "prompt.safetensors")
    losses = result.losses
    print(f"\nPPT {type(task).__name__}, {full_batch} examples: loss {' '.join(f'{x:.3f}' for x in losses)}")
    assert len(losses) == 15
    assert losses[-1] < losses[0] - 0.3
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.6
    if isinstance(task, SentencePairTask):
        # Below the 3 balanced classes' prior: the prompt makes the model tell the pairs apart.
        assert losses[-1] < math.log(3) - 0.05
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"deltakern_prompt.embedding.weight"}
    for name, p in model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), name
    torch.testing.assert_close(result.prompt, model.deltakern_prompt.prompts(), atol=0, rtol=0)
    assert torch.equal(load_prompt(tmp_path / "prompt.safetensors"), result.prompt)
    # Same seed, same run.
    again = pretrain_prompt(models.build("bert", initializer_range=0.5), tokenizer, DOCUMENTS, P, task=task, steps=2,
                            batch_size=full_batch, lr=0.1)
    assert again.losses == losses[:2]


def test_saved_prompt_initialises_add_prompt_bit_for_bit(tokenizer, tmp_path):
    model = models.build("bert", initializer_range=0.5)
    pretrain_prompt(model, tokenizer, DOCUMENTS, P, steps=2, batch_size=8, lr=0.1)
    path = tmp_path / "ppt.safetensors"
    save_prompt(model, path)
    saved = model.deltakern_prompt.prompts().detach()
    for init in (path, str(path), saved.clone()):
        downstream = deltakern.add_prompt(models.build("bert", task="cls"), P, init=init)
        assert torch.equal(downstream.deltakern_prompt.embedding.weight, saved)
    # Over a bf16 model the prompt is kept in fp32 (as PEFT keeps it), and bit for bit too.
    bf16 = deltakern.add_prompt(models.build("bert").to(torch.bfloat16), P, init=saved)
    save_prompt(bf16, tmp_path / "bf16.safetensors")
    again = deltakern.add_prompt(models.build("bert").to(torch.bfloat16), P, init=tmp_path / "bf16.safetensors")
    assert again.deltakern_prompt.embedding.weight.dtype == torch.float32
    assert torch.equal(again.deltakern_prompt.embedding.weight, bf16.deltakern_prompt.embedding.weight)
    # T5: the saved rows are the P the encoder reads (the first half of PEFT's 2P).
    t5 = deltakern.add_prompt(models.build("t5"), P, init=saved)
    assert torch.equal(t5.deltakern_prompt.prompts(), saved)


def test_bad_init_and_bad_input(tokenizer, tmp_path):
    def fresh():
        return models.build("bert")

    shape = r"add_prompt: the saved prompt must be a floating tensor of shape \(num_virtual_tokens, embedding width\)"
    with pytest.raises(ValueError, match=shape + r" = \(4, 32\), got torch.float32 of shape \(5, 32\)"):
        deltakern.add_prompt(fresh(), P, init=torch.zeros(5, 32))
    with pytest.raises(ValueError, match=shape + r" = \(4, 32\), got torch.float32 of shape \(4, 16\)"):
        deltakern.add_prompt(fresh(), P, init=torch.zeros(4, 16))
    with pytest.raises(ValueError, match=shape + r" = \(4, 32\), got torch.int64 of shape \(4, 32\)"):
        deltakern.add_prompt(fresh(), P, init=torch.zeros(4, 32, dtype=torch.long))
    for bad in (3, None, ["random"], ""):
        with pytest.raises(ValueError, match=r"add_prompt: init must be 'random', 'vocab', a non-empty text, a saved "
                                             r"prompt file \(an os.PathLike or a '.safetensors' path\) or a tensor"):
            deltakern.add_prompt(fresh(), P, init=bad)
    missing = tmp_path / "missing.safetensors"
    expected = f"add_prompt: init='{missing}': deltakern.load_prompt: no prompt file at"
    with pytest.raises(ValueError, match=re.escape(expected)):
        deltakern.add_prompt(fresh(), P, init=missing)
    not_safetensors = tmp_path / "text.safetensors"
    not_safetensors.write_text("hello")
    with pytest.raises(ValueError, match="load_prompt: .* is not a safetensors file"):
        deltakern.add_prompt(fresh(), P, init=str(not_safetensors))
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(4, 32)}, str(other))
    with pytest.raises(ValueError, match=r"load_prompt: .* is not a deltakern prompt file \(expected the one tensor "
                                         r"'prompt_embeddings'"):
        load_prompt(other)
    with pytest.raises(ValueError, match="add_prompt: a saved prompt initialises the virtual tokens themselves and "
                                         "cannot be used with encoder='mlp'"):
        deltakern.add_prompt(fresh(), P, init=torch.zeros(4, 32), encoder="mlp")
    model = fresh()
    with pytest.raises(ValueError, match=shape):
        deltakern.add_prompt(model, P, init=torch.zeros(5, 32))
    assert not hasattr(model, "deltakern_prompt")  # nothing attached on a bad init
    with pytest.raises(ValueError, match="save_prompt: BertForMaskedLM has no deltakern prompt"):
        save_prompt(model, tmp_path / "x.safetensors")

    with pytest.raises(ValueError, match="sentence_pair_examples: documents must be a list of at least 2 documents"):
        sentence_pair_examples([DOCUMENTS[0]])
    with pytest.raises(ValueError, match="sentence_pair_examples: document 1 must be a non-empty list of non-empty "
                                         "strings"):
        sentence_pair_examples([DOCUMENTS[0], "dog runs"])
    with pytest.raises(ValueError, match="no document has 2 sentences or more"):
        sentence_pair_examples([["cat runs"], ["dog runs"]])
    with pytest.raises(ValueError, match="multiple_choice_examples: num_options must be an int >= 2, got 1"):
        multiple_choice_examples(DOCUMENTS, num_options=1)
    with pytest.raises(ValueError, match="the documents other than document 0 hold 2 sentences; num_options=4 needs "
                                         "3 wrong options"):
        multiple_choice_examples([DOCUMENTS[0], DOCUMENTS[1][:2]], num_options=4)
    with pytest.raises(ValueError, match=r"label_words must have the keys \['next', 'same_document', "
                                         r"'other_document'\]"):
        pretrain_prompt(fresh(), tokenizer, DOCUMENTS, P, task=SentencePairTask(label_words={"next": ["yes"]}))
    with pytest.raises(ValueError, match="num_options=7 needs as many option_names"):
        pretrain_prompt(fresh(), tokenizer, DOCUMENTS, P, task=MultipleChoiceTask(num_options=7))
    with pytest.raises(ValueError, match="pretrain_prompt: task must be a SentencePairTask, MultipleChoiceTask or SingleSentenceTask"):
        pretrain_prompt(fresh(), tokenizer, DOCUMENTS, P, task="nsp")
    with pytest.raises(ValueError, match="pretrain_prompt: steps must be an int >= 1, got 0"):
        pretrain_prompt(fresh(), tokenizer, DOCUMENTS, P, steps=0)
    prompted = deltakern.add_prompt(fresh(), P)
    with pytest.raises(ValueError, match="pretrain_prompt: BertForMaskedLM already has a deltakern prompt"):
        pretrain_prompt(prompted, tokenizer, DOCUMENTS, P)
