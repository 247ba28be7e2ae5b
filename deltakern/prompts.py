"""PET (Schick & Schütze): classification with a masked LM through pattern-verbalizer pairs.

A :class:`Template` turns an input text (and optionally a second one) into a cloze question with
one mask token; a :class:`Verbalizer` names, for each class, the words that would fill the mask;
a :class:`PVP` reads the MLM head's logits at the mask and turns them into class logits. Several
PVPs are combined by :func:`ensemble` (mean or weighted mean of their class logits).

The model is only called (``model(input_ids=..., attention_mask=...)``), so any delta method on it
works: prefix + PVP is P-tuning v2 for NLU, LoRA / adapters / BitFit + PVP fine-tune the same way.

Class logit rule
----------------
For a class with label words w_1..w_n, where word w is tokenized (on its own, without special
tokens) into t_1..t_k:

    score(w) = (1/k) Σ_j logits[mask, t_j]          (a multi-token word: mean over its tokens)
    class_logit = (1/n) Σ_i score(w_i)              (several words: mean over the words)

with ``logits[mask]`` the MLM head's raw logits (before softmax) at the mask position.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

MASK = "[MASK]"
TEXT, TEXT_B = "{text}", "{text_b}"
_PARTS = re.compile(r"(\{text\}|\{text_b\}|\[MASK\])")


@dataclass
class EncodedBatch:
    """A batch of cloze questions.

    Attributes:
        input_ids: ``[B, L]`` token ids, padded on the tokenizer's ``padding_side``.
        attention_mask: ``[B, L]`` 1 for tokens, 0 for padding.
        mask_positions: ``[B]`` index of the mask token in each row of ``input_ids``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask_positions: torch.Tensor

    def to(self, device: torch.device | str) -> EncodedBatch:
        """The same batch on ``device``."""
        return EncodedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.mask_positions.to(device))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` as keyword arguments for the model's forward."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def pad_rows(tokenizer, rows: list[list[int]], mask_positions: list[int]) -> EncodedBatch:
    """Token id rows of different lengths as one :class:`EncodedBatch` ``[B, L_max]``, padded with
    ``pad_token_id`` on the tokenizer's ``padding_side`` (right unless it says left);
    ``mask_positions[b]`` (the mask's index in row b) shifts with left padding."""
    length = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    positions = list(mask_positions)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    for row, ids in enumerate(rows):
        start = length - len(ids) if left else 0
        input_ids[row, start:start + len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, start:start + len(ids)] = 1
        positions[row] += start
    return EncodedBatch(input_ids, attention_mask, torch.tensor(positions, dtype=torch.long))


def _token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_tokens(tokenizer, caller: str) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single sequence (BERT: [CLS] and [SEP]),
    read off the encoding of the mask token alone (always one id)."""
    ids = list(tokenizer(tokenizer.mask_token)["input_ids"])
    if ids.count(tokenizer.mask_token_id) != 1:
        raise ValueError(f"{caller}: the tokenizer does not encode its mask token {tokenizer.mask_token!r} as one "
                         f"token id {tokenizer.mask_token_id}; got {ids}")
    at = ids.index(tokenizer.mask_token_id)
    return ids[:at], ids[at + 1:]


def _check_tokenizer(tokenizer, caller: str) -> None:
    for attribute in ("mask_token", "mask_token_id", "pad_token_id"):
        if getattr(tokenizer, attribute, None) is None:
            raise ValueError(f"{caller}: the tokenizer has no {attribute}; a masked-LM tokenizer (BERT, RoBERTa, ...) "
                             f"is needed")


def _texts(caller: str, argument: str, texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{caller}: {argument} must be a string or a non-empty list of strings, got {texts!r}")
    return list(texts)


def _texts_b(caller: str, template: Template, texts_b, count: int) -> list[str] | None:
    """``texts_b`` checked against ``template``: given exactly when its pattern has ``{text_b}``,
    one entry per text (``count``); ``ValueError`` naming ``caller`` otherwise."""
    if template.has_text_b != (texts_b is not None):
        need = "the pattern has {text_b}: pass texts_b" if template.has_text_b else \
            "the pattern has no {text_b}: leave texts_b None"
        raise ValueError(f"{caller}: {need} (pattern {template.pattern!r})")
    if texts_b is None:
        return None
    texts_b = _texts(caller, "texts_b", texts_b)
    if len(texts_b) != count:
        raise ValueError(f"{caller}: texts has {count} entries, texts_b has {len(texts_b)}")
    return texts_b


class Template:
    """A PET pattern: a string with ``{text}``, optionally ``{text_b}``, and exactly one ``[MASK]``,
    e.g. ``"{text} It was [MASK]."`` or ``"{text} ? [MASK] , {text_b}"``.

    ``[MASK]`` stands for the tokenizer's mask token (``<mask>`` for RoBERTa). The other characters
    are literal text; braces other than the two placeholders have no meaning.

    Raises:
        ValueError: the pattern is not a string, has no or several ``[MASK]``, no ``{text}``, or
            one of the placeholders twice.
    """

    def __init__(self, pattern: str):
        caller = "deltakern.prompts.Template"
        if not isinstance(pattern, str):
            raise ValueError(f"{caller}: pattern must be a string, got {type(pattern).__name__}")
        masks = pattern.count(MASK)
        if masks != 1:
            raise ValueError(f"{caller}: the pattern must contain exactly one {MASK}, found {masks} in {pattern!r}")
        for placeholder, least in ((TEXT, 1), (TEXT_B, 0)):
            count = pattern.count(placeholder)
            if not least <= count <= 1:
                expected = "exactly once" if least else "at most once"
                raise ValueError(f"{caller}: the pattern must contain {placeholder} {expected}, found it {count} "
                                 f"times in {pattern!r}")
        self.pattern = pattern
        self.has_text_b = TEXT_B in pattern
        self._parts = [part for part in _PARTS.split(pattern) if part]

    def __repr__(self) -> str:
        return f"Template({self.pattern!r})"

    def encode(self, tokenizer, texts, texts_b=None, max_length: int | None = None) -> EncodedBatch:
        """Fill the pattern with each text and tokenize it.

        Each part (literal piece, text, text_b) is tokenized on its own without special tokens, as
        PET does, and the tokenizer's special tokens for one sequence wrap the result. Whitespace
        right before ``[MASK]`` is dropped (RoBERTa's ``<mask>`` absorbs it the same way when the
        whole string is tokenized; WordPiece ignores it anyway).

        Args:
            tokenizer: a Hugging Face tokenizer with a mask token and a pad token.
            texts: a string or a list of B strings filling ``{text}``.
            texts_b: B strings filling ``{text_b}``; required exactly when the pattern has ``{text_b}``.
            max_length: the longest row in tokens, special tokens included, or None for no limit.
                Longer rows lose tokens from the end of the longer of text and text_b, one at a
                time; the pattern, the mask and the special tokens are never cut.

        Returns:
            :class:`EncodedBatch` with ``input_ids`` / ``attention_mask`` ``[B, L]`` (L the longest
            row) and ``mask_positions`` ``[B]``.

        Raises:
            ValueError: bad texts, texts_b given without ``{text_b}`` in the pattern (or missing
                with it), B differing between them, a tokenizer without mask or pad token, or a
                ``max_length`` shorter than the pattern and special tokens alone.
        """
        caller = "deltakern.prompts.Template.encode"
        _check_tokenizer(tokenizer, caller)
        texts = _texts(caller, "texts", texts)
        if self.has_text_b != (texts_b is not None):
            need = "the pattern has {text_b}: pass texts_b" if self.has_text_b else \
                "the pattern has no {text_b}: leave texts_b None"
            raise ValueError(f"{caller}: {need} (pattern {self.pattern!r})")
        if texts_b is not None:
            texts_b = _texts(caller, "texts_b", texts_b)
            if len(texts_b) != len(texts):
                raise ValueError(f"{caller}: texts has {len(texts)} entries, texts_b has {len(texts_b)}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)):
            raise ValueError(f"{caller}: max_length must be an int or None, got {max_length!r}")
        before, after = _special_tokens(tokenizer, caller)
        literal = []
        for i, part in enumerate(self._parts):
            if part in (TEXT, TEXT_B, MASK):
                literal.append(part)
            else:
                followed_by_mask = i + 1 < len(self._parts) and self._parts[i + 1] == MASK
                literal.append(_token_ids(tokenizer, part.rstrip() if followed_by_mask else part))
        fixed = len(before) + len(after) + 1 + sum(len(p) for p in literal if isinstance(p, list))
        if max_length is not None and max_length < fixed:
            raise ValueError(f"{caller}: max_length={max_length} leaves no room: the pattern {self.pattern!r} with "
                             f"the special tokens alone takes {fixed} tokens")
        rows, positions = [], []
        for row in range(len(texts)):
            filled = {TEXT: _token_ids(tokenizer, texts[row]),
                      TEXT_B: _token_ids(tokenizer, texts_b[row]) if texts_b is not None else []}
            if max_length is not None:
                excess = fixed + len(filled[TEXT]) + len(filled[TEXT_B]) - max_length
                for _ in range(max(excess, 0)):
                    longer = TEXT if len(filled[TEXT]) >= len(filled[TEXT_B]) else TEXT_B
                    filled[longer].pop()
            ids = list(before)
            for part in literal:
                if part == MASK:
                    positions.append(len(ids))
                    ids.append(tokenizer.mask_token_id)
                else:
                    ids.extend(filled[part] if isinstance(part, str) else part)
            rows.append(ids + after)
        return pad_rows(tokenizer, rows, positions)


class Verbalizer:
    """Label words per class: ``Verbalizer({"positive": ["great", "good"], "negative": ["bad"]}, tokenizer)``.

    Classes are numbered in the dict's order (``labels``). Each word is tokenized on its own,
    without special tokens, as ``tokenizer(word, add_special_tokens=False)``; a byte-level BPE
    tokenizer (RoBERTa) needs the word written with the space it has after the mask (``" great"``).
    The class logit is the mean over the class's words of each word's mean token logit (module
    docstring).

    Attributes:
        labels: the class names, in class-index order.
        words: ``{label: [word, ...]}`` as given.
        token_ids: ``[T]`` long, every token of every label word (a token repeated if it repeats).
        weights: ``[C, T]`` float, ``1 / (n_words · k_tokens)`` where token t belongs to a word of
            class c, else 0; class logits are ``mask_logits[:, token_ids] @ weightsᵀ``.

    Raises:
        ValueError: no classes, a class without words, a word that is not a non-empty string, a word
            the tokenizer turns into no tokens or into its unknown token (naming the word and class).
    """

    def __init__(self, label_words: dict, tokenizer):
        caller = "deltakern.prompts.Verbalizer"
        if not isinstance(label_words, dict) or not label_words:
            raise ValueError(f"{caller}: label_words must be a non-empty dict {{label: [words, ...]}}, got {label_words!r}")
        unk = getattr(tokenizer, "unk_token_id", None)
        token_ids: list[int] = []
        entries: list[tuple[int, int, float]] = []  # (class, column in token_ids, weight)
        for c, (label, words) in enumerate(label_words.items()):
            if isinstance(words, str) or not isinstance(words, (list, tuple)) or not words:
                raise ValueError(f"{caller}: the words of class {label!r} must be a non-empty list of strings, "
                                 f"got {words!r}")
            for word in words:
                if not isinstance(word, str) or not word.strip():
                    raise ValueError(f"{caller}: class {label!r} has the label word {word!r}; expected a non-empty string")
                ids = _token_ids(tokenizer, word)
                if not ids or (unk is not None and unk in ids):
                    pieces = tokenizer.convert_ids_to_tokens(ids) if ids else []
                    raise ValueError(f"{caller}: the label word {word!r} of class {label!r} is not in the tokenizer's "
                                     f"vocabulary (it tokenizes to {pieces})")
                for token in ids:
                    entries.append((c, len(token_ids), 1.0 / (len(words) * len(ids))))
                    token_ids.append(token)
        self.labels = list(label_words)
        self.words = {label: list(words) for label, words in label_words.items()}
        self.token_ids = torch.tensor(token_ids, dtype=torch.long)
        self.weights = torch.zeros(len(self.labels), len(token_ids))
        for c, column, weight in entries:
            self.weights[c, column] = weight
        self.tokenizer = tokenizer

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"Verbalizer({self.words!r})"

    def class_logits(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` MLM logits at the mask → ``[B, C]`` class logits (in mask_logits' dtype).

        Raises:
            ValueError: mask_logits is not 2-D or its vocabulary is smaller than a label word's id.
        """
        caller = "deltakern.prompts.Verbalizer.class_logits"
        if mask_logits.dim() != 2:
            raise ValueError(f"{caller}: mask_logits must be [B, vocab], got shape {tuple(mask_logits.shape)}")
        largest = int(self.token_ids.max())
        if largest >= mask_logits.shape[1]:
            raise ValueError(f"{caller}: the label words use token id {largest}, but mask_logits has a vocabulary of "
                             f"{mask_logits.shape[1]}")
        picked = mask_logits[:, self.token_ids.to(mask_logits.device)]
        return picked @ self.weights.to(device=mask_logits.device, dtype=mask_logits.dtype).t()


def _mlm_logits(model: nn.Module, batch: EncodedBatch, caller: str) -> torch.Tensor:
    """Run ``model`` on ``batch``; the ``[B, V]`` logits at each row's mask."""
    out = model(**batch.model_inputs())
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.dim() != 3 or logits.shape[0] != batch.input_ids.shape[0]:
        raise ValueError(f"{caller}: the model must return MLM logits [B={batch.input_ids.shape[0]}, L, vocab], "
                         f"got shape {tuple(logits.shape)}")
    extra = logits.shape[1] - batch.input_ids.shape[1]
    if extra < 0:
        raise ValueError(f"{caller}: the model returned logits for {logits.shape[1]} positions, fewer than the "
                         f"{batch.input_ids.shape[1]} input tokens")
    # Prompt tuning prepends virtual tokens to the sequence (PEFT's layout): positions move by
    # their number. Prefix tuning adds keys and values only and leaves extra = 0.
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, batch.mask_positions.to(logits.device) + extra]


