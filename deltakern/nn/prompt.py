"""The virtual tokens ``add_prompt``'s hooks put before the input: :class:`PromptEncoder` (prompt
tuning and P-tuning v1, PEFT's layout) and :class:`IntrinsicPromptEncoder` (intrinsic prompt
tuning: the prompt is a frozen decoder's output ``f(z)``), both :class:`VirtualTokens`."""

from __future__ import annotations

import torch
from torch import nn

from .delta import DeltaModule

# P-tuning's reparameterisations, by add_prompt's name, with PEFT's encoder_reparameterization_type.
ENCODERS = {"lstm": "LSTM", "mlp": "MLP"}


class VirtualTokens(DeltaModule):
    """What a prompted model reads: ``forward()`` gives all ``S·P`` rows ``[S·P, D]`` (PEFT's
    ``prompt_embeddings``; ``S`` is 2 for encoder-decoder models, whose second half is never read),
    :meth:`prompts` the ``P`` virtual tokens ``[P, D]``. ``peft_type`` is what a checkpoint records."""

    num_virtual_tokens: int
    peft_type: str

    def prompts(self) -> torch.Tensor:
        """The ``P`` virtual-token embeddings the model reads, ``[P, D]``."""
        return self()[: self.num_virtual_tokens]


class PromptEncoder(VirtualTokens):
    """The virtual tokens of prompt tuning, optionally reparameterised by P-tuning's prompt encoder.

    ``embedding``: ``nn.Embedding(S·P, D)``. With ``encoder="lstm"``: ``lstm_head`` (bidirectional
    LSTM, ``encoder_num_layers`` layers, hidden ``H``) then ``mlp_head`` = Linear(2H, 2H), ReLU,
    Linear(2H, D); with ``encoder="mlp"``: ``mlp_head`` = Linear(D, H), ReLU, Linear(H, H), ReLU,
    Linear(H, D). Names and shapes are PEFT's ``PromptEncoder``'s, so state dicts are interchangeable.
    """

    def __init__(self, num_virtual_tokens: int, token_dim: int, num_submodules: int = 1, encoder: str | None = None,
                 encoder_hidden_size: int | None = None, encoder_num_layers: int = 2):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(num_virtual_tokens * num_submodules, token_dim)
        self.encoder = encoder
        # What the checkpoint records; kept after fold_prompt_encoder so a folded P-tuning model
        # still saves as P-tuning.
        self.peft_type = "PROMPT_TUNING" if encoder is None else "P_TUNING"
        self.encoder_hidden_size = encoder_hidden_size or token_dim
        self.encoder_num_layers = encoder_num_layers
        self.reparameterization = ENCODERS.get(encoder, "MLP")
        hidden = self.encoder_hidden_size
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(token_dim, hidden, num_layers=encoder_num_layers, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, token_dim))
        elif encoder == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, token_dim))

    def forward(self) -> torch.Tensor:
        """All ``S·P`` prompt embeddings, ``[S·P, D]`` (what PEFT saves as ``prompt_embeddings``)."""
        rows = self.embedding.weight
        if self.encoder == "lstm":
            return self.mlp_head(self.lstm_head(rows.unsqueeze(0))[0]).squeeze(0)
        if self.encoder == "mlp":
            return self.mlp_head(rows)
        return rows

    def fold(self) -> None:
        """Replace the encoder by the embeddings it produces: ``embedding`` becomes ``forward()``."""
        with torch.no_grad():
            folded = self().detach().clone()
        self.embedding.weight = nn.Parameter(folded, requires_grad=self.embedding.weight.requires_grad)
        for name in ("lstm_head", "mlp_head"):
            if hasattr(self, name):
                delattr(self, name)
        self.encoder = None


class IntrinsicPromptEncoder(VirtualTokens):
    """Intrinsic prompt tuning (Qin et al., 2021): the ``P`` virtual tokens are ``decoder(z)``.

    ``z``: the trainable intrinsic vector ``[d_I]`` (zeros unless ``z_init`` ``[d_I]`` is given).
    ``decoder``: a module mapping ``[d_I]`` to ``[P, D]``; it is this module's own (the caller's is
    not touched) and frozen, since only ``z`` is the delta. For an encoder-decoder model (``S = 2``)
    the unused second half of PEFT's layout repeats the first, so a saved checkpoint has PEFT's shape.
    Checkpoints record ``PROMPT_TUNING``: what is saved is ``f(z)``, not ``z`` or the decoder.
    """

    peft_type = "PROMPT_TUNING"

    def __init__(self, decoder: nn.Module, num_virtual_tokens: int, intrinsic_dim: int, num_submodules: int = 1,
                 z_init: torch.Tensor | None = None):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.num_submodules = num_submodules
        self.decoder = decoder
        z = torch.zeros(intrinsic_dim) if z_init is None else z_init.detach().clone()
        self.z = nn.Parameter(z)

    def delta_parameters(self):
        return iter((self.z,))

    def forward(self) -> torch.Tensor:
        """``[f(z)] * S`` stacked, ``[S·P, D]``."""
        return self.decoder(self.z).repeat(self.num_submodules, 1)
