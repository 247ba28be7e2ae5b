"""AutoPrompt (Shin et al., 2020, "AutoPrompt: Eliciting Knowledge from Language Models with
Automatically Generated Prompts"): discrete trigger tokens found by gradient-guided search, and
label words found from a classifier on the mask's hidden state.

A :class:`TriggerTemplate` is a PET :class:`~deltakern.prompts.Template` with trigger slots ``[T]``,
e.g. ``"{text} [T] [T] [T] [MASK] ."``; once its ``trigger_ids`` are set it plugs into
:class:`~deltakern.prompts.PVP` like any template. :func:`search_triggers` fills the slots;
:func:`search_label_words` proposes label words for a :class:`~deltakern.prompts.Verbalizer`.

Trigger search (the paper's Sec. 2.2, greedy coordinate descent with HotFlip candidates)
-----------------------------------------------------------------------------------------
Objective, for an example with class y whose label words are V_y (word w tokenized into t_1..t_k,
``l`` the MLM logits at the mask):

    log p(w|x)  = (1/k) Σ_j log_softmax(l)[t_j]         (one-token words: the paper's exactly)
    loss(x, y)  = -log Σ_{w in V_y} p(w|x)              (the label words' marginal probability)

and the batch loss is the mean over examples. Each step:

1. pick a trigger slot j: at random (``slot_order="random"``, the released code's choice; seeded) or
   left to right in turn (``slot_order="cyclic"``);
2. g = ∂loss/∂e_j, the gradient w.r.t. the input embedding in slot j summed over the batch;
3. candidates: the ``num_candidates`` tokens w with the largest ``-g · E[w]`` (first-order estimate
   of the loss decrease from putting w in slot j), skipping special tokens, the label words'
   tokens (a trigger that spells out the answer for one class is no prompt), and the current token;
4. evaluate the loss with each candidate in slot j on the same batch; keep the best candidate only
   when its loss is lower than the current triggers' loss.

With ``batch_size=None`` every step sees all examples, so the loss after each step is monotone
non-increasing. Triggers start as the mask token (as in the paper) unless given.

Label-word search (the paper's Sec. 2.3)
----------------------------------------
Features: the input of the MLM's output embedding layer at the mask (``h``, the hidden state after
the head's transform, so that ``h · W_out[w]`` is word w's logit). A softmax-regression classifier
``p(y|h) = softmax(h θᵀ + β)`` is trained on them (full batch, Adam, from zeros: deterministic); each
vocabulary word is then scored by ``s(y, w) = p(y | W_out[w]) = softmax_y(W_out[w] · θ_y + β_y)`` and
the ``num_words`` best whole-word tokens per class become its label words.

Not implemented: the paper's dev-set selection of the best trigger set seen during the search and
its fact-retrieval/relation-extraction data pipelines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .prompts import (EncodedBatch, Template, Verbalizer, _check_tokenizer, _mlm_logits, _texts, _texts_b,
                      _token_ids)

TRIGGER = "[T]"
SLOT_ORDERS = ("random", "cyclic")


@dataclass
class TriggerBatch(EncodedBatch):
    """A batch of cloze questions with trigger slots.

    Attributes:
        trigger_positions: ``[B, T]`` index in ``input_ids`` of each of the T trigger slots, left to right.
    """

    trigger_positions: torch.Tensor

    def to(self, device: torch.device | str) -> TriggerBatch:
        """The same batch on ``device``."""
        return TriggerBatch(self.input_ids.to(device), self.attention_mask.to(device), self.mask_positions.to(device),
                            self.trigger_positions.to(device))


class TriggerTemplate(Template):
    """A template with trigger slots: ``TriggerTemplate("{text} [T] [T] [T] [MASK] .")``.

    Each ``[T]`` is one token; spaces around it carry no meaning. The template's rules otherwise are
    :class:`~deltakern.prompts.Template`'s (exactly one ``[MASK]``, ``{text}`` once, ``{text_b}`` at most once).

    Args:
        pattern: the pattern with at least one ``[T]``.
        trigger_ids: one token id per slot (e.g. :attr:`AutoPromptResult.trigger_ids`), or None: slots
            hold the tokenizer's mask token until ids are given to :meth:`encode` or set here.

    Raises:
        ValueError: the pattern breaks a Template rule or has no ``[T]``; trigger_ids of the wrong length.
    """

    def __init__(self, pattern: str, trigger_ids: list[int] | None = None):
        super().__init__(pattern)
        self.num_triggers = pattern.count(TRIGGER)
        if self.num_triggers == 0:
            raise ValueError(f"deltakern.autoprompt.TriggerTemplate: the pattern must contain at least one {TRIGGER} "
                             f"trigger slot, found none in {pattern!r}")
        self.trigger_ids = None if trigger_ids is None else \
            self._checked_trigger_ids("deltakern.autoprompt.TriggerTemplate", trigger_ids, None)

    def __repr__(self) -> str:
        return f"TriggerTemplate({self.pattern!r}, trigger_ids={self.trigger_ids})"

    def _checked_trigger_ids(self, caller: str, trigger_ids, vocab_size: int | None) -> list[int]:
        if (not isinstance(trigger_ids, (list, tuple)) or len(trigger_ids) != self.num_triggers
                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in trigger_ids)):
            raise ValueError(f"{caller}: trigger_ids must be {self.num_triggers} non-negative token ids (one per "
                             f"{TRIGGER} in {self.pattern!r}), got {trigger_ids!r}")
        if vocab_size is not None and max(trigger_ids) >= vocab_size:
            raise ValueError(f"{caller}: trigger id {max(trigger_ids)} is outside the tokenizer's {vocab_size} tokens")
        return list(trigger_ids)

    def encode(self, tokenizer, texts, texts_b=None, max_length: int | None = None,
               trigger_ids: list[int] | None = None) -> TriggerBatch:
        """:meth:`Template.encode` with each ``[T]`` replaced by its trigger token.

        Args:
            trigger_ids: ids for the slots in this call; default :attr:`trigger_ids`, else the mask token.
            (the others: :meth:`Template.encode`; truncation never cuts a trigger.)

        Returns:
            :class:`TriggerBatch`: ``input_ids`` / ``attention_mask`` ``[B, L]``, ``mask_positions`` ``[B]``,
            ``trigger_positions`` ``[B, T]``.

        Raises:
            ValueError: :meth:`Template.encode`'s errors; bad trigger_ids; a text containing the
                tokenizer's pad token string.
        """
        caller = "deltakern.autoprompt.TriggerTemplate.encode"
        _check_tokenizer(tokenizer, caller)
        if trigger_ids is None:
            trigger_ids = self.trigger_ids or [tokenizer.mask_token_id] * self.num_triggers
        trigger_ids = self._checked_trigger_ids(caller, trigger_ids, len(tokenizer))
        # Template.encode does the layout (special tokens, truncation, padding). Each slot is written
        # as the pad token, the one token a real row never holds under attention_mask = 1, so the
        # slots are found again after truncation and padding and then overwritten with the triggers.
        placeholder = tokenizer.pad_token
        if _token_ids(tokenizer, placeholder) != [tokenizer.pad_token_id]:
            raise ValueError(f"{caller}: the tokenizer does not encode its pad token {placeholder!r} as the single id "
                             f"{tokenizer.pad_token_id}")
        batch = Template(self.pattern.replace(TRIGGER, placeholder)).encode(tokenizer, texts, texts_b, max_length)
        slots = (batch.input_ids == tokenizer.pad_token_id) & (batch.attention_mask == 1)
        counts = slots.sum(dim=1)
        if (counts != self.num_triggers).any():
            row = int((counts != self.num_triggers).nonzero()[0])
            raise ValueError(f"{caller}: row {row} has {int(counts[row])} pad tokens inside the sequence, expected the "
                             f"{self.num_triggers} trigger slots; a text contains the pad token {placeholder!r}")
        positions = slots.nonzero()[:, 1].view(-1, self.num_triggers)
        rows = torch.arange(positions.shape[0]).unsqueeze(1)
        batch.input_ids[rows, positions] = torch.tensor(trigger_ids, dtype=torch.long)
        return TriggerBatch(batch.input_ids, batch.attention_mask, batch.mask_positions, positions)


def _class_indices(caller: str, labels, classes: list, count: int) -> torch.Tensor:
    if isinstance(labels, str) or not isinstance(labels, (list, tuple)) or len(labels) != count:
        raise ValueError(f"{caller}: labels must be a list of {count} labels (one per text), got {labels!r}")
    unknown = [label for label in labels if label not in classes]
    if unknown:
        raise ValueError(f"{caller}: label {unknown[0]!r} is not one of the classes {classes}")
    return torch.tensor([classes.index(label) for label in labels], dtype=torch.long)


def label_word_log_likelihood(mask_logits: torch.Tensor, verbalizer: Verbalizer, classes: torch.Tensor) -> torch.Tensor:
    """``log Σ_{w in V_y} p(w|x)`` for each row (module docstring): ``[B, V]`` logits, ``[B]`` class
    indices → ``[B]`` log-likelihoods of the gold class's label words.

    Raises:
        ValueError: mask_logits is not ``[B, V]`` with B = len(classes) and V above every label token id.
    """
    caller = "deltakern.autoprompt.label_word_log_likelihood"
    if mask_logits.dim() != 2 or mask_logits.shape[0] != classes.shape[0]:
        raise ValueError(f"{caller}: mask_logits must be [B={classes.shape[0]}, vocab], got {tuple(mask_logits.shape)}")
    if int(verbalizer.token_ids.max()) >= mask_logits.shape[1]:
        raise ValueError(f"{caller}: the label words use token id {int(verbalizer.token_ids.max())}, but mask_logits "
                         f"has a vocabulary of {mask_logits.shape[1]}")
    log_probs = torch.log_softmax(mask_logits.float(), dim=-1)
    word_log_probs, word_class = [], []
    for c, label in enumerate(verbalizer.labels):
        for word in verbalizer.words[label]:
            ids = torch.tensor(_token_ids(verbalizer.tokenizer, word), device=mask_logits.device)
            word_log_probs.append(log_probs[:, ids].mean(dim=-1))
            word_class.append(c)
    word_log_probs = torch.stack(word_log_probs, dim=1)  # [B, W]
    word_class = torch.tensor(word_class, device=mask_logits.device)
    of_gold_class = word_class.unsqueeze(0) == classes.to(mask_logits.device).unsqueeze(1)  # [B, W]
    return word_log_probs.masked_fill(~of_gold_class, -math.inf).logsumexp(dim=-1)


@dataclass
class SearchStep:
    """One coordinate step of :func:`search_triggers`.

    Attributes:
        slot: the trigger slot j that was tried.
        batch: indices of the examples the step used.
        candidates: candidate token ids, best first by ``-g · E[w]``.
        candidate_losses: the batch loss with each candidate in slot j.
        loss_before: the batch loss of the triggers at the start of the step.
        loss_after: the batch loss of the triggers at the end (the best candidate's when accepted).
        accepted: whether the best candidate replaced the slot's token.
        trigger_ids: the triggers at the end of the step.
    """

    slot: int
    batch: list[int]
    candidates: list[int]
    candidate_losses: list[float]
    loss_before: float
    loss_after: float
    accepted: bool
    trigger_ids: list[int]


@dataclass
class AutoPromptResult:
    """What :func:`search_triggers` found.

    Attributes:
        template: the :class:`TriggerTemplate` with the final ``trigger_ids`` set (use it in a PVP).
        trigger_ids: the final trigger token ids, one per slot.
        triggers: the same as token strings.
        steps: one :class:`SearchStep` per step.
    """

    template: TriggerTemplate
    trigger_ids: list[int]
    triggers: list[str]
    steps: list[SearchStep]

    @property
    def loss_history(self) -> list[float]:
        """The loss at the start, then after each step (monotone non-increasing with ``batch_size=None``)."""
        return [self.steps[0].loss_before] + [step.loss_after for step in self.steps] if self.steps else []


def _batch_loss(model: nn.Module, batch: EncodedBatch, verbalizer: Verbalizer, classes: torch.Tensor,
                caller: str) -> torch.Tensor:
    mask_logits = _mlm_logits(model, batch, caller)
    return -label_word_log_likelihood(mask_logits, verbalizer, classes).mean()


def _slot_gradient(model: nn.Module, batch: TriggerBatch, verbalizer: Verbalizer, classes: torch.Tensor,
                   slot: int, caller: str) -> tuple[torch.Tensor, float]:
    """``(g [H], loss)``: the gradient of the batch loss w.r.t. the input embedding in ``slot``, summed
    over the rows. The embedding layer's output is swapped for a leaf copy, so the gradient reaches
    no model parameter (nothing accumulates in ``.grad``)."""
    embedding = model.get_input_embeddings()
    captured = []

    def as_leaf(module, inputs, output):
        captured.append(output.detach().requires_grad_(True))
        return captured[-1]

    handle = embedding.register_forward_hook(as_leaf)
    try:
        with torch.enable_grad():
            loss = _batch_loss(model, batch, verbalizer, classes, caller)
            (embeds_grad,) = torch.autograd.grad(loss, captured[0])
            loss = loss.detach()
    finally:
        handle.remove()
    rows = torch.arange(embeds_grad.shape[0], device=embeds_grad.device)
    return embeds_grad[rows, batch.trigger_positions[:, slot].to(embeds_grad.device)].sum(dim=0), float(loss)


def _with_token(batch: TriggerBatch, slot: int, token: int) -> TriggerBatch:
    input_ids = batch.input_ids.clone()
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    input_ids[rows, batch.trigger_positions[:, slot]] = token
    return TriggerBatch(input_ids, batch.attention_mask, batch.mask_positions, batch.trigger_positions)


def search_triggers(model: nn.Module, template: TriggerTemplate, verbalizer: Verbalizer, texts, labels,
                    texts_b=None, *, num_steps: int = 10, num_candidates: int = 10, batch_size: int | None = None,
                    seed: int = 0, slot_order: str = "random", max_length: int | None = None,
                    initial_trigger_ids: list[int] | None = None) -> AutoPromptResult:
    """AutoPrompt's gradient-guided trigger search (module docstring) for a masked LM.

    The model runs in eval mode (its mode is restored after) and is never changed; no gradient is
    left in any parameter's ``.grad``. The same ``seed`` gives the same steps and triggers.

    Args:
        model: a masked LM returning ``logits [B, L, V]``, with ``get_input_embeddings()``.
        template: the :class:`TriggerTemplate`; its ``trigger_ids`` (if set) are the starting triggers.
        verbalizer: the label words of each class (the objective's V_y).
        texts, texts_b: the N training texts (``texts_b`` when the pattern has ``{text_b}``).
        labels: N class names from ``verbalizer.labels``.
        num_steps: coordinate steps (each tries one slot).
        num_candidates: candidates evaluated per step (the paper's k).
        batch_size: examples drawn (without replacement, seeded) per step; None: all N every step.
        seed: seeds the slot choice and the batches.
        slot_order: ``"random"``: each step picks a slot uniformly (seeded); ``"cyclic"``: step s
            tries slot ``s mod T``.
        max_length: passed to :meth:`TriggerTemplate.encode`.
        initial_trigger_ids: starting triggers, overriding ``template.trigger_ids``.

    Returns:
        :class:`AutoPromptResult`.

    Raises:
        ValueError: a non-TriggerTemplate, labels not in the verbalizer, texts_b not matching the
            pattern, non-positive counts, an unknown slot_order, a model without input embeddings, or
            an encoding error.
    """
    caller = "deltakern.autoprompt.search_triggers"
    if not isinstance(template, TriggerTemplate):
        raise ValueError(f"{caller}: template must be a TriggerTemplate (a pattern with [T] slots), got "
                         f"{type(template).__name__}")
    if not isinstance(verbalizer, Verbalizer):
        raise ValueError(f"{caller}: verbalizer must be a deltakern.prompts.Verbalizer, got {type(verbalizer).__name__}")
    texts = _texts(caller, "texts", texts)
    texts_b = _texts_b(caller, template, texts_b, len(texts))
    classes = _class_indices(caller, labels, verbalizer.labels, len(texts))
    if slot_order not in SLOT_ORDERS:
        raise ValueError(f"{caller}: unknown slot_order {slot_order!r}; expected one of {SLOT_ORDERS}")
    for argument, value in (("num_steps", num_steps), ("num_candidates", num_candidates)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{caller}: {argument} must be a positive int, got {value!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"{caller}: batch_size must be a positive int or None, got {batch_size!r}")
    tokenizer = verbalizer.tokenizer
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is None or getattr(embedding, "weight", None) is None:
        raise ValueError(f"{caller}: the model has no input embedding layer (get_input_embeddings()) to take the "
                         f"gradient at")
    trigger_ids = template._checked_trigger_ids(
        caller, initial_trigger_ids or template.trigger_ids or [tokenizer.mask_token_id] * template.num_triggers,
        len(tokenizer))

    # Candidates are real tokens of the tokenizer (the embedding matrix may have padding rows),
    # never special tokens nor tokens of the label words.
    vocab_size = min(len(tokenizer), embedding.weight.shape[0])
    banned = torch.zeros(vocab_size, dtype=torch.bool)
    banned[[t for t in tokenizer.all_special_ids if t < vocab_size]] = True
    banned[verbalizer.token_ids[verbalizer.token_ids < vocab_size]] = True
    device = embedding.weight.device
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    steps = []
    try:
        for step in range(num_steps):
            if batch_size is None or batch_size >= len(texts):
                rows = list(range(len(texts)))
            else:
                rows = sorted(torch.randperm(len(texts), generator=generator)[:batch_size].tolist())
            if slot_order == "random":
                slot = int(torch.randint(template.num_triggers, (1,), generator=generator))
            else:
                slot = step % template.num_triggers
            batch = template.encode(tokenizer, [texts[r] for r in rows],
                                    None if texts_b is None else [texts_b[r] for r in rows], max_length,
                                    trigger_ids).to(device)
            batch_classes = classes[rows].to(device)
            grad, loss_before = _slot_gradient(model, batch, verbalizer, batch_classes, slot, caller)
            with torch.no_grad():
                estimate = -(embedding.weight[:vocab_size].float() @ grad.float())  # [V]: first-order loss decrease
                estimate[banned.to(device)] = -math.inf
                if trigger_ids[slot] < vocab_size:
                    estimate[trigger_ids[slot]] = -math.inf
                order = torch.sort(estimate, descending=True, stable=True).indices
                allowed = int(torch.isfinite(estimate).sum())
                candidates = order[:min(num_candidates, allowed)].tolist()
                candidate_losses = [float(_batch_loss(model, _with_token(batch, slot, token), verbalizer,
                                                      batch_classes, caller)) for token in candidates]
            best = min(range(len(candidates)), key=candidate_losses.__getitem__) if candidates else None
            accepted = best is not None and candidate_losses[best] < loss_before
            if accepted:
                trigger_ids = trigger_ids[:slot] + [candidates[best]] + trigger_ids[slot + 1:]
            steps.append(SearchStep(slot, rows, candidates, candidate_losses, loss_before,
                                    candidate_losses[best] if accepted else loss_before, accepted, list(trigger_ids)))
    finally:
        model.train(was_training)
    return AutoPromptResult(TriggerTemplate(template.pattern, trigger_ids), trigger_ids,
                            tokenizer.convert_ids_to_tokens(trigger_ids), steps)


@dataclass
class LabelSearchResult:
    """What :func:`search_label_words` found.

    Attributes:
        label_words: ``{class: [word, ...]}``, best first, ready for ``Verbalizer(label_words, tokenizer)``.
        scores: ``[V, C]`` float, ``s(y, w) = p(y | W_out[w])`` for every tokenizer token w.
        weight: ``[C, H]`` the classifier's class vectors θ.
        bias: ``[C]`` the classifier's β.
        train_accuracy: the classifier's accuracy on the mask features it was trained on.
    """

    label_words: dict
    scores: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    train_accuracy: float


def mask_features(model: nn.Module, template: Template, tokenizer, texts, texts_b=None, *, batch_size: int = 32,
                  max_length: int | None = None) -> torch.Tensor:
    """``[N, H]`` float32: the input of the model's output embedding layer at each text's mask (for
    BERT the MLM head's transformed hidden state), computed without gradient.

    Args:
        model: a masked LM with ``get_output_embeddings()``.
        template: the prompt; a :class:`TriggerTemplate` uses its ``trigger_ids`` (mask tokens when unset).
        texts, texts_b: the N examples (``texts_b`` exactly when the pattern has ``{text_b}``).
        batch_size, max_length: rows per forward pass; :meth:`~deltakern.prompts.Template.encode`'s limit.

    Raises:
        ValueError: the model has no output embedding layer, or the template or texts are bad.
    """
    caller = "deltakern.autoprompt.mask_features"
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output_embeddings is None:
        raise ValueError(f"{caller}: the model has no output embedding layer (get_output_embeddings()); a masked LM "
                         f"with an LM head is needed")
    texts = _texts(caller, "texts", texts)
    texts_b = _texts_b(caller, template, texts_b, len(texts))
    captured = []
    handle = output_embeddings.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
    features = []
    try:
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                chunk_b = None if texts_b is None else texts_b[start:start + batch_size]
                batch = template.encode(tokenizer, texts[start:start + batch_size], chunk_b, max_length)
                batch = batch.to(output_embeddings.weight.device)
                captured.clear()
                model(**batch.model_inputs())
                hidden = captured[-1]
                # Virtual tokens of prompt tuning come first (as in PVP.logits): shift the positions.
                positions = batch.mask_positions + hidden.shape[1] - batch.input_ids.shape[1]
                features.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), positions].float())
    finally:
        handle.remove()
    return torch.cat(features)


def search_label_words(model: nn.Module, template: Template, tokenizer, texts, labels, texts_b=None, *,
                       num_words: int = 3, num_steps: int = 300, lr: float = 0.01, batch_size: int = 32,
                       max_length: int | None = None) -> LabelSearchResult:
    """AutoPrompt's label-word search (module docstring): the ``num_words`` best words per class.

    Only whole-word tokens are proposed: a token is kept when the tokenizer encodes its decoded text
    back to that single token (WordPiece ``##`` pieces and special tokens are skipped). Classes are
    ordered by their first appearance in ``labels``. Deterministic (zeros init, full-batch Adam).

    Args:
        model: a masked LM with ``get_output_embeddings()``.
        template: the prompt (a :class:`TriggerTemplate` with its triggers, or any Template).
        tokenizer: the model's tokenizer.
        texts, texts_b, labels: N training examples; labels are class names (at least 2 classes).
        num_words: label words per class (the paper's k).
        num_steps, lr: full-batch Adam steps and learning rate of the classifier.
        batch_size, max_length: for the forward passes collecting features.

    Raises:
        ValueError: fewer than 2 classes, labels not matching texts, bad counts or lr, or fewer than
            ``num_words`` whole-word tokens in the vocabulary.

    Returns:
        :class:`LabelSearchResult` (``scores [V, C]``, ``weight [C, H]``, ``bias [C]``).
    """
    caller = "deltakern.autoprompt.search_label_words"
    texts = _texts(caller, "texts", texts)
    if isinstance(labels, str) or not isinstance(labels, (list, tuple)) or len(labels) != len(texts):
        raise ValueError(f"{caller}: labels must be a list of {len(texts)} labels (one per text), got {labels!r}")
    classes = list(dict.fromkeys(labels))
    if len(classes) < 2:
        raise ValueError(f"{caller}: labels must name at least 2 classes, got {classes}")
    for argument, value in (("num_words", num_words), ("num_steps", num_steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{caller}: {argument} must be a positive int, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"{caller}: lr must be a positive finite number, got {lr!r}")
    features = mask_features(model, template, tokenizer, texts, texts_b, batch_size=batch_size, max_length=max_length)
    targets = torch.tensor([classes.index(label) for label in labels], device=features.device)
    weight = torch.zeros(len(classes), features.shape[1], device=features.device, requires_grad=True)
    bias = torch.zeros(len(classes), device=features.device, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad():
        for _ in range(num_steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(features @ weight.t() + bias, targets).backward()
            optimizer.step()
    weight, bias = weight.detach(), bias.detach()
    train_accuracy = float(((features @ weight.t() + bias).argmax(dim=1) == targets).float().mean())
    out_weight = model.get_output_embeddings().weight.detach().float()
    vocab_size = min(len(tokenizer), out_weight.shape[0])
    scores = torch.softmax(out_weight[:vocab_size] @ weight.t() + bias, dim=1)  # [V, C]
    special = set(tokenizer.all_special_ids)
    label_words = {}
    for c, label in enumerate(classes):
        words = []
        for token in torch.sort(scores[:, c], descending=True, stable=True).indices.tolist():
            word = tokenizer.decode([token])
            if token not in special and word.strip() and _token_ids(tokenizer, word) == [token]:
                words.append(word)
                if len(words) == num_words:
                    break
        if len(words) < num_words:
            raise ValueError(f"{caller}: the vocabulary has only {len(words)} whole-word tokens, fewer than "
                             f"num_words={num_words}")
        label_words[label] = words
    return LabelSearchResult(label_words, scores.cpu(), weight.cpu(), bias.cpu(), train_accuracy)