class PVP:
    """A pattern-verbalizer pair: class logits ``[B, C]`` from a masked LM's head at the mask."""

    def __init__(self, template: Template, verbalizer: Verbalizer):
        caller = "deltakern.prompts.PVP"
        if not isinstance(template, Template):
            raise ValueError(f"{caller}: template must be a deltakern.prompts.Template, got {type(template).__name__}")
        if not isinstance(verbalizer, Verbalizer):
            raise ValueError(f"{caller}: verbalizer must be a deltakern.prompts.Verbalizer, got {type(verbalizer).__name__}")
        self.template, self.verbalizer = template, verbalizer

    def __repr__(self) -> str:
        return f"PVP({self.template!r}, {self.verbalizer!r})"

    @property
    def labels(self) -> list:
        return self.verbalizer.labels

    def encode(self, texts, texts_b=None, max_length: int | None = None) -> EncodedBatch:
        """:meth:`Template.encode` with the verbalizer's tokenizer."""
        return self.template.encode(self.verbalizer.tokenizer, texts, texts_b, max_length)

    def logits(self, model: nn.Module, batch: EncodedBatch) -> torch.Tensor:
        """Run ``model`` (a masked LM returning ``logits [B, L, V]``) on ``batch`` and return the class
        logits ``[B, C]`` at each row's mask (differentiable: train with cross-entropy on them).

        Raises:
            ValueError: the model's output is not ``[B, L, V]`` logits covering the input positions.
        """
        return self.verbalizer.class_logits(_mlm_logits(model, batch, "deltakern.prompts.PVP.logits"))


