"""Intrinsic prompt tuning (Qin et al., 2021, "Exploring Universal Intrinsic Task Subspace via Prompt Tuning").

The paper's two stages:

1. Multi-task subspace finding (MSF): the soft prompts ``P_t`` ``[P, D]`` of several tasks, trained
   with ordinary prompt tuning, are decomposed through one low-dimensional space by an
   auto-encoder: an encoder maps a prompt to ``z_t`` ``[d_I]``, a decoder ``f`` maps ``z_t`` back,
   and the reconstruction error is minimised (:func:`fit_prompt_autoencoder`).
2. Intrinsic subspace tuning (IST): on a new task only ``z`` ``[d_I]`` is trained; the prompt the
   model reads is ``f(z)`` with ``f`` frozen (:func:`add_intrinsic_prompt`, riding on
   ``add_prompt``'s hooks, so the model is called unchanged).

Choices (the paper's where it states them, ours where it does not):
- Encoder and decoder are two-layer perceptrons with a tanh between: ``flatten → Linear(P·D, H) →
  tanh → Linear(H, d_I)`` and ``Linear(d_I, H) → tanh → Linear(H, P·D) → [P, D]``.
- Prompts are standardised before encoding and the decoder's output is un-standardised: the
  decoder holds the mean training prompt ``[P, D]`` and one scale (the root-mean-square deviation
  from it) as buffers, ``f(z) = mean + scale · MLP(z)``. Prompts trained on a real model have
  entries of the embeddings' scale (often 1e-2); standardising keeps the MLP's inputs and targets
  near unit scale whatever that scale is.

Not implemented: the paper's optional task loss during MSF (running each task's model with the
reconstructed prompt, ``L = L_rec + α L_task``); only the reconstruction objective is fitted.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .nn.prompt import IntrinsicPromptEncoder
from .patch.prompt import install_prompt


def _check_count(name: str, value, caller: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{caller}: {name} must be an int >= 1, got {value!r}")


class PromptDecoder(nn.Module):
    """``f``: an intrinsic vector ``z`` ``[..., d_I]`` to a prompt ``[..., P, D]``.

    ``mlp`` = Linear(d_I, H), tanh, Linear(H, P·D); the output is ``mean + scale · mlp(z)``, with
    ``mean`` ``[P, D]`` and ``scale`` ``[]`` buffers set from the training prompts (module docstring).
    """

    def __init__(self, num_virtual_tokens: int, token_dim: int, intrinsic_dim: int, hidden_size: int):
        super().__init__()
        self.num_virtual_tokens, self.token_dim, self.intrinsic_dim = num_virtual_tokens, token_dim, intrinsic_dim
        self.mlp = nn.Sequential(nn.Linear(intrinsic_dim, hidden_size), nn.Tanh(),
                                 nn.Linear(hidden_size, num_virtual_tokens * token_dim))
        self.register_buffer("mean", torch.zeros(num_virtual_tokens, token_dim))
        self.register_buffer("scale", torch.ones(()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat = self.mlp(z)
        return self.mean + self.scale * flat.unflatten(-1, (self.num_virtual_tokens, self.token_dim))


class PromptAutoEncoder(nn.Module):
    """The MSF auto-encoder: :meth:`encode` ``[T, P, D] → [T, d_I]``, ``decoder`` ``[T, d_I] → [T, P, D]``.

    ``encoder`` = Linear(P·D, H), tanh, Linear(H, d_I) on the standardised, flattened prompt.
    """

    def __init__(self, num_virtual_tokens: int, token_dim: int, intrinsic_dim: int, hidden_size: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(num_virtual_tokens * token_dim, hidden_size), nn.Tanh(),
                                     nn.Linear(hidden_size, intrinsic_dim))
        self.decoder = PromptDecoder(num_virtual_tokens, token_dim, intrinsic_dim, hidden_size)

    def encode(self, prompts: torch.Tensor) -> torch.Tensor:
        """``[..., P, D]`` prompts → ``[..., d_I]`` intrinsic vectors."""
        standardised = (prompts - self.decoder.mean) / self.decoder.scale
        return self.encoder(standardised.flatten(-2))

    def forward(self, prompts: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``f(encode(prompts))``, ``[..., P, D]``."""
        return self.decoder(self.encode(prompts))


@dataclass
class AutoEncoderFit:
    """What :func:`fit_prompt_autoencoder` returns.

    Attributes:
        autoencoder: the fitted :class:`PromptAutoEncoder` (its ``decoder`` is ``f``).
        losses: the reconstruction loss (mean squared error on standardised prompts) of each step.
        relative_errors: ``[T]``, ``‖f(encode(P_t)) − P_t‖ / ‖P_t‖`` (Frobenius) after fitting.
    """

    autoencoder: PromptAutoEncoder
    losses: list[float]
    relative_errors: torch.Tensor


