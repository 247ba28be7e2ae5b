"""``PromptEncoder``: the virtual tokens of prompt tuning and P-tuning v1 (PEFT's layout)."""

from __future__ import annotations

import torch
from torch import nn

from .delta import DeltaModule

# P-tuning's reparameterisations, by add_prompt's name, with PEFT's encoder_reparameterization_type.
ENCODERS = {"lstm": "LSTM", "mlp": "MLP"}


class PromptEncoder(DeltaModule):
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

    def prompts(self) -> torch.Tensor:
        """The ``P`` virtual-token embeddings the model reads, ``[P, D]``."""
        return self()[: self.num_virtual_tokens]

    def fold(self) -> None:
        """Replace the encoder by the embeddings it produces: ``embedding`` becomes ``forward()``."""
        with torch.no_grad():
            folded = self().detach().clone()
        self.embedding.weight = nn.Parameter(folded, requires_grad=self.embedding.weight.requires_grad)
        for name in ("lstm_head", "mlp_head"):
            if hasattr(self, name):
                delattr(self, name)
        self.encoder = None