class PVPEnsemble:
    """Several PVPs with the same labels; class logits are the weighted mean of theirs."""

    def __init__(self, pvps: list[PVP], weights: list[float]):
        self.pvps, self.weights = pvps, weights

    @property
    def labels(self) -> list:
        return self.pvps[0].labels

    def encode(self, texts, texts_b=None, max_length: int | None = None) -> list[EncodedBatch]:
        """One :class:`EncodedBatch` per PVP, each with its own pattern."""
        return [pvp.encode(texts, texts_b, max_length) for pvp in self.pvps]

    def logits(self, models: nn.Module | list[nn.Module], batches: list[EncodedBatch]) -> torch.Tensor:
        """``Σ_i w_i · pvp_i.logits(model_i, batch_i) / Σ_i w_i``, ``[B, C]``.

        Args:
            models: one model for all PVPs, or one per PVP (PET trains a model per pattern).
            batches: one batch per PVP, as :meth:`encode` returns.

        Raises:
            ValueError: the number of batches (or models) is not the number of PVPs.
        """
        caller = "deltakern.prompts.PVPEnsemble.logits"
        n = len(self.pvps)
        models = list(models) if isinstance(models, (list, tuple)) else [models] * n
        if len(models) != n or len(batches) != n:
            raise ValueError(f"{caller}: expected {n} batches and 1 or {n} models (one per PVP), got "
                             f"{len(batches)} batches and {len(models)} models")
        total = sum(self.weights)
        return sum(w / total * pvp.logits(m, b) for w, pvp, m, b in zip(self.weights, self.pvps, models, batches))


