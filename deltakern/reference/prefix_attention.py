"""Pure-PyTorch ground truth of ``prefix_attention``; autograd gives its backward.

Written for clarity, not speed: the prefix is expanded over the batch and concatenated in front
of the input keys, and a dense boolean mask is built. Every kernel is tested against this file.
"""

from __future__ import annotations

import math

import torch


def visible_mask(
    B: int,
    Lq: int,
    Lk: int,
    P: int,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Which keys each query sees: bool ``[B, 1, Lq, P + Lk]``, True = visible.

    Columns ``0 .. P-1`` are the prefix keys, columns ``P .. P+Lk-1`` the input keys ``0 .. Lk-1``.

    - Every query sees all P prefix keys (no causal mask, no padding mask on the prefix).
    - With ``causal``, query i (0-based of Lq) sees input key j (of Lk) when ``j <= i + Lk - Lq``:
      the mask is aligned bottom-right, as in FlashAttention, so the last query sees every input
      key and decoding with a KV cache (Lq < Lk) works. When Lq > Lk, the first ``Lq - Lk``
      queries see no input key.
    - ``key_padding_mask`` bool ``[B, Lk]`` (True = keep) hides padded input keys from every query.

    The size-1 head dimension broadcasts over the heads of the scores ``[B, H, Lq, P + Lk]``.
    """
    i = torch.arange(Lq, device=device).view(Lq, 1)
    j = torch.arange(Lk, device=device).view(1, Lk)
    if causal:
        input_visible = j <= i + (Lk - Lq)
    else:
        input_visible = torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    input_visible = input_visible.expand(B, 1, Lq, Lk)
    if key_padding_mask is not None:
        input_visible = input_visible & key_padding_mask.to(device).view(B, 1, 1, Lk)
    prefix_visible = torch.ones(B, 1, Lq, P, dtype=torch.bool, device=device)
    return torch.cat([prefix_visible, input_visible], dim=-1)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``softmax(q [Pk; k]ᵀ · scale + mask) [Pv; v]``: attention over a prefix plus the input keys.

    Shapes:
        q                  ``[B, Hq, Lq, D]``
        k, v               ``[B, Hkv, Lk, D]``
        prefix_k, prefix_v ``[Hkv, P, D]`` (one prefix shared by the batch) or ``[B, Hkv, P, D]``
        key_padding_mask   ``[B, Lk]`` bool, True = keep, or None (keep all)
        returns            ``[B, Hq, Lq, D]``, in q's dtype

    Semantics:
        - ``Hq % Hkv == 0`` (GQA/MQA): query head h uses kv head ``h // (Hq // Hkv)``, for the
          input keys and the prefix alike.
        - Every query sees all P prefix keys. The causal mask and ``key_padding_mask`` cover the
          input keys only; causal is aligned bottom-right: query i of Lq sees input key j of Lk
          when ``j <= i + Lk - Lq`` (see :func:`visible_mask`).
        - ``scale`` defaults to ``1 / sqrt(D)``.
        - A query row with no visible key (possible only when P = 0) outputs zeros, never NaN,
          and its backward is finite: it gives no gradient to anything.
        - P = 0 (prefix tensors with P = 0) is plain attention.

    Gradients (autograd) flow to q, k, v, prefix_k and prefix_v; for a shared prefix the
    gradient is summed over the batch. Computed in the inputs' dtype, without upcasting.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    P = prefix_k.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    # One set of keys/values per batch element: [prefix; input] along the sequence.
    if prefix_k.dim() == 3:
        prefix_k = prefix_k.unsqueeze(0).expand(B, -1, -1, -1)
        prefix_v = prefix_v.unsqueeze(0).expand(B, -1, -1, -1)
    keys = torch.cat([prefix_k, k], dim=2)  # [B, Hkv, P + Lk, D]
    values = torch.cat([prefix_v, v], dim=2)

    # GQA: repeat each kv head for its Hq // Hkv query heads (query head h -> kv head h // group).
    group = Hq // Hkv
    keys = keys.repeat_interleave(group, dim=1)  # [B, Hq, P + Lk, D]
    values = values.repeat_interleave(group, dim=1)

    scores = (q @ keys.transpose(-2, -1)) * scale  # [B, Hq, Lq, P + Lk]
    visible = visible_mask(B, Lq, Lk, P, causal, key_padding_mask, q.device)  # [B, 1, Lq, P + Lk]
    row_has_key = visible.any(dim=-1, keepdim=True)  # [B, 1, Lq, 1]

    scores = scores.masked_fill(~visible, float("-inf"))
    # A row without any visible key would be softmax(all -inf) = NaN. Give it finite scores so
    # neither pass makes a NaN, then zero its probabilities: the output row is 0 and, because
    # torch.where routes no gradient to the unselected branch, the row's backward is exactly 0.
    scores = torch.where(row_has_key, scores, 0.0)
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(row_has_key, probs, 0.0)
    return probs @ values  # [B, Hq, Lq, D]
