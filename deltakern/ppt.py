"""PPT, pre-trained prompt tuning (Gu et al., 2022, "PPT: Pre-trained Prompt Tuning for Few-shot Learning").

A soft prompt is pre-trained on unlabeled text with self-supervised tasks in the format of the
downstream tasks, the language model frozen; a downstream task then starts prompt tuning from it
(``add_prompt(model, P, init=<saved prompt>)``) instead of from random or vocabulary embeddings.
PPT pre-trains one prompt per task format. Implemented here, from documents (each a list of
sentences):

- Sentence-pair classification (:class:`SentencePairTask`, PPT's 3-class next-sentence task):
  ``(s1, s2)`` is labelled ``next`` when s2 follows s1 in its document, ``same_document`` when s2
  is from the same document but not adjacent to s1, ``other_document`` when s2 is from another
  document; a cloze ``"s1 ? [MASK] , s2"`` read with the label words ``yes / maybe / no``.
- Multiple choice (:class:`MultipleChoiceTask`): a sentence and options, one of them its next
  sentence, the others from other documents; a cloze over option letters ``A, B, C, ...``.
- Single sentence (:class:`SingleSentenceTask`): every sentence with a pseudo-label from a
  ``labeler`` the caller gives (PPT labels its corpus with a 5-class sentiment classifier; any
  callable from a sentence to a class index works), a cloze ``"s It was [MASK] ."`` read with one
  label word per class (PPT's ``terrible / bad / maybe / good / great`` by default).

Both run through :mod:`deltakern.prompts` (Template, Verbalizer, PVP): the class logits are the
masked LM head's logits at ``[MASK]`` over the label words, trained with cross-entropy, and only the
prompt (:func:`deltakern.add_prompt`) is trained.

Not implemented: the sentiment classifier behind PPT's single-sentence labels (the caller brings
a labeler), its "unified" variant that casts every
format as multiple choice, and its use of a masked LM's own pre-training data pipeline (sentence
splitting, document sampling at scale): ``documents`` come already split.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .patch.prompt import add_prompt, has_prompt, load_prompt, save_prompt
from .prompts import PVP, EncodedBatch, Template, Verbalizer

__all__ = ["PAIR_LABELS", "ChoiceExample", "MultipleChoiceTask", "PairExample", "PretrainResult", "SentenceExample",
           "SentencePairTask", "SingleSentenceTask", "load_prompt", "multiple_choice_examples", "pretrain_prompt",
           "save_prompt", "sentence_pair_examples", "single_sentence_examples"]

# The sentence-pair classes, in class-index order.
PAIR_LABELS = ("next", "same_document", "other_document")


@dataclass(frozen=True)
class PairExample:
    """``text_b`` after ``text``: ``label`` indexes :data:`PAIR_LABELS`."""

    text: str
    text_b: str
    label: int


@dataclass(frozen=True)
class ChoiceExample:
    """A sentence, its options, and the index of the option that is its next sentence."""

    text: str
    options: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class SentenceExample:
    """A sentence and its pseudo-label ``label`` (a class index)."""

    text: str
    label: int


def _check_documents(documents, caller: str) -> list[list[str]]:
    if isinstance(documents, str) or not isinstance(documents, (list, tuple)) or len(documents) < 2:
        raise ValueError(f"{caller}: documents must be a list of at least 2 documents (each a list of sentences), "
                         f"got {documents!r:.200}")
    for d, document in enumerate(documents):
        if isinstance(document, str) or not isinstance(document, (list, tuple)) or not document or \
                not all(isinstance(s, str) and s.strip() for s in document):
            raise ValueError(f"{caller}: document {d} must be a non-empty list of non-empty strings (its sentences), "
                             f"got {document!r:.200}")
    if not any(len(document) >= 2 for document in documents):
        raise ValueError(f"{caller}: no document has 2 sentences or more, so there is no next sentence to predict")
    return [list(document) for document in documents]


def _other_sentence(documents: list[list[str]], d: int, rng: random.Random) -> str:
    """A sentence drawn uniformly from the documents other than ``d`` (each sentence equally likely)."""
    choices = [(e, j) for e, document in enumerate(documents) if e != d for j in range(len(document))]
    e, j = rng.choice(choices)
    return documents[e][j]


def sentence_pair_examples(documents, seed: int = 0) -> list[PairExample]:
    """PPT's 3-class sentence-pair data, shuffled, deterministic given ``seed``.

    For every sentence ``s_i`` of a document that has a next sentence: one ``next`` pair
    ``(s_i, s_{i+1})``; one ``same_document`` pair ``(s_i, s_j)`` with ``j`` drawn from the same
    document's sentences with ``|j − i| >= 2`` (skipped when there is none); one ``other_document``
    pair ``(s_i, s)`` with ``s`` drawn from the other documents' sentences. Labels hold by
    construction; a sentence repeated word for word in several documents makes its pairs ambiguous.

    Raises:
        ValueError: fewer than 2 documents, a document that is not a non-empty list of non-empty
            strings, or no document with 2 sentences or more.
    """
    documents = _check_documents(documents, "deltakern.ppt.sentence_pair_examples")
    rng = random.Random(seed)
    examples = []
    for d, document in enumerate(documents):
        for i in range(len(document) - 1):
            examples.append(PairExample(document[i], document[i + 1], PAIR_LABELS.index("next")))
            far = [j for j in range(len(document)) if abs(j - i) >= 2]
            if far:
                examples.append(PairExample(document[i], document[rng.choice(far)], PAIR_LABELS.index("same_document")))
            examples.append(PairExample(document[i], _other_sentence(documents, d, rng),
                                        PAIR_LABELS.index("other_document")))
    rng.shuffle(examples)
    return examples


def multiple_choice_examples(documents, num_options: int = 3, seed: int = 0) -> list[ChoiceExample]:
    """Multiple-choice next-sentence data, shuffled, deterministic given ``seed``.

    For every sentence ``s_i`` of a document that has a next sentence: the options are
    ``s_{i+1}`` and ``num_options − 1`` distinct sentences drawn from the other documents, in a
    random order; ``answer`` is the position of ``s_{i+1}``.

    Raises:
        ValueError: bad documents (as :func:`sentence_pair_examples`), ``num_options`` not an int
            >= 2, or fewer than ``num_options − 1`` sentences outside some document.
    """
    caller = "deltakern.ppt.multiple_choice_examples"
    documents = _check_documents(documents, caller)
    if isinstance(num_options, bool) or not isinstance(num_options, int) or num_options < 2:
        raise ValueError(f"{caller}: num_options must be an int >= 2, got {num_options!r}")
    rng = random.Random(seed)
    examples = []
    for d, document in enumerate(documents):
        if len(document) < 2:
            continue
        others = [s for e, other in enumerate(documents) if e != d for s in other]
        if len(others) < num_options - 1:
            raise ValueError(f"{caller}: the documents other than document {d} hold {len(others)} sentences; "
                             f"num_options={num_options} needs {num_options - 1} wrong options")
        for i in range(len(document) - 1):
            options = [document[i + 1], *rng.sample(others, num_options - 1)]
            order = list(range(num_options))
            rng.shuffle(order)
            examples.append(ChoiceExample(document[i], tuple(options[k] for k in order), order.index(0)))
    rng.shuffle(examples)
    return examples


def single_sentence_examples(documents, labeler: Callable[[str], int], num_classes: int,
                             seed: int = 0) -> list[SentenceExample]:
    """Every sentence of ``documents`` (a list of lists of sentences; one document is enough) with
    the class ``labeler(sentence)``, an int in ``[0, num_classes)``; shuffled, deterministic given
    ``seed``.

    Raises:
        ValueError: no documents, a document that is not a non-empty list of non-empty strings,
            ``labeler`` not callable, or a label that is not an int in range (naming the sentence).
    """
    caller = "deltakern.ppt.single_sentence_examples"
    if isinstance(documents, str) or not isinstance(documents, (list, tuple)) or not documents:
        raise ValueError(f"{caller}: documents must be a non-empty list of documents (each a list of sentences), "
                         f"got {documents!r:.200}")
    if not callable(labeler):
        raise ValueError(f"{caller}: labeler must be a callable from a sentence to a class index, got {labeler!r}")
    examples = []
    for d, document in enumerate(documents):
        if isinstance(document, str) or not isinstance(document, (list, tuple)) or not document or \
                not all(isinstance(sentence, str) and sentence.strip() for sentence in document):
            raise ValueError(f"{caller}: document {d} must be a non-empty list of non-empty strings (its sentences), "
                             f"got {document!r:.200}")
        for sentence in document:
            label = labeler(sentence)
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_classes:
                raise ValueError(f"{caller}: labeler gave {label!r} for {sentence!r}; expected an int in "
                                 f"[0, {num_classes})")
            examples.append(SentenceExample(sentence, label))
    random.Random(seed).shuffle(examples)
    return examples


@dataclass
class SentencePairTask:
    """The 3-class sentence-pair format: ``pattern`` with ``{text}``, ``{text_b}`` and ``[MASK]``;
    ``label_words`` maps each of :data:`PAIR_LABELS` to its words."""

    pattern: str = "{text} ? [MASK] , {text_b}"
    label_words: dict = field(default_factory=lambda: {"next": ["yes"], "same_document": ["maybe"],
                                                       "other_document": ["no"]})

    def examples(self, documents, seed: int) -> list[PairExample]:
        return sentence_pair_examples(documents, seed)

    def pvp(self, tokenizer) -> PVP:
        """Raises ValueError: ``label_words`` without exactly the keys of :data:`PAIR_LABELS`."""
        if not isinstance(self.label_words, dict) or set(self.label_words) != set(PAIR_LABELS):
            raise ValueError(f"deltakern.ppt.SentencePairTask: label_words must have the keys {list(PAIR_LABELS)}, "
                             f"got {self.label_words!r}")
        # Class c of the verbalizer is PAIR_LABELS[c], the examples' label index.
        return PVP(Template(self.pattern), Verbalizer({k: self.label_words[k] for k in PAIR_LABELS}, tokenizer))

    def encode(self, pvp: PVP, examples: list[PairExample], max_length: int | None) -> EncodedBatch:
        return pvp.encode([e.text for e in examples], [e.text_b for e in examples], max_length)


@dataclass
class MultipleChoiceTask:
    """The multiple-choice format: ``{text_b}`` of ``pattern`` becomes the options, each after its
    name (``"A . first option B . second option ..."``); the names are also the label words."""

    num_options: int = 3
    option_names: tuple[str, ...] = ("A", "B", "C", "D", "E", "F")
    pattern: str = "{text} ? {text_b} answer : [MASK] ."

    def examples(self, documents, seed: int) -> list[ChoiceExample]:
        return multiple_choice_examples(documents, self.num_options, seed)

    def pvp(self, tokenizer) -> PVP:
        """Raises ValueError: fewer ``option_names`` than ``num_options``, or a pattern without ``{text_b}``."""
        caller = "deltakern.ppt.MultipleChoiceTask"
        if len(self.option_names) < self.num_options:
            raise ValueError(f"{caller}: num_options={self.num_options} needs as many option_names, got "
                             f"{list(self.option_names)}")
        template = Template(self.pattern)
        if not template.has_text_b:
            raise ValueError(f"{caller}: the pattern must hold {{text_b}} (the options), got {self.pattern!r}")
        names = self.option_names[: self.num_options]
        return PVP(template, Verbalizer({name: [name] for name in names}, tokenizer))

    def encode(self, pvp: PVP, examples: list[ChoiceExample], max_length: int | None) -> EncodedBatch:
        options = [" ".join(f"{name} . {option}" for name, option in zip(self.option_names, e.options))
                   for e in examples]
        return pvp.encode([e.text for e in examples], options, max_length)


@dataclass
class SingleSentenceTask:
    """The single-sentence format: each sentence labelled by ``labeler`` (sentence -> class index),
    read through ``pattern`` (``{text}`` and ``[MASK]``) with ``label_words[c]`` for class c."""

    labeler: Callable[[str], int]
    label_words: tuple = (["terrible"], ["bad"], ["maybe"], ["good"], ["great"])
    pattern: str = "{text} It was [MASK] ."

    def examples(self, documents, seed: int) -> list[SentenceExample]:
        return single_sentence_examples(documents, self.labeler, len(self.label_words), seed)

    def pvp(self, tokenizer) -> PVP:
        """Raises ValueError: fewer than 2 classes of label words, or a pattern with ``{text_b}``."""
        caller = "deltakern.ppt.SingleSentenceTask"
        if len(self.label_words) < 2:
            raise ValueError(f"{caller}: label_words must list the words of 2 classes or more, got {self.label_words!r}")
        template = Template(self.pattern)
        if template.has_text_b:
            raise ValueError(f"{caller}: the pattern takes one sentence, {{text}}; got {self.pattern!r}")
        return PVP(template, Verbalizer({c: list(words) for c, words in enumerate(self.label_words)}, tokenizer))

    def encode(self, pvp: PVP, examples: list[SentenceExample], max_length: int | None) -> EncodedBatch:
        return pvp.encode([e.text for e in examples], None, max_length)


def _label(example) -> int:
    return example.answer if isinstance(example, ChoiceExample) else example.label


@dataclass
class PretrainResult:
    """What :func:`pretrain_prompt` returns: ``losses``, the cross-entropy of each step's batch;
    ``prompt``, the pre-trained virtual tokens ``[P, D]`` (a detached copy)."""

    losses: list[float]
    prompt: torch.Tensor


def pretrain_prompt(model: nn.Module, tokenizer, documents, num_virtual_tokens: int,
                    task: SentencePairTask | MultipleChoiceTask | SingleSentenceTask | None = None, steps: int = 100,
                    batch_size: int = 16,
                    lr: float = 3e-3, init: str = "vocab", seed: int = 0, max_length: int | None = None,
                    save_to=None) -> PretrainResult:
    """Pre-train a soft prompt on ``documents`` (PPT) and return the losses and the prompt.

    Adds a prompt of ``num_virtual_tokens`` to the masked LM ``model`` (``add_prompt(model, P,
    init=init, tokenizer=tokenizer)``; the model keeps it, base frozen), builds ``task``'s examples
    (default :class:`SentencePairTask`) and trains the prompt alone with Adam at ``lr`` for
    ``steps`` steps of ``batch_size`` examples, taken in order from the shuffled examples and
    reshuffled after each pass. The loss is cross-entropy on the PVP's class logits at ``[MASK]``.
    The model runs in the mode it is in (``model.train()`` for dropout). Deterministic given
    ``seed`` (it seeds the data order and the prompt's init without touching torch's global generator).
    ``save_to``: also write the prompt there with :func:`save_prompt`.

    Raises:
        ValueError: bad documents or task settings (see the builders), ``task`` of another type,
            ``steps`` / ``batch_size`` not an int >= 1, ``lr`` not positive, or what
            ``add_prompt`` raises (a prompt already present, a bad init).
    """
    caller = "deltakern.ppt.pretrain_prompt"
    task = SentencePairTask() if task is None else task
    if not isinstance(task, (SentencePairTask, MultipleChoiceTask, SingleSentenceTask)):
        raise ValueError(f"{caller}: task must be a SentencePairTask, MultipleChoiceTask or SingleSentenceTask, got "
                         f"{type(task).__name__}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{caller}: {name} must be an int >= 1, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"{caller}: lr must be a positive number, got {lr!r}")
    examples = task.examples(documents, seed)
    pvp = task.pvp(tokenizer)
    if has_prompt(model):
        raise ValueError(f"{caller}: {type(model).__name__} already has a deltakern prompt; pretrain_prompt adds "
                         f"its own")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        add_prompt(model, num_virtual_tokens, init=init, tokenizer=tokenizer)
    prompt = model.get_submodule("deltakern_prompt")
    optimizer = torch.optim.Adam(prompt.parameters(), lr=lr)
    device = next(prompt.parameters()).device
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    for _ in range(steps):
        batch_examples = []
        while len(batch_examples) < batch_size:
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch_examples.append(examples[order.pop()])
        batch = task.encode(pvp, batch_examples, max_length).to(device)
        labels = torch.tensor([_label(e) for e in batch_examples], device=device)
        loss = nn.functional.cross_entropy(pvp.logits(model, batch).float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        result = PretrainResult(losses, prompt.prompts().detach().clone())
    if save_to is not None:
        save_prompt(model, save_to)
    return result
