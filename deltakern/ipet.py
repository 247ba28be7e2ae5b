"""iPET (Schick & Schütze, 2021, "Exploiting Cloze Questions for Few Shot Text Classification and
Natural Language Inference", EACL): PET's first step (:mod:`deltakern.pet`) repeated over
generations, each generation's models trained on the labelled set T plus examples of the
unlabelled set U labelled by the previous generation.

:func:`ipet` trains generation 0 as PET does. For generation j >= 1, each PVP's model i gets
T plus ``n_j = min((d^j - 1) · |T|, |U|)`` examples of U (so that its training set has
``d^j · |T|`` examples as in the paper, ``|T^j| = d · |T^{j-1}|``, until U runs out), labelled by
the ensemble of ``max(1, round(share · (K - 1)))`` randomly chosen models of generation j - 1
*other than model i* (the paper's λ; K PVPs). The examples are drawn without replacement, per
class in proportion to T's label distribution (exact counts by largest remainder), within a
class with probability proportional to the ensemble's confidence (its largest class
probability at T = 1), as in PET. Where the ensemble predicts a class for fewer examples than its
share, all of them are taken and the shortfall is drawn from the remaining examples of U by
confidence (PET instead repeats the few examples of that class); every drawn example is
distinct and ``n_j`` is always reached. Every generation starts from fresh models
(``model_factory``), as in the paper.

Not implemented: the distillation of the last generation inside :func:`ipet` (call
:func:`deltakern.pet.soft_labels` and :func:`deltakern.pet.distill` on its last entry).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .pet import (_check_training, _class_indices, _class_logits, _combine, _int, _number, _pvps, _texts_b,
                  pvp_weights, train_pvp_model)
from .prompts import PVP, _texts

__all__ = ["IPETGeneration", "ipet"]


@dataclass
class IPETGeneration:
    """One generation of :func:`ipet`.

    Attributes:
        index: the generation, 0 for the first (plain PET on T).
        models: the K trained models, one per PVP.
        weights: K accuracies of the models on T before training (PET's ensemble weights).
        losses: K loss histories (``steps`` floats each).
        num_labeled: pseudo-labelled examples added to each model's training set:
            0 in generation 0, else ``min((d^j - 1) · |T|, |U|)``.
        labeled_indices: per model, the ``num_labeled`` distinct indices into ``unlabeled_texts``
            it was trained on (sorted).
        labeled_classes: per model, the class given to each of those examples (same order).
        annotators: per model, the indices of the previous generation's models whose ensemble
            labelled its examples (empty in generation 0).
    """

    index: int
    models: list
    weights: list[float]
    losses: list[list[float]]
    num_labeled: int
    labeled_indices: list[list[int]]
    labeled_classes: list[list[int]]
    annotators: list[list[int]]


def _apportion(total: int, counts: list[int]) -> list[int]:
    """``total`` split in proportion to ``counts``, exactly, by largest remainder (ties: lower index)."""
    whole = sum(counts)
    quotas = [total * c // whole for c in counts]
    remainders = sorted(range(len(counts)), key=lambda c: (-(total * counts[c] % whole), c))
    for c in remainders[:total - sum(quotas)]:
        quotas[c] += 1
    return quotas


def _draw(probs: torch.Tensor, count: int, quotas: list[int],
          generator: torch.Generator) -> tuple[list[int], list[int]]:
    """``count`` distinct rows of ``probs [N, C]`` and their argmax classes (module docstring)."""
    predicted, confidence = probs.argmax(-1), probs.max(-1).values
    taken = torch.zeros(len(probs), dtype=torch.bool)

    def sample(pool: torch.Tensor, k: int) -> None:
        if k >= len(pool):
            taken[pool] = True
        elif k > 0:  # PET draws by confidence so that likely mislabelled examples are rarer
            taken[pool[torch.multinomial(confidence[pool], k, replacement=False, generator=generator)]] = True

    for c, quota in enumerate(quotas):
        sample((predicted == c).nonzero().flatten(), quota)
    sample((~taken).nonzero().flatten(), count - int(taken.sum()))
    indices = taken.nonzero().flatten()
    return indices.tolist(), predicted[indices].tolist()


def ipet(pvps: list[PVP], model_factory: Callable[[int], nn.Module], texts, labels, unlabeled_texts, *,
         texts_b=None, unlabeled_texts_b=None, generations: int = 3, scale_factor: int = 5, share: float = 1.0,
         steps: int = 100, batch_size: int = 8, lr: float = 1e-5, alpha: float = 1e-4, weight_decay: float = 0.01,
         max_grad_norm: float | None = 1.0, seed: int = 0, eval_batch_size: int = 32,
         max_length: int | None = None) -> list[IPETGeneration]:
    """iPET: ``generations`` generations of one model per PVP (module docstring for the rules).

    Generation j builds K fresh models (``model_factory(i)`` for PVP i: the pretrained LM, with a
    delta method if wanted), weighs them by :func:`pvp_weights` on T, and trains model i with
    :func:`train_pvp_model` on T plus its ``n_j`` pseudo-labelled examples of U (with U for the
    MLM term when ``alpha > 0``). Those are labelled at temperature 1 by the weighted ensemble
    (:func:`soft_labels`' rule) of ``max(1, round(share · (K - 1)))`` models of generation j - 1
    other than model i, chosen at random. If every weight of a generation is 0 (no model right on T
    before training), its models are combined with equal weights for labelling.

    Distil the result with ``soft_labels(pvps, g.models, unlabeled_texts, g.weights)`` and
    :func:`distill`, ``g`` the last generation.

    Args:
        pvps: K PVPs with the same labels (K >= 2 when ``generations > 1``).
        model_factory: ``i -> model`` for PVP i, called once per PVP per generation.
        texts, texts_b, labels: T (class indices).
        unlabeled_texts, unlabeled_texts_b: U.
        generations: >= 1; 1 is PET without iPET.
        scale_factor: d, an int >= 2 (the paper: 5).
        share: λ in (0, 1], the share of the other models that label (the paper: 0.25 of 11).
        steps, batch_size, lr, alpha, weight_decay, max_grad_norm: for :func:`train_pvp_model`.
        seed: seeds the choice of annotators, the draws of examples, and each model's training.

    Returns:
        One :class:`IPETGeneration` per generation.

    Raises:
        ValueError: an empty or mixed PVP list, a single PVP with ``generations > 1``, a factory that
            is not callable or returns no module, generations < 1, scale_factor not an int >= 2,
            share outside (0, 1], bad texts or labels, or bad training settings.
    """
    caller = "deltakern.pet.ipet"
    pvps = _pvps(caller, pvps)
    count = len(pvps)
    generations = _int(caller, "generations", generations)
    scale_factor = _int(caller, "scale_factor", scale_factor, least=2)
    share = _number(caller, "share", share, low=0.0, high=1.0)
    if generations > 1 and count < 2:
        raise ValueError(f"{caller}: pvps must hold at least 2 PVPs for generations > 1: each model's examples are "
                         f"labelled by the other PVPs' models")
    if not callable(model_factory):
        raise ValueError(f"{caller}: model_factory must be a callable i -> model, got {type(model_factory).__name__}")
    texts = _texts(caller, "texts", texts)
    texts_b = _texts_b(caller, "texts_b", texts_b, len(texts))
    classes = _class_indices(caller, labels, pvps[0].verbalizer.num_classes, len(texts))
    unlabeled = _texts(caller, "unlabeled_texts", unlabeled_texts)
    unlabeled_b = _texts_b(caller, "unlabeled_texts_b", unlabeled_texts_b, len(unlabeled))
    if (texts_b is None) != (unlabeled_b is None):
        raise ValueError(f"{caller}: texts_b and unlabeled_texts_b must be given together (pseudo-labelled examples "
                         f"of U join T), got texts_b={'None' if texts_b is None else 'a list'} and "
                         f"unlabeled_texts_b={'None' if unlabeled_b is None else 'a list'}")
    _check_training(caller, steps, batch_size, lr, weight_decay, max_grad_norm)
    _number(caller, "alpha", alpha, low=0.0, high=1.0, low_open=False)
    _int(caller, "eval_batch_size", eval_batch_size)
    class_counts = torch.bincount(classes, minlength=pvps[0].verbalizer.num_classes).tolist()
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    results: list[IPETGeneration] = []
    previous_logits: list[torch.Tensor] = []
    previous_weights: list[float] = []
    for j in range(generations):
        num_labeled = 0 if j == 0 else min((scale_factor ** j - 1) * len(texts), len(unlabeled))
        indices, assigned, annotators = [[] for _ in pvps], [[] for _ in pvps], [[] for _ in pvps]
        if j > 0:
            quotas = _apportion(num_labeled, class_counts)
            for i in range(count):
                others = [k for k in range(count) if k != i]
                annotators[i] = sorted(rng.sample(others, max(1, round(share * len(others)))))
                probs = _combine([previous_logits[k] for k in annotators[i]],
                                 [previous_weights[k] for k in annotators[i]], 1.0)
                indices[i], assigned[i] = _draw(probs, num_labeled, quotas, generator)
        models = []
        for i in range(count):
            model = model_factory(i)
            if not isinstance(model, nn.Module):
                raise ValueError(f"{caller}: model_factory({i}) returned a {type(model).__name__}, not a "
                                 f"torch.nn.Module")
            models.append(model)
        weights = pvp_weights(pvps, models, texts, classes, texts_b=texts_b, batch_size=eval_batch_size,
                              max_length=max_length)
        losses = []
        for i, (pvp, model) in enumerate(zip(pvps, models)):
            _, history = train_pvp_model(
                pvp, model, texts + [unlabeled[u] for u in indices[i]], classes.tolist() + assigned[i],
                texts_b=texts_b + [unlabeled_b[u] for u in indices[i]] if texts_b is not None else None,
                unlabeled_texts=unlabeled if alpha > 0 else None, unlabeled_texts_b=unlabeled_b if alpha > 0 else None,
                alpha=alpha, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                max_grad_norm=max_grad_norm, seed=seed + 1000 * j + i, max_length=max_length)
            losses.append(history)
        results.append(IPETGeneration(j, models, weights, losses, num_labeled, indices, assigned, annotators))
        if j + 1 < generations:
            previous_logits = [_class_logits(p, m, unlabeled, unlabeled_b, eval_batch_size, max_length)
                               for p, m in zip(pvps, models)]
            # All-zero accuracies would leave PET's weighted mean undefined: fall back to the plain mean.
            previous_weights = weights if sum(weights) > 0 else [1.0] * count
    return results
