"""PET's training pipeline and iPET (Schick & Schütze, 2021, "Exploiting Cloze Questions for Few Shot
Text Classification and Natural Language Inference", EACL).

PET trains one masked LM per pattern-verbalizer pair (:class:`~deltakern.prompts.PVP`) on a small
labelled set T, combines the trained models into an ensemble that labels a large unlabelled set U
with soft labels, and distils the ensemble into one sequence classifier; :mod:`deltakern.ipet` repeats the first
step over generations. Built on :mod:`deltakern.prompts`; the model is only called, so a deltakern
delta method (``add_lora``, ``add_prefix``, ``add_prompt``, ...) on it stands in for full fine-tuning.

Loss (auxiliary language modelling)
-----------------------------------
For a labelled batch with class logits ``l = pvp.logits(model, batch)`` ``[B, C]`` and an unlabelled
batch ``u``::

    L = (1 - alpha) · CE(l, y) + alpha · L_MLM(u)          (alpha = 1e-4 in the paper)

``CE`` is the mean cross-entropy of softmax(l) over the B rows; ``L_MLM`` is BERT's masked-LM loss
(:func:`mask_tokens`: 15% of the non-special, non-padding tokens selected, of these 80% replaced by
the mask token, 10% by a random token, 10% kept; mean cross-entropy over the selected tokens). As
in PET, the unlabelled texts are encoded with the PVP's pattern. Without an unlabelled batch the
loss is the plain ``CE`` (PET without auxiliary LM).

Ensemble and distillation
-------------------------
Each PVP's model is weighted by its accuracy on T *before* training (:func:`pvp_weights`, PET's
"wmean"). The ensemble's soft labels average the models' *class logits* with these weights and
then apply a softmax with temperature T = 2 (:func:`soft_labels`)::

    s(x) = Σ_i w_i · l_i(x) / Σ_i w_i,       q(x) = softmax(s(x) / T)

:func:`distill` trains a sequence classifier (logits ``z``) on U with PET's distillation loss
``T² · KL(q || softmax(z / T))`` averaged over the batch.

Not implemented: several training repetitions per pattern (PET trains 3 and ensembles all),
learning-rate warm-up and decay, gradient accumulation, label words of several tokens read
through several masks (the authors' follow-up, NAACL 2021; :mod:`deltakern.prompts` averages a
word's token logits at its one mask instead), priming and dev-set evaluation.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .prompts import PVP, EncodedBatch, _texts

__all__ = ["distill", "mask_tokens", "pet_loss", "pvp_weights", "soft_labels", "train_pvp_model"]

IGNORE_INDEX = -100  # targets of tokens that are not MLM targets (PyTorch's cross-entropy default)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------

def _int(caller: str, name: str, value, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{caller}: {name} must be an int >= {least}, got {value!r}")
    return value


def _number(caller: str, name: str, value, *, low: float, high: float = math.inf, low_open: bool = True,
            high_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{caller}: {name} must be a finite number in {interval}, got {value!r}")
    return float(value)


def _temperature(caller: str, value) -> float:
    return _number(caller, "temperature", value, low=0.0, high=math.inf, high_open=True)


def _pvps(caller: str, pvps) -> list[PVP]:
    if isinstance(pvps, PVP) or not isinstance(pvps, (list, tuple)) or not pvps:
        raise ValueError(f"{caller}: pvps must be a non-empty list of deltakern.prompts.PVP, got {pvps!r}")
    for i, pvp in enumerate(pvps):
        if not isinstance(pvp, PVP):
            raise ValueError(f"{caller}: pvps[{i}] is a {type(pvp).__name__}, not a deltakern.prompts.PVP")
    for i, pvp in enumerate(pvps[1:], start=1):
        if pvp.labels != pvps[0].labels:
            raise ValueError(f"{caller}: every PVP must have the labels {pvps[0].labels} in this order; pvps[{i}] "
                             f"has {pvp.labels}")
    return list(pvps)


def _models(caller: str, models, count: int) -> list:
    if isinstance(models, nn.Module) or not isinstance(models, (list, tuple)) or len(models) != count:
        got = f"a list of {len(models)}" if isinstance(models, (list, tuple)) else type(models).__name__
        raise ValueError(f"{caller}: models must be a list of {count} models, one per PVP, got {got}")
    for i, model in enumerate(models):
        if not callable(model):
            raise ValueError(f"{caller}: models[{i}] is a {type(model).__name__}, not a model")
    return list(models)


def _class_indices(caller: str, labels, num_classes: int, count: int) -> torch.Tensor:
    """``labels`` (ints or a 1-D integer tensor) → ``[count]`` long tensor, each in ``[0, num_classes)``."""
    if isinstance(labels, torch.Tensor):
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"{caller}: labels must be a 1-D integer tensor of class indices, got dtype "
                             f"{labels.dtype} and shape {tuple(labels.shape)}")
        values = labels.tolist()
    elif isinstance(labels, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        values = list(labels)
    else:
        raise ValueError(f"{caller}: labels must be a list of class indices (ints) or a 1-D integer tensor, "
                         f"got {labels!r}")
    if len(values) != count:
        raise ValueError(f"{caller}: labels has {len(values)} entries, expected {count} (one per example)")
    for i, value in enumerate(values):
        if not 0 <= value < num_classes:
            raise ValueError(f"{caller}: labels[{i}] = {value} is out of range for {num_classes} classes "
                             f"(valid: 0..{num_classes - 1})")
    return torch.tensor(values, dtype=torch.long)


def _weights(caller: str, weights, count: int) -> list[float]:
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist() if weights.dim() == 1 else None
    if (not isinstance(weights, (list, tuple)) or len(weights) != count
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
                       for w in weights)
            or sum(weights) <= 0):
        raise ValueError(f"{caller}: weights must be {count} finite non-negative numbers (one per PVP) with a "
                         f"positive sum, got {weights!r}")
    return [float(w) for w in weights]


def _texts_b(caller: str, name: str, texts_b, count: int) -> list[str] | None:
    if texts_b is None:
        return None
    texts_b = _texts(caller, name, texts_b)
    if len(texts_b) != count:
        raise ValueError(f"{caller}: {name} has {len(texts_b)} entries, expected {count} (one per text)")
    return texts_b


def _trainable(caller: str, model) -> list[nn.Parameter]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{caller}: model {type(model).__name__} has no trainable parameters (every parameter has "
                         f"requires_grad=False)")
    return params


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _device(model) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model):
    """Inference without dropout, the model's mode restored afterwards (PET evaluates in eval mode)."""
    was_training = isinstance(model, nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _class_logits(pvp: PVP, model, texts: list[str], texts_b: list[str] | None, batch_size: int,
                  max_length: int | None) -> torch.Tensor:
    """``[N, C]`` float32 class logits on the CPU, computed in batches without gradient."""
    device, chunks = _device(model), []
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(texts), batch_size):
            part_b = texts_b[start:start + batch_size] if texts_b is not None else None
            batch = pvp.encode(texts[start:start + batch_size], part_b, max_length).to(device)
            chunks.append(pvp.logits(model, batch).float().cpu())
    return torch.cat(chunks)