def fit_prompt_autoencoder(prompts: torch.Tensor, intrinsic_dim: int = 8, hidden_size: int = 256,
                           steps: int = 1000, lr: float = 1e-3, seed: int = 0) -> AutoEncoderFit:
    """Find the intrinsic subspace of trained prompts (MSF): fit a :class:`PromptAutoEncoder` that
    reconstructs each prompt ``[P, D]`` of ``prompts`` ``[T, P, D]`` through ``z`` ``[d_I]``.

    Full-batch Adam on the mean squared error between the standardised prompts and their
    reconstructions, ``steps`` steps at learning rate ``lr``. The paper uses ``d_I`` from 5 up;
    its ``T`` is 100+ tasks. Deterministic given ``seed`` (the initialisation's; torch's global
    generator is left as it was). Runs on ``prompts``' device, in fp32.

    Raises:
        ValueError: ``prompts`` not a floating ``[T, P, D]`` tensor with T, P, D >= 1; a count
            (``intrinsic_dim``, ``hidden_size``, ``steps``) not an int >= 1; ``lr`` not positive.
    """
    caller = "deltakern.intrinsic_prompt.fit_prompt_autoencoder"
    if not isinstance(prompts, torch.Tensor) or prompts.dim() != 3 or not prompts.is_floating_point() \
            or prompts.numel() == 0:
        shape = tuple(prompts.shape) if isinstance(prompts, torch.Tensor) else type(prompts).__name__
        raise ValueError(f"{caller}: prompts must be a floating tensor [tasks, num_virtual_tokens, embedding width] "
                         f"with every size >= 1, got {shape}")
    _check_count("intrinsic_dim", intrinsic_dim, caller)
    _check_count("hidden_size", hidden_size, caller)
    _check_count("steps", steps, caller)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"{caller}: lr must be a positive number, got {lr!r}")
    targets = prompts.detach().float()
    _, num_virtual_tokens, token_dim = targets.shape
    # Seeded without disturbing torch's global generator (the caller's training keeps its random stream).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        autoencoder = PromptAutoEncoder(num_virtual_tokens, token_dim, intrinsic_dim, hidden_size)
    with torch.no_grad():
        mean = targets.mean(0)
        autoencoder.decoder.mean.copy_(mean)
        # One scale for all entries; a floor so that identical prompts (zero spread) do not divide by 0.
        autoencoder.decoder.scale.copy_((targets - mean).pow(2).mean().sqrt().clamp_min(1e-12))
    autoencoder.to(targets.device)
    standardised = (targets - autoencoder.decoder.mean) / autoencoder.decoder.scale
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        reconstruction = autoencoder.decoder.mlp(autoencoder.encoder(standardised.flatten(-2)))
        loss = nn.functional.mse_loss(reconstruction, standardised.flatten(-2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        errors = (autoencoder(targets) - targets).flatten(1).norm(dim=1) / targets.flatten(1).norm(dim=1)
    return AutoEncoderFit(autoencoder, losses, errors)


def add_intrinsic_prompt(model: nn.Module, decoder: PromptDecoder | PromptAutoEncoder,
                         z_init: torch.Tensor | None = None) -> nn.Module:
    """Intrinsic subspace tuning (IST): put the prompt ``f(z)`` before the input of ``model`` and
    return it, with ``z`` ``[d_I]`` the only trainable parameter (``model.deltakern_prompt.z``).

    The prompt rides on ``add_prompt``'s hooks (same attention mask, token types, labels, positions
    and ``generate()`` handling; see ``deltakern.patch.prompt``). ``model`` holds a frozen copy of
    ``decoder`` (the caller's is not touched), cast to the embeddings' device and dtype.
    ``deltakern.save`` writes ``f(z)`` as a PEFT ``PROMPT_TUNING`` checkpoint (where PEFT has a task
    type for the model), ``deltakern.save_prompt`` as a prompt file: z and the decoder are not saved.

    Args:
        decoder: ``f`` (a :class:`PromptDecoder`, or the :class:`PromptAutoEncoder` holding it).
        z_init: the starting ``z`` ``[d_I]``; zeros (``f(0)``) by default. A natural start is the
            mean of the training prompts' ``encode``.

    Raises:
        ValueError: ``decoder`` of another type, ``z_init`` not a floating ``[d_I]`` tensor, a
            decoder whose prompt width is not the model's embedding width, no input embeddings, or a
            prompt already present.
        NotImplementedError: question answering models (as ``add_prompt``).
    """
    caller = "deltakern.add_intrinsic_prompt"
    if isinstance(decoder, PromptAutoEncoder):
        decoder = decoder.decoder
    if not isinstance(decoder, PromptDecoder):
        raise ValueError(f"{caller}: decoder must be a PromptDecoder or PromptAutoEncoder (from "
                         f"fit_prompt_autoencoder), got {type(decoder).__name__}")
    if z_init is not None and (not isinstance(z_init, torch.Tensor) or not z_init.is_floating_point()
                               or tuple(z_init.shape) != (decoder.intrinsic_dim,)):
        got = f"{z_init.dtype} of shape {tuple(z_init.shape)}" if isinstance(z_init, torch.Tensor) else repr(z_init)
        raise ValueError(f"{caller}: z_init must be a floating tensor of shape (intrinsic_dim,) = "
                         f"{(decoder.intrinsic_dim,)}, got {got}")

    def make_prompt(token_dim: int, num_submodules: int) -> IntrinsicPromptEncoder:
        if token_dim != decoder.token_dim:
            raise ValueError(f"{caller}: the decoder makes prompts of width {decoder.token_dim}, the model's input "
                             f"embeddings have width {token_dim}")
        return IntrinsicPromptEncoder(copy.deepcopy(decoder), decoder.num_virtual_tokens, decoder.intrinsic_dim,
                                      num_submodules, z_init)

    install_prompt(model, make_prompt, caller)
    return model
