"""Verbalizers beyond PET's hand-written label words: KPT and ProtoVerb.

:class:`KnowledgeableVerbalizer` (KPT; Hu et al., 2021, "Knowledgeable Prompt-tuning: Incorporating
Knowledge into Prompt Verbalizer for Text Classification") scores many label words per class with
the MLM's log-probabilities at the mask, calibrates them by their prior on unlabeled text, refines
the word lists, and aggregates them by a mean or by learned weights. It is a
:class:`deltakern.prompts.Verbalizer`, so it plugs into :class:`~deltakern.prompts.PVP` and
:func:`~deltakern.prompts.ensemble`.

:class:`PrototypicalVerbalizer` (ProtoVerb; Cui et al., 2022, "Prototypical Verbalizer for
Prompt-based Few-shot Tuning") needs no label words: it projects the last hidden state at the mask,
learns one prototype per class with two contrastive losses, and classifies by cosine similarity to
the prototypes, alone or summed with a manual verbalizer. It reads hidden states, not the MLM head's
logits, so it is not a PVP verbalizer; it runs the model itself (:meth:`PrototypicalVerbalizer.logits`).

KPT word and class scores
-------------------------
For a label word w tokenized (on its own) into t_1..t_k and the MLM logits ``l`` at the mask:

    log p(w|x) = (1/k) Σ_j log_softmax(l)[t_j]           (multi-token: mean log-probability of its tokens)
    s(w|x)     = log p(w|x) - log prior(w)                (calibrated; without calibration s = log p(w|x))
    prior(w)   = (1/N) Σ_i p(w|x_i)                       (x_i: the N unlabeled texts given to ``calibrate``)
    class_logit(c) = Σ_{w in c, kept} a_w · s(w|x)       (a_w = 1/n_c for "mean", softmax of learned
                                                          per-word weights within the class for "weighted")

Without calibration the class logits differ from :class:`~deltakern.prompts.Verbalizer`'s (mean raw
logits) only by the row's log-sum-exp, the same for every class, so softmax and argmax agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .prompts import EncodedBatch, Template, Verbalizer, _mlm_logits, _texts, _token_ids

AGGREGATIONS = ("mean", "weighted")


def _check_mask_logits(caller: str, mask_logits: torch.Tensor, token_ids: torch.Tensor) -> None:
    if not isinstance(mask_logits, torch.Tensor) or mask_logits.dim() != 2:
        shape = tuple(mask_logits.shape) if isinstance(mask_logits, torch.Tensor) else type(mask_logits).__name__
        raise ValueError(f"{caller}: mask_logits must be [B, vocab], got {shape}")
    largest = int(token_ids.max())
    if largest >= mask_logits.shape[1]:
        raise ValueError(f"{caller}: the label words use token id {largest}, but mask_logits has a vocabulary of "
                         f"{mask_logits.shape[1]}")


def _positive_int(caller: str, argument: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{caller}: {argument} must be a positive int, got {value!r}")
    return value


class KnowledgeableVerbalizer(Verbalizer, nn.Module):
    """KPT: many label words per class, calibrated by their prior, refined, mean- or weight-aggregated.

    ``KnowledgeableVerbalizer({"sports": ["sports", "football", "tennis"], ...}, tokenizer)``. Words are
    tokenized and checked by :class:`~deltakern.prompts.Verbalizer` (same rules and errors: a class
    without words, a word outside the vocabulary). Word and class scores: module docstring.

    Use: ``calibrate(model, template, unlabeled_texts)`` (required when ``calibration=True``), then
    optionally ``refine(...)``, then ``PVP(template, verbalizer).logits(model, batch)``. With
    ``aggregation="weighted"`` the module has one parameter, ``word_weights``; give
    ``verbalizer.parameters()`` to the optimizer with the model's delta parameters.

    Args:
        label_words: ``{label: [word, ...]}``; the first word of a class is its anchor (the class name,
            which KPT expands from a knowledge base) for relevance refinement.
        tokenizer: a Hugging Face masked-LM tokenizer.
        aggregation: ``"mean"`` over a class's kept words, or ``"weighted"``: softmax within the class of
            a learned ``word_weights`` entry per word (initialised to 0, i.e. the mean).
        calibration: score words by ``log p(w|x) - log prior(w)`` (True; ``calibrate`` must run first) or
            by ``log p(w|x)`` (False; ``calibrate`` is then only needed for ``refine``).

    Attributes:
        words_flat: ``[(label, word), ...]`` for the W label words, in the order of every ``[W]`` tensor.
        word_class: ``[W]`` long, the class index of each word.
        keep: ``[W]`` bool buffer, False for words removed by ``refine``.
        log_prior: ``[W]`` buffer, ``log prior(w)`` after ``calibrate`` (NaN before; a buffer so that
            ``state_dict`` carries the calibration, the refinement and the weights).
        word_weights: ``[W]`` parameter with ``aggregation="weighted"``, else None.
    """

    def __init__(self, label_words: dict, tokenizer, aggregation: str = "mean", calibration: bool = True):
        caller = "deltakern.verbalizers.KnowledgeableVerbalizer"
        nn.Module.__init__(self)
        Verbalizer.__init__(self, label_words, tokenizer)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"{caller}: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if not isinstance(calibration, bool):
            raise ValueError(f"{caller}: calibration must be True or False, got {calibration!r}")
        self.aggregation, self.calibration = aggregation, calibration
        # The base class lays out token_ids word after word; the same tokenization gives each word's
        # token count, hence the [T, W] map averaging a word's tokens.
        self.words_flat = [(label, word) for label, words in self.words.items() for word in words]
        token_word = torch.zeros(len(self.token_ids), len(self.words_flat))
        column = 0
        for w, (_, word) in enumerate(self.words_flat):
            k = len(_token_ids(tokenizer, word))
            token_word[column:column + k, w] = 1.0 / k
            column += k
        self.register_buffer("token_word", token_word)
        self.register_buffer("word_class", torch.tensor([self.labels.index(label) for label, _ in self.words_flat]))
        self.register_buffer("keep", torch.ones(len(self.words_flat), dtype=torch.bool))
        self.register_buffer("log_prior", torch.full((len(self.words_flat),), float("nan")))
        self.word_weights = nn.Parameter(torch.zeros(len(self.words_flat))) if aggregation == "weighted" else None
        # [N, W] log p(w|x_i) on the calibration texts, kept for relevance refinement (not in state_dict).
        self.support_log_probs: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (f"KnowledgeableVerbalizer({self.kept_words!r}, aggregation={self.aggregation!r}, "
                f"calibration={self.calibration})")

    @property
    def kept_words(self) -> dict:
        """``{label: [word, ...]}``: the words still used (all of them before ``refine``)."""
        kept = {label: [] for label in self.labels}
        for (label, word), keep in zip(self.words_flat, self.keep.tolist()):
            if keep:
                kept[label].append(word)
        return kept

    @property
    def calibrated(self) -> bool:
        """Whether ``calibrate`` has run (or a calibrated ``state_dict`` was loaded)."""
        return not bool(self.log_prior.isnan().any())

    @property
    def prior(self) -> torch.Tensor | None:
        """``[W]`` prior probability of each word on the calibration texts (None before ``calibrate``)."""
        return self.log_prior.exp() if self.calibrated else None

    def word_log_probs(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` MLM logits at the mask → ``[B, W]`` ``log p(w|x)`` (mean over a word's tokens), in fp32
        (fp64 for fp64 logits): a log-softmax over the vocabulary in bf16 would lose the small probabilities."""
        _check_mask_logits("deltakern.verbalizers.KnowledgeableVerbalizer.word_log_probs", mask_logits, self.token_ids)
        dtype = torch.promote_types(mask_logits.dtype, torch.float32)
        log_probs = torch.log_softmax(mask_logits.to(dtype), dim=-1)[:, self.token_ids.to(mask_logits.device)]
        return log_probs @ self.token_word.to(device=mask_logits.device, dtype=dtype)

    def aggregation_weights(self) -> torch.Tensor:
        """``[C, W]``: row c holds the weights a_w of class c's kept words (summing to 1), 0 elsewhere."""
        member = (self.word_class.unsqueeze(0) == torch.arange(self.num_classes, device=self.keep.device).unsqueeze(1))
        member = member & self.keep.unsqueeze(0)
        if self.word_weights is None:
            return member.float() / member.sum(dim=1, keepdim=True)
        masked = self.word_weights.unsqueeze(0).masked_fill(~member, float("-inf"))
        return torch.softmax(masked, dim=1)

    def class_logits(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` MLM logits at the mask → ``[B, C]`` class logits (module docstring), in mask_logits' dtype.

        Raises:
            ValueError: mask_logits is not 2-D or too small for a label word's id, or ``calibration=True``
                and ``calibrate`` has not run.
        """
        caller = "deltakern.verbalizers.KnowledgeableVerbalizer.class_logits"
        if self.calibration and not self.calibrated:
            raise ValueError(f"{caller}: this verbalizer divides by the label words' prior; call "
                             f"calibrate(model, template, unlabeled_texts) first (or build it with calibration=False)")
        scores = self.word_log_probs(mask_logits)
        if self.calibration:
            scores = scores - self.log_prior.to(device=scores.device, dtype=scores.dtype)
        # .to() is a no-op when the verbalizer sits on the logits' device, and keeps word_weights' gradient otherwise.
        weights = self.aggregation_weights().to(device=scores.device, dtype=scores.dtype)
        return (scores @ weights.t()).to(mask_logits.dtype)

    def forward(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`class_logits`."""
        return self.class_logits(mask_logits)

    @torch.no_grad()
    def calibrate(self, model: nn.Module, template: Template, unlabeled_texts, texts_b=None, batch_size: int = 32,
                  max_length: int | None = None) -> torch.Tensor:
        """Estimate each word's contextualised prior from the model's mask distribution on unlabeled texts.

        ``prior(w) = (1/N) Σ_i p(w|x_i)``, with ``p(w|x) = exp(log p(w|x))`` (a multi-token word: the
        geometric mean of its tokens' probabilities). The model runs in eval mode without gradients
        (its training flag is restored) on batches of ``batch_size`` texts filled into ``template``.

        Args:
            model: the masked LM (with its delta, if any) that will be used with this verbalizer.
            template: the :class:`~deltakern.prompts.Template` of the PVP.
            unlabeled_texts, texts_b: N texts (and second texts if the pattern has ``{text_b}``).
            batch_size: texts per forward pass.
            max_length: as in :meth:`Template.encode`.

        Returns:
            ``[W]`` the prior (also stored: ``log_prior``; the per-text ``[N, W]`` log-probabilities
            are kept in ``support_log_probs`` for relevance refinement).

        Raises:
            ValueError: template is not a Template, bad texts or batch_size, or the model's output is
                not MLM logits.
        """
        caller = "deltakern.verbalizers.KnowledgeableVerbalizer.calibrate"
        if not isinstance(template, Template):
            raise ValueError(f"{caller}: template must be a deltakern.prompts.Template, got {type(template).__name__}")
        texts = _texts(caller, "unlabeled_texts", unlabeled_texts)
        if texts_b is not None:
            texts_b = _texts(caller, "texts_b", texts_b)
            if len(texts_b) != len(texts):
                raise ValueError(f"{caller}: unlabeled_texts has {len(texts)} entries, texts_b has {len(texts_b)}")
        batch_size = _positive_int(caller, "batch_size", batch_size)
        is_module = isinstance(model, nn.Module)
        parameter = next(model.parameters(), None) if is_module else None
        device = parameter.device if parameter is not None else self.keep.device
        was_training = is_module and model.training
        if is_module:
            model.eval()  # dropout would make the prior depend on the draw
        try:
            chunks = []
            for start in range(0, len(texts), batch_size):
                chunk_b = None if texts_b is None else texts_b[start:start + batch_size]
                batch = template.encode(self.tokenizer, texts[start:start + batch_size], chunk_b, max_length)
                chunks.append(self.word_log_probs(_mlm_logits(model, batch.to(device), caller)).to(self.keep.device))
        finally:
            if is_module:
                model.train(was_training)
        log_probs = torch.cat(chunks)
        self.support_log_probs = log_probs
        self.log_prior.copy_(torch.logsumexp(log_probs, dim=0) - math.log(log_probs.shape[0]))
        return self.prior

    def refine(self, prior_threshold: float | None = None, relevance: bool = False) -> dict:
        """Drop label words, KPT's refinement; a class always keeps at least one word.

        Frequency refinement (``prior_threshold``): drop every word whose ``prior(w)`` is below the
        threshold. Were a class to lose all its words, it keeps the one with the largest prior.

        Relevance refinement (``relevance=True``, after the frequency step), on the calibration texts:
        a word's vector ``q_w ∈ R^N`` is ``log p(w|x_i)`` centred over the N texts; its relevance to
        class y is ``r(w, y) = cos(q_w, q_{anchor(y)})``, with anchor(y) the first word of class y.
        The paper keeps w when ``R(w) = r(w, f(w)) / mean_{y≠f(w)} r(w, y) ≥ 1`` (f(w): w's class); this
        drops w when ``r(w, f(w)) ≤ 0`` or ``r(w, f(w)) < mean_{y≠f(w)} r(w, y)`` (the same rule for a
        positive denominator, and defined for any sign). Were a class to lose all its words, it keeps
        the one with the largest ``r(w, f(w)) - mean_{y≠f(w)} r(w, y)``. Anchors have r = 1 and stay
        unless the frequency step removed them.

        Returns:
            ``{label: [words dropped by this call]}``.

        Raises:
            ValueError: ``calibrate`` has not run, neither refinement asked for, a threshold that is
                not a finite non-negative number, relevance with one class or one calibration text.
        """
        caller = "deltakern.verbalizers.KnowledgeableVerbalizer.refine"
        if not self.calibrated:
            raise ValueError(f"{caller}: refinement uses the prior on unlabeled texts; call "
                             f"calibrate(model, template, unlabeled_texts) first")
        if prior_threshold is None and not relevance:
            raise ValueError(f"{caller}: pass prior_threshold=<float> and/or relevance=True")
        before = self.keep.clone()
        if prior_threshold is not None:
            if (isinstance(prior_threshold, bool) or not isinstance(prior_threshold, (int, float))
                    or not math.isfinite(prior_threshold) or prior_threshold < 0):
                raise ValueError(f"{caller}: prior_threshold must be a finite non-negative number, "
                                 f"got {prior_threshold!r}")
            self._keep_where(self.prior >= prior_threshold, self.log_prior)
        if relevance:
            if self.support_log_probs is None:
                raise ValueError(f"{caller}: relevance refinement needs the calibration texts' log-probabilities, "
                                 f"which state_dict does not carry; call calibrate(model, template, unlabeled_texts)")
            if self.num_classes < 2 or self.support_log_probs.shape[0] < 2:
                raise ValueError(f"{caller}: relevance refinement needs at least 2 classes and 2 calibration texts, "
                                 f"got {self.num_classes} classes and {self.support_log_probs.shape[0]} texts")
            own, margin = self._relevance()
            self._keep_where((own > 0) & (margin >= 0), margin)
        dropped = {label: [] for label in self.labels}
        for (label, word), was, now in zip(self.words_flat, before.tolist(), self.keep.tolist()):
            if was and not now:
                dropped[label].append(word)
        return dropped

    def _relevance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[W]`` ``r(w, f(w))`` and ``[W]`` ``r(w, f(w)) - mean_{y≠f(w)} r(w, y)`` (``refine``'s docstring)."""
        vectors = self.support_log_probs - self.support_log_probs.mean(dim=0, keepdim=True)  # [N, W]
        anchors = [next(w for w, (label, _) in enumerate(self.words_flat) if label == c) for c in self.labels]
        relevance = F.cosine_similarity(vectors.t().unsqueeze(1), vectors.t()[anchors].unsqueeze(0), dim=-1)  # [W, C]
        own = relevance.gather(1, self.word_class.unsqueeze(1)).squeeze(1)
        others = (relevance.sum(dim=1) - own) / (self.num_classes - 1)
        return own, own - others

    def _keep_where(self, passes: torch.Tensor, rank: torch.Tensor) -> None:
        """Keep the kept words that pass; a class left empty keeps its kept word of largest ``rank``."""
        keep = self.keep & passes
        for c in range(self.num_classes):
            in_class = self.keep & (self.word_class == c)
            if not keep[in_class].any():
                best = rank.masked_fill(~in_class, float("-inf")).argmax()
                keep[best] = True
        self.keep.copy_(keep)


def prototype_loss(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """ProtoVerb's instance–prototype loss: cross-entropy over cosine similarities to the prototypes.

    ``L = (1/B) Σ_i -log [exp(s(z_i, p_{y_i})) / Σ_c exp(s(z_i, p_c))]``, ``s(a, b) = cos(a, b) / τ``.

    Args:
        embeddings: ``[B, D]`` projected mask states z_i.
        prototypes: ``[C, D]`` one per class.
        labels: ``[B]`` class indices.
        temperature: τ > 0.
    """
    _check_contrastive("deltakern.verbalizers.prototype_loss", embeddings, labels, temperature, prototypes)
    similarities = F.normalize(embeddings, dim=-1) @ F.normalize(prototypes, dim=-1).t() / temperature
    return F.cross_entropy(similarities, labels)


def instance_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """ProtoVerb's instance–instance loss: each same-class pair against the anchor's other-class instances.

    ``L = mean_{(i, j): i≠j, y_i=y_j} -log [exp(s_ij) / (exp(s_ij) + Σ_{k: y_k≠y_i} exp(s_ik))]``,
    ``s_ij = cos(z_i, z_j) / τ``, over all ordered positive pairs of the batch (as the authors' code
    does per pair; the self pair i = j, a constant, is left out).

    Args:
        embeddings: ``[B, D]`` projected mask states.
        labels: ``[B]`` class indices; some class must appear at least twice.
        temperature: τ > 0.

    Raises:
        ValueError: bad shapes or temperature, or no two instances share a class.
    """
    caller = "deltakern.verbalizers.instance_loss"
    _check_contrastive(caller, embeddings, labels, temperature)
    normalized = F.normalize(embeddings, dim=-1)
    similarities = normalized @ normalized.t() / temperature  # [B, B]
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    if not positive.any():
        raise ValueError(f"{caller}: no two instances share a class (labels {labels.tolist()}); the loss needs a "
                         f"batch with at least two examples of some class")
    # log Σ_{k: y_k≠y_i} exp(s_ik) per anchor i, -inf when the batch has no other class.
    negatives = torch.logsumexp(similarities.masked_fill(same, float("-inf")), dim=1, keepdim=True)
    pair_losses = torch.logaddexp(similarities, negatives) - similarities  # [B, B]; -log(pos / (pos + neg))
    return pair_losses[positive].mean()


def _check_contrastive(caller: str, embeddings, labels, temperature, prototypes=None) -> None:
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        raise ValueError(f"{caller}: embeddings must be [B, D], got "
                         f"{tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else embeddings!r}")
    if (not isinstance(labels, torch.Tensor) or labels.dtype != torch.long
            or tuple(labels.shape) != (embeddings.shape[0],)):
        raise ValueError(f"{caller}: labels must be a long tensor [B={embeddings.shape[0]}], got "
                         f"{(labels.dtype, tuple(labels.shape)) if isinstance(labels, torch.Tensor) else labels!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{caller}: temperature must be a positive number, got {temperature!r}")
    if prototypes is not None:
        if prototypes.dim() != 2 or prototypes.shape[1] != embeddings.shape[1]:
            raise ValueError(f"{caller}: prototypes must be [C, D={embeddings.shape[1]}], got "
                             f"{tuple(prototypes.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= prototypes.shape[0]):
            raise ValueError(f"{caller}: labels must lie in [0, {prototypes.shape[0]}), got {labels.tolist()}")


class PrototypicalVerbalizer(nn.Module):
    """ProtoVerb: class prototypes in a projected space of the last hidden state at the mask.

    ``z = W h_mask`` (a bias-free linear projection, ``[H] → [D]``); class scores are
    ``cos(z, p_c) / τ`` and the prediction is their argmax. Training minimises
    ``instance_loss + prototype_loss`` (:meth:`loss`) over the projection, the prototypes and, if
    wanted, the model's delta parameters.

    With a ``manual`` verbalizer (same labels), the class scores are the sum of the two verbalizers'
    class log-probabilities, ``log_softmax(cos(z, p)/τ) + log_softmax(manual.class_logits(mask_logits))``:
    the paper sums the two verbalizers' scores; summing log-probabilities puts the cosines and the MLM
    logits on one scale (the authors' code z-scores each over the classes instead, which for two
    classes leaves only the sign).

    Args:
        labels: the class names, in class-index order.
        hidden_size: H, the model's hidden size (``model.config.hidden_size``).
        proto_dim: D, the projected size.
        temperature: τ of the similarities (losses and scores).
        manual: an optional :class:`~deltakern.prompts.Verbalizer` to ensemble with.

    Raises:
        ValueError: no labels, a bad size or temperature, a manual verbalizer that is not a Verbalizer
            or has other labels (or label order).
    """

    def __init__(self, labels: list, hidden_size: int, proto_dim: int = 64, temperature: float = 0.1,
                 manual: Verbalizer | None = None):
        super().__init__()
        caller = "deltakern.verbalizers.PrototypicalVerbalizer"
        if not isinstance(labels, (list, tuple)) or not labels:
            raise ValueError(f"{caller}: labels must be a non-empty list of class names, got {labels!r}")
        hidden_size = _positive_int(caller, "hidden_size", hidden_size)
        proto_dim = _positive_int(caller, "proto_dim", proto_dim)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"{caller}: temperature must be a positive number, got {temperature!r}")
        if manual is not None:
            if not isinstance(manual, Verbalizer):
                raise ValueError(f"{caller}: manual must be a deltakern.prompts.Verbalizer, got "
                                 f"{type(manual).__name__}")
            if manual.labels != list(labels):
                raise ValueError(f"{caller}: the manual verbalizer's labels {manual.labels} differ from labels "
                                 f"{list(labels)}")
        self.labels, self.hidden_size, self.temperature, self.manual = list(labels), hidden_size, temperature, manual
        self.projection = nn.Linear(hidden_size, proto_dim, bias=False)
        self.prototypes = nn.Parameter(nn.init.xavier_uniform_(torch.empty(len(self.labels), proto_dim)))

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def mask_outputs(self, model: nn.Module, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward with ``output_hidden_states=True``: the ``[B, H]`` last hidden state and the
        ``[B, V]`` MLM logits at each row's mask (virtual tokens of prompt tuning are skipped as in PVP).

        Raises:
            ValueError: the model returns no hidden states, or states of the wrong shape.
        """
        caller = "deltakern.verbalizers.PrototypicalVerbalizer.mask_outputs"
        output = model(**batch.model_inputs(), output_hidden_states=True)
        hidden_states = getattr(output, "hidden_states", None)
        if not hidden_states:
            raise ValueError(f"{caller}: the model returned no hidden_states for output_hidden_states=True; "
                             f"ProtoVerb needs the last hidden state at the mask")
        hidden = hidden_states[-1]
        rows, length = batch.input_ids.shape
        if hidden.dim() != 3 or hidden.shape[0] != rows or hidden.shape[1] < length:
            raise ValueError(f"{caller}: the last hidden state must be [B={rows}, L>={length}, H], got "
                             f"{tuple(hidden.shape)}")
        # _mlm_logits runs "a model" on the batch; given this output, it picks the mask logits by PVP's
        # rule and checks without a second forward.
        mask_logits = _mlm_logits(lambda **_: output, batch, caller)
        positions = batch.mask_positions.to(hidden.device) + hidden.shape[1] - length
        return hidden[torch.arange(rows, device=hidden.device), positions], mask_logits

    def embed(self, mask_hidden: torch.Tensor) -> torch.Tensor:
        """``[B, H]`` mask states → ``[B, D]`` projected z."""
        if not isinstance(mask_hidden, torch.Tensor) or mask_hidden.dim() != 2 \
                or mask_hidden.shape[1] != self.hidden_size:
            shape = tuple(mask_hidden.shape) if isinstance(mask_hidden, torch.Tensor) else type(mask_hidden).__name__
            raise ValueError(f"deltakern.verbalizers.PrototypicalVerbalizer: mask_hidden must be "
                             f"[B, hidden_size={self.hidden_size}], got {shape}")
        return self.projection(mask_hidden)

    def similarities(self, mask_hidden: torch.Tensor) -> torch.Tensor:
        """``[B, H]`` → ``[B, C]`` cosine similarity of z to each prototype."""
        return F.normalize(self.embed(mask_hidden), dim=-1) @ F.normalize(self.prototypes, dim=-1).t()

    def class_logits(self, mask_hidden: torch.Tensor, mask_logits: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, C]`` class scores: ``cos/τ``, or with a manual verbalizer the sum of the two class
        log-probabilities (class docstring), which needs ``mask_logits`` ``[B, V]``.

        Raises:
            ValueError: bad shapes, or mask_logits missing with a manual verbalizer.
        """
        scores = self.similarities(mask_hidden) / self.temperature
        if self.manual is None:
            return scores
        if mask_logits is None:
            raise ValueError("deltakern.verbalizers.PrototypicalVerbalizer.class_logits: this verbalizer ensembles a "
                             "manual verbalizer and needs mask_logits [B, vocab]")
        manual = self.manual.class_logits(mask_logits)
        return torch.log_softmax(scores, dim=-1) + torch.log_softmax(manual.to(scores.dtype), dim=-1)

    def forward(self, mask_hidden: torch.Tensor, mask_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Same as :meth:`class_logits`."""
        return self.class_logits(mask_hidden, mask_logits)

    def logits(self, model: nn.Module, batch: EncodedBatch) -> torch.Tensor:
        """Run ``model`` on ``batch`` and return the ``[B, C]`` class scores (differentiable)."""
        mask_hidden, mask_logits = self.mask_outputs(model, batch)
        return self.class_logits(mask_hidden, mask_logits)

    def predict(self, model: nn.Module, batch: EncodedBatch) -> torch.Tensor:
        """``[B]`` class indices: argmax of :meth:`logits`."""
        return self.logits(model, batch).argmax(dim=-1)

    def loss(self, mask_hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``instance_loss + prototype_loss`` on the projected ``[B, H]`` mask states, labels ``[B]``."""
        embeddings = self.embed(mask_hidden)
        return (instance_loss(embeddings, labels, self.temperature)
                + prototype_loss(embeddings, self.prototypes, labels, self.temperature))