def _combine(logits: list[torch.Tensor], weights: list[float], temperature: float) -> torch.Tensor:
    """PET's ensemble rule: ``softmax((Σ_i w_i l_i / Σ_i w_i) / T)`` over ``[N, C]`` logits."""
    total = sum(weights)
    mean = sum(w / total * l for w, l in zip(weights, logits))
    return torch.softmax(mean / temperature, dim=-1)


class _Cycler:
    """Example indices in shuffled passes: each pass visits every example once, then reshuffles."""

    def __init__(self, count: int, rng: random.Random):
        self.count, self.rng, self.order = count, rng, []

    def take(self, size: int) -> list[int]:
        out = []
        while len(out) < size:
            if not self.order:
                self.order = list(range(self.count))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out


def _step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], loss: torch.Tensor,
          max_grad_norm: float | None) -> None:
    optimizer.zero_grad()
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()


def _check_training(caller: str, steps, batch_size, lr, weight_decay, max_grad_norm) -> None:
    _int(caller, "steps", steps)
    _int(caller, "batch_size", batch_size)
    _number(caller, "lr", lr, low=0.0)
    _number(caller, "weight_decay", weight_decay, low=0.0, low_open=False)
    if max_grad_norm is not None:
        _number(caller, "max_grad_norm", max_grad_norm, low=0.0)


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------