def ensemble(pvps: list[PVP], weights: list[float] | None = None) -> PVPEnsemble:
    """Combine PVPs: class logits averaged (``weights=None``) or weighted, ``Σ w_i l_i / Σ w_i``.

    Raises:
        ValueError: fewer than one PVP, a non-PVP, PVPs whose verbalizers have different labels (or
            label order), weights of another length, negative or non-finite, or summing to 0.
    """
    caller = "deltakern.prompts.ensemble"
    if not isinstance(pvps, (list, tuple)) or not pvps or not all(isinstance(p, PVP) for p in pvps):
        raise ValueError(f"{caller}: pvps must be a non-empty list of PVP, got {pvps!r}")
    labels = pvps[0].labels
    for pvp in pvps[1:]:
        if pvp.labels != labels:
            raise ValueError(f"{caller}: every PVP must have the labels {labels} in this order, got {pvp.labels}")
    if weights is None:
        weights = [1.0] * len(pvps)
    if (not isinstance(weights, (list, tuple)) or len(weights) != len(pvps)
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
                       for w in weights)
            or sum(weights) <= 0):
        raise ValueError(f"{caller}: weights must be None or {len(pvps)} finite non-negative numbers with a positive "
                         f"sum, got {weights!r}")
    return PVPEnsemble(list(pvps), [float(w) for w in weights])
