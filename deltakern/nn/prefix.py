"""``PrefixEncoder``: the trainable prefix of prefix tuning and P-tuning v2."""

from __future__ import annotations

import torch
from torch import nn

from .delta import DeltaModule


class PrefixEncoder(DeltaModule):
    """Per-layer key and value prefixes, laid out as PEFT's prefix tuning lays them out.

    ``num_virtual_tokens`` (P) trainable positions give every layer a key prefix and a value
    prefix of shape ``[num_kv_heads, P, head_dim]``, shared by the batch, ready for
    :func:`deltakern.prefix_attention`.

    Two parameterisations, as in PEFT:
      - direct (``projection_hidden=None``): ``embedding.weight`` of shape
        ``[P, num_layers · 2 · Hkv · D]`` holds the prefixes themselves;
      - reparameterised: ``embedding.weight`` ``[P, Hkv · D]`` passes through ``transform`` =
        Linear(Hkv·D → projection_hidden) → Tanh → Linear(projection_hidden → num_layers·2·Hkv·D).

    Mapping from PEFT: the parameter names are PEFT's ``PrefixEncoder``'s (``embedding.weight``,
    ``transform.0/2.weight/bias``), so its state dict loads as is, and a PEFT ``prompt_embeddings``
    tensor ``[P, num_layers · 2 · Hkv · D]`` is exactly ``embedding.weight`` of the direct form
    (:meth:`load_prompt_embeddings`). In that flat row, columns are ordered (layer, key/value,
    head, dim): layer l's keys are the block ``2l``, its values the block ``2l + 1``, each
    ``Hkv · D`` wide and viewed as ``[Hkv, D]``; PEFT sets ``token_dim = Hkv · D`` for
    grouped-query models, which is this module's width.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_virtual_tokens: int,
                 projection_hidden: int | None = None):
        super().__init__()
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("num_virtual_tokens", num_virtual_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"deltakern.nn.PrefixEncoder: {name} must be an int >= 1, got {value!r}")
        if projection_hidden is not None and (not isinstance(projection_hidden, int) or projection_hidden < 1):
            raise ValueError(f"deltakern.nn.PrefixEncoder: projection_hidden must be None or an int >= 1, got {projection_hidden!r}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_virtual_tokens = num_virtual_tokens
        token_dim = num_kv_heads * head_dim
        width = num_layers * 2 * token_dim
        if projection_hidden is None:
            self.embedding = nn.Embedding(num_virtual_tokens, width)
            self.transform = None
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, projection_hidden), nn.Tanh(), nn.Linear(projection_hidden, width))

    def prompt_embeddings(self) -> torch.Tensor:
        """The flat prefixes ``[P, num_layers · 2 · Hkv · D]`` (PEFT's ``prompt_embeddings`` layout)."""
        weight = self.embedding.weight
        return weight if self.transform is None else self.transform(weight)

    def forward(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(prefix_k, prefix_v)]`` per layer, each ``[num_kv_heads, P, head_dim]``."""
        flat = self.prompt_embeddings()
        per_block = flat.view(self.num_virtual_tokens, 2 * self.num_layers, self.num_kv_heads, self.head_dim)
        blocks = per_block.permute(1, 2, 0, 3)  # [2·layers, Hkv, P, D]
        return [(blocks[2 * layer], blocks[2 * layer + 1]) for layer in range(self.num_layers)]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prefix_k, prefix_v)`` of layer ``index``, each ``[num_kv_heads, P, head_dim]``.

        Computes only that layer's columns of :meth:`prompt_embeddings` (for the reparameterised
        form, only that layer's rows of the last Linear), so attention layers can fetch their own
        prefix inside their forward, which stays correct under activation checkpointing.
        """
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_layers:
            raise ValueError(f"deltakern.nn.PrefixEncoder.layer: index must be an int in [0, {self.num_layers}), got {index!r}")
        width = 2 * self.num_kv_heads * self.head_dim
        columns = slice(index * width, (index + 1) * width)
        if self.transform is None:
            flat = self.embedding.weight[:, columns]
        else:
            hidden = self.transform[1](self.transform[0](self.embedding.weight))
            last = self.transform[2]
            flat = nn.functional.linear(hidden, last.weight[columns], last.bias[columns])
        kv = flat.reshape(self.num_virtual_tokens, 2, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return kv[0], kv[1]

    @torch.no_grad()
    def load_prompt_embeddings(self, prompt_embeddings: torch.Tensor) -> None:
        """Load PEFT's flat ``prompt_embeddings`` ``[P, num_layers · 2 · Hkv · D]`` (direct form only)."""
        if self.transform is not None:
            raise NotImplementedError(
                "deltakern.nn.PrefixEncoder: prompt_embeddings hold projected prefixes; load them into a "
                "PrefixEncoder built without projection_hidden"
            )
        if tuple(prompt_embeddings.shape) != tuple(self.embedding.weight.shape):
            raise ValueError(
                f"deltakern.nn.PrefixEncoder: prompt_embeddings must be {tuple(self.embedding.weight.shape)} "
                f"= [P, num_layers·2·Hkv·D], got {tuple(prompt_embeddings.shape)}"
            )
        self.embedding.weight.copy_(prompt_embeddings)

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"num_virtual_tokens={self.num_virtual_tokens}, projection={self.transform is not None}")