def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer,
                generator: torch.Generator | None = None,
                probability: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking for the MLM loss.

    Each token that is attended to (``attention_mask == 1``) and is not one of the tokenizer's
    special tokens (``all_special_ids``: [CLS], [SEP], [PAD], [UNK] and the pattern's own [MASK],
    which thus never becomes a target) is selected with ``probability``; a selected token is
    replaced by the mask token with probability 0.8, by a token drawn uniformly from
    ``range(len(tokenizer))`` with probability 0.1, and kept with probability 0.1.

    All draws come from ``generator`` on the CPU (three tensors of ``[B, L]``: selection, action,
    random token), so the result depends on its seed alone, not on the device.

    Args:
        input_ids: ``[B, L]`` token ids (not modified).
        attention_mask: ``[B, L]``, 1 for tokens, 0 for padding.
        tokenizer: the Hugging Face tokenizer of the ids (mask token and special ids).
        generator: a CPU ``torch.Generator``; None draws from torch's global generator.
        probability: the selection rate, in (0, 1].

    Returns:
        ``(masked_ids, targets)``, both ``[B, L]`` long on ``input_ids``' device: the ids with the
        replacements, and the original id at each selected position, ``-100`` elsewhere.

    Raises:
        ValueError: ids and mask not 2-D of one shape, a probability outside (0, 1], or a tokenizer
            without a mask token.
    """
    caller = "deltakern.pet.mask_tokens"
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"{caller}: input_ids and attention_mask must both be [B, L], got {tuple(input_ids.shape)} "
                         f"and {tuple(attention_mask.shape)}")
    _number(caller, "probability", probability, low=0.0, high=1.0)
    if getattr(tokenizer, "mask_token_id", None) is None:
        raise ValueError(f"{caller}: the tokenizer has no mask_token_id; a masked-LM tokenizer is needed")
    shape, ids = input_ids.shape, input_ids.detach().cpu()
    select = torch.rand(shape, generator=generator)
    action = torch.rand(shape, generator=generator)
    random_ids = torch.randint(len(tokenizer), shape, generator=generator)
    special = torch.isin(ids, torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=ids.dtype))
    selected = attention_mask.detach().cpu().bool() & ~special & (select < probability)
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    masked = ids.clone()
    masked[to_mask] = tokenizer.mask_token_id
    masked[to_random] = random_ids[to_random]
    targets = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
    return masked.to(input_ids.device), targets.to(input_ids.device)


def _ids_and_mask(caller: str, batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, EncodedBatch):
        return batch.input_ids, batch.attention_mask
    if isinstance(batch, Mapping) and "input_ids" in batch and "attention_mask" in batch:
        return batch["input_ids"], batch["attention_mask"]
    raise ValueError(f"{caller}: mlm_batch must be an EncodedBatch (pvp.encode(unlabeled_texts)) or a mapping with "
                     f"input_ids and attention_mask, got {type(batch).__name__}")


def _mlm_loss(caller: str, model, mlm_batch, tokenizer, generator) -> torch.Tensor | None:
    """BERT's MLM loss on ``mlm_batch``; None when no token was selected."""
    input_ids, attention_mask = _ids_and_mask(caller, mlm_batch)
    masked, targets = mask_tokens(input_ids, attention_mask, tokenizer, generator)
    if not bool((targets != IGNORE_INDEX).any()):
        return None
    out = model(input_ids=masked, attention_mask=attention_mask)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.dim() != 3 or logits.shape[0] != masked.shape[0] or logits.shape[1] < masked.shape[1]:
        raise ValueError(f"{caller}: the model must return MLM logits [B={masked.shape[0]}, L>={masked.shape[1]}, "
                         f"vocab], got shape {tuple(logits.shape)}")
    # Prompt tuning puts its virtual tokens first; their logits have no targets.
    logits = logits[:, logits.shape[1] - masked.shape[1]:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def pet_loss(pvp: PVP, model, batch: EncodedBatch, labels, mlm_batch=None, alpha: float = 1e-4, *,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """PET's training loss, a scalar: ``(1 - alpha) · CE + alpha · MLM`` (module docstring).

    ``CE`` is the mean cross-entropy of the PVP's class logits ``[B, C]`` against ``labels``;
    ``MLM`` is the mean cross-entropy over the tokens of ``mlm_batch`` that :func:`mask_tokens`
    selects (with ``generator``), the model's MLM logits ``[B', L', V]`` read at them. Without
    ``mlm_batch`` the loss is ``CE`` alone; if no token of ``mlm_batch`` is selected (a tiny
    batch) the MLM term is 0 and the loss ``(1 - alpha) · CE``.

    Note the paper's weighting: alpha weighs the MLM term and ``1 - alpha`` the CE term (PET's
    code writes ``alpha`` for the CE weight, 0.9999).

    Args:
        pvp: the pattern-verbalizer pair.
        model: a masked LM (``logits [B, L, V]``), possibly with a delta method.
        batch: ``pvp.encode(texts)``, ``[B, L]``.
        labels: ``B`` class indices (ints or a 1-D integer tensor), indexing ``pvp.labels``.
        mlm_batch: unlabelled texts encoded with the pattern (``pvp.encode(unlabeled_texts)``), or a
            mapping with ``input_ids`` and ``attention_mask`` ``[B', L']``; None for no MLM term.
        alpha: in [0, 1]; the paper uses 1e-4.
        generator: a CPU ``torch.Generator`` for the masking.

    Raises:
        ValueError: pvp not a PVP, batch not an EncodedBatch, labels of another length or out of
            range, alpha outside [0, 1], an mlm_batch of another type, model outputs of another shape.
    """
    caller = "deltakern.pet.pet_loss"
    if not isinstance(pvp, PVP):
        raise ValueError(f"{caller}: pvp must be a deltakern.prompts.PVP, got {type(pvp).__name__}")
    if not isinstance(batch, EncodedBatch):
        raise ValueError(f"{caller}: batch must be an EncodedBatch (pvp.encode(texts)), got {type(batch).__name__}")
    alpha = _number(caller, "alpha", alpha, low=0.0, high=1.0, low_open=False)
    classes = _class_indices(caller, labels, pvp.verbalizer.num_classes, batch.input_ids.shape[0])
    logits = pvp.logits(model, batch).float()
    ce = F.cross_entropy(logits, classes.to(logits.device))
    if mlm_batch is None:
        return ce
    mlm = _mlm_loss(caller, model, mlm_batch, pvp.verbalizer.tokenizer, generator)
    return (1 - alpha) * ce if mlm is None else (1 - alpha) * ce + alpha * mlm


# ---------------------------------------------------------------------------------------------
# Training one model per PVP
# ---------------------------------------------------------------------------------------------

def train_pvp_model(pvp: PVP, model: nn.Module, texts, labels, *, texts_b=None, unlabeled_texts=None,
                    unlabeled_texts_b=None, alpha: float = 1e-4, steps: int = 100, batch_size: int = 8,
                    unlabeled_batch_size: int | None = None, lr: float = 1e-5, weight_decay: float = 0.01,
                    max_grad_norm: float | None = 1.0, seed: int = 0,
                    max_length: int | None = None) -> tuple[nn.Module, list[float]]:
    """Fine-tune ``model`` for ``pvp`` with :func:`pet_loss` and return ``(model, losses)``.

    A plain loop of ``steps`` AdamW steps (``lr``, ``weight_decay``, gradients clipped to norm
    ``max_grad_norm``; no schedule) over the parameters of ``model`` that require grad: after
    ``deltakern.add_lora(model, r=...)`` (or ``add_prefix``, ``add_prompt``, ...) only the delta's
    parameters train, the base stays bit for bit as it was. Each step takes ``batch_size`` labelled
    examples, in shuffled passes over ``texts``, and, when ``unlabeled_texts`` is given and
    ``alpha > 0``, ``unlabeled_batch_size`` (default ``batch_size``) unlabelled texts encoded with
    the pattern for the MLM term. The model trains in the mode it is in (``model.train()`` for
    dropout) and in place. Deterministic given ``seed`` (data order and masking; dropout draws from
    torch's global generator).

    Args:
        texts, texts_b: the N labelled inputs (``texts_b`` exactly when the pattern has ``{text_b}``).
        labels: N class indices into ``pvp.labels``.
        unlabeled_texts, unlabeled_texts_b: unlabelled inputs for PET's auxiliary MLM loss.

    Returns:
        ``(model, losses)``: the same model, trained; ``losses[s]`` is step s's loss (a float).

    Raises:
        ValueError: bad texts or labels (a label out of range names its index), a model without
            trainable parameters, steps / batch sizes not ints >= 1, lr <= 0, weight_decay < 0,
            max_grad_norm <= 0, alpha outside [0, 1].
    """
    caller = "deltakern.pet.train_pvp_model"
    if not isinstance(pvp, PVP):
        raise ValueError(f"{caller}: pvp must be a deltakern.prompts.PVP, got {type(pvp).__name__}")
    params = _trainable(caller, model)
    texts = _texts(caller, "texts", texts)
    texts_b = _texts_b(caller, "texts_b", texts_b, len(texts))
    classes = _class_indices(caller, labels, pvp.verbalizer.num_classes, len(texts))
    _check_training(caller, steps, batch_size, lr, weight_decay, max_grad_norm)
    alpha = _number(caller, "alpha", alpha, low=0.0, high=1.0, low_open=False)
    unlabeled_batch_size = _int(caller, "unlabeled_batch_size",
                                batch_size if unlabeled_batch_size is None else unlabeled_batch_size)
    if unlabeled_texts is not None:
        unlabeled_texts = _texts(caller, "unlabeled_texts", unlabeled_texts)
        unlabeled_texts_b = _texts_b(caller, "unlabeled_texts_b", unlabeled_texts_b, len(unlabeled_texts))
    use_mlm = unlabeled_texts is not None and alpha > 0  # alpha = 0 would only spend a forward pass
    device = _device(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    labeled = _Cycler(len(texts), rng)
    unlabeled = _Cycler(len(unlabeled_texts), rng) if use_mlm else None
    losses = []
    for _ in range(steps):
        rows = labeled.take(batch_size)
        batch = pvp.encode([texts[i] for i in rows], [texts_b[i] for i in rows] if texts_b else None, max_length)
        mlm_batch = None
        if unlabeled is not None:
            u = unlabeled.take(unlabeled_batch_size)
            mlm_batch = pvp.encode([unlabeled_texts[i] for i in u],
                                   [unlabeled_texts_b[i] for i in u] if unlabeled_texts_b else None,
                                   max_length).to(device)
        loss = pet_loss(pvp, model, batch.to(device), classes[rows], mlm_batch, alpha, generator=generator)
        _step(optimizer, params, loss, max_grad_norm)
        losses.append(loss.item())
    return model, losses


# ---------------------------------------------------------------------------------------------
# Ensemble
# ---------------------------------------------------------------------------------------------

def pvp_weights(pvps: list[PVP], models: list, texts, labels, *, texts_b=None, batch_size: int = 32,
                max_length: int | None = None) -> list[float]:
    """Each PVP's weight for the ensemble: its model's accuracy on the labelled set.

    PET weighs each model by its accuracy on the training set *before* training (the untrained
    masked LM read through the PVP: how well the pattern suits the task zero-shot), so call this
    with the models as they are before :func:`train_pvp_model`. Predictions are the argmax of the
    class logits (the first class on ties), computed in eval mode without gradient.

    Args:
        pvps: K PVPs with the same labels; models: K models, one per PVP.
        texts, texts_b: the N labelled inputs; labels: N class indices.

    Returns:
        K floats in [0, 1]: ``weights[i] = (# correct of models[i] with pvps[i]) / N``.

    Raises:
        ValueError: an empty or mixed PVP list, a models list of another length, bad texts, labels
            of another length or out of range, batch_size not an int >= 1.
    """
    caller = "deltakern.pet.pvp_weights"
    pvps = _pvps(caller, pvps)
    models = _models(caller, models, len(pvps))
    texts = _texts(caller, "texts", texts)
    texts_b = _texts_b(caller, "texts_b", texts_b, len(texts))
    classes = _class_indices(caller, labels, pvps[0].verbalizer.num_classes, len(texts))
    _int(caller, "batch_size", batch_size)
    return [(_class_logits(p, m, texts, texts_b, batch_size, max_length).argmax(-1) == classes).float().mean().item()
            for p, m in zip(pvps, models)]


def soft_labels(pvps: list[PVP], models: list, unlabeled_texts, weights, temperature: float = 2.0, *,
                texts_b=None, batch_size: int = 32, max_length: int | None = None) -> torch.Tensor:
    """The ensemble's soft labels ``[N, C]`` (float32, CPU), PET's rule:

        q = softmax((Σ_i w_i · l_i / Σ_i w_i) / temperature)

    with ``l_i = pvps[i].logits(models[i], ·)`` ``[N, C]`` the i-th model's class logits. The
    *logits* are averaged with the weights, then one softmax at ``temperature`` is taken (not an
    average of the models' probabilities). PET uses ``temperature = 2`` for distillation and the
    weights of :func:`pvp_weights`. Computed in eval mode without gradient.

    Args:
        pvps: K PVPs with the same labels; models: K models, one per PVP.
        unlabeled_texts, texts_b: the N inputs.
        weights: K finite non-negative numbers with a positive sum.
        temperature: > 0.

    Raises:
        ValueError: an empty or mixed PVP list, models or weights of another length, negative,
            non-finite or all-zero weights, a temperature <= 0, bad texts.
    """
    caller = "deltakern.pet.soft_labels"
    pvps = _pvps(caller, pvps)
    models = _models(caller, models, len(pvps))
    weights = _weights(caller, weights, len(pvps))
    temperature = _temperature(caller, temperature)
    texts = _texts(caller, "unlabeled_texts", unlabeled_texts)
    texts_b = _texts_b(caller, "texts_b", texts_b, len(texts))
    _int(caller, "batch_size", batch_size)
    logits = [_class_logits(p, m, texts, texts_b, batch_size, max_length) for p, m in zip(pvps, models)]
    return _combine(logits, weights, temperature)


# ---------------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------------

def distill(model: nn.Module, tokenizer, texts, soft_labels: torch.Tensor, temperature: float = 2.0, *,
            texts_b=None, steps: int = 100, lr: float = 1e-5, batch_size: int = 8, weight_decay: float = 0.01,
            max_grad_norm: float | None = 1.0, seed: int = 0, max_length: int | None = None) -> list[float]:
    """Train a sequence classifier on the ensemble's soft labels; return the loss of each step.

    Each step takes ``batch_size`` texts (shuffled passes), tokenizes them plainly
    (``tokenizer(texts[, texts_b], padding=True)``, all its outputs passed to the model) and
    minimises PET's distillation loss

        T² · (1/B) Σ_b KL(q_b || softmax(z_b / T))

    with ``z = model(...).logits`` ``[B, C]``, ``q`` the rows of ``soft_labels`` (already softened
    at T by :func:`soft_labels`) and ``T = temperature`` (the T² keeps the gradients' scale as T
    changes, as in Hinton et al. and PET). AdamW over the trainable parameters as in
    :func:`train_pvp_model`; the model trains in the mode it is in.

    Args:
        model: e.g. ``BertForSequenceClassification`` with C labels on the same LM (built by the caller).
        tokenizer: its tokenizer.
        texts, texts_b: the N unlabelled inputs.
        soft_labels: ``[N, C]`` probabilities (rows non-negative, summing to 1).

    Returns:
        ``losses``: ``steps`` floats.

    Raises:
        ValueError: bad texts, soft_labels not ``[N, C]`` probabilities, a model whose logits are not
            ``[B, C]``, temperature <= 0, a model without trainable parameters, bad training settings.
    """
    caller = "deltakern.pet.distill"
    params = _trainable(caller, model)
    texts = _texts(caller, "texts", texts)
    texts_b = _texts_b(caller, "texts_b", texts_b, len(texts))
    targets = soft_labels
    if (not isinstance(targets, torch.Tensor) or targets.dim() != 2 or targets.shape[0] != len(texts)
            or not targets.dtype.is_floating_point):
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"{caller}: soft_labels must be a float tensor [N={len(texts)}, C], got {shape}")
    if (not bool(torch.isfinite(targets).all()) or bool((targets < 0).any())
            or not torch.allclose(targets.sum(-1).double(), torch.ones(len(texts), dtype=torch.float64), atol=1e-4)):
        raise ValueError(f"{caller}: soft_labels must hold probabilities: each row non-negative, summing to 1")
    temperature = _temperature(caller, temperature)
    _check_training(caller, steps, batch_size, lr, weight_decay, max_grad_norm)
    device = _device(model)
    targets = targets.detach().float()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    order = _Cycler(len(texts), random.Random(seed))
    losses = []
    for _ in range(steps):
        rows = order.take(batch_size)
        encoded = tokenizer([texts[i] for i in rows], [texts_b[i] for i in rows] if texts_b else None,
                            padding=True, truncation=max_length is not None, max_length=max_length,
                            return_tensors="pt")
        out = model(**{k: v.to(device) for k, v in encoded.items()})
        logits = out.logits if hasattr(out, "logits") else out[0]
        if logits.dim() != 2 or logits.shape != (len(rows), targets.shape[1]):
            raise ValueError(f"{caller}: the model must return class logits [B={len(rows)}, C={targets.shape[1]}] "
                             f"(C from soft_labels), got shape {tuple(logits.shape)}")
        log_p = F.log_softmax(logits.float() / temperature, dim=-1)
        loss = F.kl_div(log_p, targets[rows].to(device), reduction="batchmean") * temperature ** 2
        _step(optimizer, params, loss, max_grad_norm)
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------------------
# iPET
# ---------------------------------------------------------------------------------------------
