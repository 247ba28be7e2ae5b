"""``LadderSideNetwork``: the side network of LST (ladder side-tuning, Sung et al., 2022) and its
ladder connections, beside a frozen backbone of L layers of width d.

With ``h_0`` the backbone's embeddings, ``h_i`` its hidden state after layer i (i = 1..L, before
the final norm), every ``h_i`` of shape ``[B, T, d]`` and the side stream of width ``d_s = d / r``:

    side_in_1     = down_0(h_0)
    side_out_i    = side_layer_i(side_in_i)                                  i = 1..L
    side_in_{i+1} = mu_i * down_i(h_i) + (1 - mu_i) * side_out_i,            mu_i = sigmoid(alpha_i / T)
    output        = up(norm(side_in_{L+1}))                                  [B, T, d]

``down_i`` are ``[d_s, d]`` linear maps (the ladder), ``up`` is ``[d, d_s]``, ``alpha`` ``[L]``
starts at 0 (every gate 0.5) and T is the gate temperature (0.1 in the paper). Side layer i reads
the side stream mixed with the backbone's state *after* layer i-1, the order of the authors'
code, so a side layer pruned from backbone layer i sees the states that layer saw.

The module only holds the parameters and the math; :mod:`deltakern.patch.ladder_side` feeds it
the backbone's states one layer at a time while the backbone runs without autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .delta import DeltaModule


class _SiluMul(torch.autograd.Function):
    """``silu(gate) * up``, keeping only ``gate`` and ``up`` for backward (silu recomputed there).
    Eager autograd keeps ``silu(gate)`` as well: one ``[B, T, intermediate/r]`` tensor more per side
    layer (2.7 MiB of the 49 MiB the end-to-end CPU shape saved)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        sigmoid = torch.sigmoid(gate)
        # d silu(g) / dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
        return grad * up * sigmoid * (1 + gate * (1 - sigmoid)), grad * gate * sigmoid


class SwiGLUSideMLP(nn.Module):
    """A side layer's feed-forward block ``down(silu(gate(x)) * up(x))`` (Llama's MLP, same
    parameter names ``gate_proj``, ``up_proj``, ``down_proj``), with the product taken by
    :class:`_SiluMul`. ``x``: ``[..., d_s]`` → ``[..., d_s]``."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


class LadderSideNetwork(DeltaModule):
    """Side layers, ladder down-projections, gates and the up-projection of LST.

    Args:
        layers: the L side blocks, each called as ``layer(x, attention_mask=..., position_ids=...,
            position_embeddings=...)`` on ``x [B, T, d_s]`` and returning ``[B, T, d_s]`` (a
            transformers decoder layer of width d_s).
        norm: the side network's final norm over ``d_s``.
        rotary: computes the side layers' ``(cos, sin)`` from ``(x, position_ids)``.
        hidden_size: d, the backbone's width.
        side_hidden_size: d_s.
        gate_temperature: T > 0.

    Parameters: ``layers.*``; ``downsamples.i.weight`` ``[d_s, d]`` (i = 0..L); ``gate_logits``
    (alpha) ``[L]``, zeros; ``norm.*``; ``upsample.weight`` ``[d, d_s]``, zeros, so a model with a
    fresh side network computes what its backbone computed.
    """

    def __init__(self, layers: list[nn.Module], norm: nn.Module, rotary: nn.Module, hidden_size: int,
                 side_hidden_size: int, gate_temperature: float):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.downsamples = nn.ModuleList(nn.Linear(hidden_size, side_hidden_size, bias=False)
                                         for _ in range(len(layers) + 1))
        self.gate_logits = nn.Parameter(torch.zeros(len(layers)))
        self.norm = norm
        self.upsample = nn.Linear(side_hidden_size, hidden_size, bias=False)
        nn.init.zeros_(self.upsample.weight)
        # Holds no parameter (inv_freq is a non-persistent buffer), so it is not part of the delta.
        self.rotary_emb = rotary
        self.gate_temperature = gate_temperature

    def gates(self) -> torch.Tensor:
        """``mu = sigmoid(alpha / T)``, ``[L]``: the share of the backbone's state in each mix."""
        return torch.sigmoid(self.gate_logits / self.gate_temperature)

    def position_embeddings(self, stream: torch.Tensor,
                            position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The side layers' rotary ``(cos, sin)``, each ``[B or 1, T, side head_dim]``."""
        return self.rotary_emb(stream, position_ids)

    def start(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``side_in_1 = down_0(h_0)``: ``[B, T, d]`` → ``[B, T, d_s]``."""
        return self.downsamples[0](embeddings)

    def step(self, index: int, stream: torch.Tensor, backbone_state: torch.Tensor, attention_mask,
             position_ids: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Side layer ``index + 1`` on ``stream`` (``side_in``, ``[B, T, d_s]``), then the ladder mix with
        the backbone's state after its layer ``index + 1`` (``[B, T, d]``); returns the next ``side_in``.
        ``attention_mask`` is what the backbone's layer received (None, or a mask of its attention
        implementation), so the side layer attends to the same positions."""
        side_out = self.layers[index](stream, attention_mask=attention_mask, position_ids=position_ids,
                                      position_embeddings=position_embeddings)
        mu = self.gates()[index]
        # mu * down + (1 - mu) * side_out, written so that autograd keeps one [B, T, d_s] tensor
        # (down - side_out, for mu's gradient) instead of two: 1 MiB less of the 50 MiB saved at the
        # end-to-end CPU shape (4 layers, 1024 tokens, d_s = 64).
        return side_out + mu * (self.downsamples[index + 1](backbone_state) - side_out)

    def output(self, stream: torch.Tensor) -> torch.Tensor:
        """``up(norm(side_in_{L+1}))``: ``[B, T, d_s]`` → ``[B, T, d]``, added to the backbone's last state."""
        return self.upsample(self.norm(stream))
