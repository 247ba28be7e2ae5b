"""``add_ladder_side``: LST, ladder side-tuning (Sung et al., 2022, "LST: Ladder Side-Tuning for
Parameter and Memory Efficient Transfer Learning"), for Llama-style models (Llama, Qwen2, Mistral).

What runs
---------
``model.deltakern_ladder_side`` is one :class:`deltakern.nn.LadderSideNetwork` (its docstring has
the equations): L decoder layers of the backbone's own class, built from a copy of its config with
``hidden_size``, ``intermediate_size`` and ``head_dim`` divided by the reduction r (the number of
attention and key/value heads is kept, so grouped-query models with few key/value heads reduce by
8 too), ladder down-projections ``[d/r, d]`` from the embeddings and from every layer's output,
gates ``sigmoid(alpha_i / T)`` and an up-projection ``[d, d/r]``. With SiLU (all three families)
each side layer's MLP is a :class:`deltakern.nn.ladder_side.SwiGLUSideMLP`: the same weights and
names, its product ``silu(gate) * up`` keeping one tensor less for backward.

Hooks feed it while the model runs its own forward, so ``model(**batch)``, ``.loss`` and the task
head are unchanged:
- a pre-hook on the decoder stack (``model.model``) turns autograd off for the backbone, and a
  forward hook (``always_call``, so an exception restores it too) turns it back to what it was:
  the backbone records no graph and keeps nothing for backward, and its layers are not
  checkpointed (transformers checkpoints only with autograd on); the side layers are, when
  ``gradient_checkpointing_enable()`` was called;
- hooks on each backbone layer run the side network one layer behind it, with autograd as the
  caller had it, and with the mask and positions the backbone's layer received (so padding and
  the attention implementation are the backbone's). Only the current side state and the side's
  own activations are kept, never a list of the backbone's states;
- a forward hook on the final norm replaces its output by ``norm(h_L + up(norm_s(side)))``: the
  up-projected side output is *added* to the backbone's last hidden state (before the final norm),
  as the paper does for T5, and the frozen final norm and LM head (or any head on
  ``model.model``) read the sum. ``up`` starts at zero, so a fresh side network leaves the model's
  outputs unchanged, and gradients flow from the loss through the frozen head into the side.
What is kept for backward: the side network's activations, the head's, and the inputs of the
ladder down-projections (the backbone's ``h_i``, which their weight gradients need); none of the
backbone's internal activations.

Initialisation (``init``)
-------------------------
``"pruned"`` (default), structured magnitude pruning, weight rows ranked by their squared L2 norm:
- the d/r residual-stream dimensions R with the largest summed squared norms of the rows that
  write them (``o_proj`` and ``down_proj`` rows of every layer), shared by all side layers;
- per layer, the intermediate/r FFN channels with the largest ``|gate_proj row|² + |up_proj row|²``;
- per layer, the head_dim/r query/key dimensions whose ``q_proj`` and ``k_proj`` rows (summed over
  all heads) are largest, chosen as rotary pairs (t, t + head_dim/2) so rotate-half stays
  consistent; the head_dim/r value dimensions by the ``v_proj`` rows; the same dimensions in every
  head;
- every side weight is the backbone's sliced to those rows and columns (norm weights and biases
  too), not rescaled: each side layer starts with an RMSNorm that restores its input's scale. The
  side layers use their own rotary frequencies (of head_dim/r), so the init is a starting point,
  not an exact sub-network;
- ``down_i`` selects R (``down_i[k, R[k]] = 1``): the side network starts as the pruned backbone
  fed with the backbone's own states; ``alpha = 0``; ``up = 0``.
``"random"``: side linear weights ~ N(0, initializer_range²) (biases 0, norms 1), the ladder too.

Not implemented: a KV cache for the side network, so ``generate()`` works with
``use_cache=False`` (each step recomputes the sequence) and a call that continues from a filled
cache raises ``NotImplementedError``; stacking with other deltakern methods (the backbone gets no
gradient, so deltas inside it would not train): ``add_ladder_side`` refuses a model that has them;
Fisher-information pruning.

Checkpoint (ours; PEFT has no LST): ``deltakern_lst.json`` (format, version, reduction,
gate_temperature) and ``deltakern_lst.safetensors`` with the side network's parameters by their
names in it (``layers.0.self_attn.q_proj.weight``, ``downsamples.0.weight``, ``gate_logits``, ...).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import LadderSideNetwork
from ..nn.ladder_side import SwiGLUSideMLP
from ..registry import E2EProviders, MethodSpec, OwnFormat, register_method
from .common import check_config, delta_parameter_ids, freeze_base, load_checked

SIDE_ATTRIBUTE = "deltakern_ladder_side"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
INITS = ("pruned", "random")
FORMAT = "deltakern-lst"
FORMAT_VERSION = 1
_CONFIG_KEYS = ("format", "format_version", "reduction", "gate_temperature")
_CALLER = "deltakern.add_ladder_side"


@dataclass
class _Run:
    """What one forward of the model passes between the hooks: the caller's autograd mode, the
    side stream ``[B, T, d/r]``, and the mask and positions the current backbone layer received."""

    grad_enabled: bool
    stream: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None


def _decoder(model: nn.Module, caller: str) -> nn.Module:
    """The decoder stack (``model.model``) of a supported model, or NotImplementedError naming what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    decoder = getattr(model, "model", None)
    if model_type not in SUPPORTED_MODEL_TYPES or not all(
            hasattr(decoder, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        raise NotImplementedError(
            f"{caller}: LST supports Llama-style models ({', '.join(SUPPORTED_MODEL_TYPES)}) whose decoder stack "
            f"model.model has embed_tokens, layers, norm and rotary_emb; got {type(model).__name__} "
            f"(model_type={model_type!r})")
    return decoder


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def side_config(config, reduction: int, caller: str = _CALLER):
    """A copy of the backbone's ``config`` with ``hidden_size``, ``intermediate_size`` and
    ``head_dim`` divided by ``reduction`` (heads kept); ``ValueError`` naming the size that
    ``reduction`` does not divide, or a reduced head_dim that is odd (rotary embeddings rotate pairs)."""
    head_dim = _head_dim(config)
    sizes = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size, "head_dim": head_dim}
    for name, size in sizes.items():
        if size % reduction:
            raise ValueError(f"{caller}: reduction={reduction} must divide the backbone's {name} ({size}); the side "
                             f"network keeps the {config.num_attention_heads} heads and divides "
                             f"hidden_size, intermediate_size and head_dim")
    if (head_dim // reduction) % 2:
        raise ValueError(f"{caller}: reduction={reduction} leaves the side network's heads head_dim "
                         f"{head_dim} / {reduction} = {head_dim // reduction}, which must be even (rotary embeddings "
                         f"rotate pairs of dimensions)")
    reduced = copy.deepcopy(config)
    for name, size in sizes.items():
        setattr(reduced, name, size // reduction)
    return reduced


def _check_arguments(reduction, gate_temperature, caller: str) -> None:
    if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
        raise ValueError(f"{caller}: reduction must be an int >= 1, got {reduction!r}")
    if isinstance(gate_temperature, bool) or not isinstance(gate_temperature, (int, float)) or not gate_temperature > 0:
        raise ValueError(f"{caller}: gate_temperature must be a number > 0, got {gate_temperature!r}")


# ---------------------------------------------------------------------------------------------
# The hooks. Each is a module-level function bound to the side network with functools.partial,
# so copy.deepcopy of the model rebinds it to the copy's side network.
# ---------------------------------------------------------------------------------------------

def _before_backbone(side: LadderSideNetwork, module: nn.Module, args: tuple) -> None:
    side._run = _Run(grad_enabled=torch.is_grad_enabled())
    torch.set_grad_enabled(False)


def _after_backbone(side: LadderSideNetwork, module: nn.Module, args: tuple, output) -> None:
    run, side._run = side._run, None
    if run is not None:
        torch.set_grad_enabled(run.grad_enabled)


def _before_layer(side: LadderSideNetwork, index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
    run = side._run
    if run is None:  # the layer called on its own, outside the model's forward
        return
    if index == 0:
        cache = kwargs.get("cache")
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError(
                f"{_CALLER}: the side network keeps no KV cache, so it cannot continue from a cache that holds "
                f"{cache.get_seq_length()} tokens already; call generate(..., use_cache=False)")
        hidden = args[0] if args else kwargs["hidden_states"]
        with torch.set_grad_enabled(run.grad_enabled):
            run.stream = side.start(hidden)
            run.position_embeddings = side.position_embeddings(run.stream, kwargs["position_ids"])
    run.attention_mask = kwargs.get("attention_mask")
    run.position_ids = kwargs.get("position_ids")


def _after_layer(side: LadderSideNetwork, index: int, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    run = side._run
    if run is None:
        return
    with torch.set_grad_enabled(run.grad_enabled):
        run.stream = side.step(index, run.stream, output, run.attention_mask, run.position_ids,
                               run.position_embeddings)


def _after_norm(side: LadderSideNetwork, module: nn.Module, args: tuple, output: torch.Tensor):
    run = side._run
    if run is None:
        return None
    with torch.set_grad_enabled(run.grad_enabled):
        # forward(), not module(): calling the module would run this hook again.
        return module.forward(args[0] + side.output(run.stream))


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------

def _largest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest ``scores``, in ascending index order."""
    return torch.topk(scores, count).indices.sort().values


def _row_energy(weight: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each row of ``weight`` ``[out, in]`` → ``[out]``, in fp32."""
    return weight.detach().float().pow(2).sum(dim=1)


def residual_dims(decoder: nn.Module, count: int) -> torch.Tensor:
    """The ``count`` residual-stream dimensions the pruned side keeps: largest summed squared norm
    of the rows writing them (``o_proj`` and ``down_proj`` of every layer)."""
    scores = sum(_row_energy(layer.self_attn.o_proj.weight) + _row_energy(layer.mlp.down_proj.weight)
                 for layer in decoder.layers)
    return _largest(scores, count)


def _head_dim_scores(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row energy of a ``[heads * head_dim, in]`` projection summed over heads → ``[head_dim]``."""
    return _row_energy(weight).view(-1, head_dim).sum(dim=0)


def _head_rows(dims: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a ``[heads * head_dim, in]`` projection holding ``dims`` in every head, head by head."""
    return (torch.arange(heads, device=dims.device)[:, None] * head_dim + dims[None, :]).reshape(-1)


def _copy_sliced(target: nn.Module, source: nn.Module, rows: torch.Tensor | None, columns: torch.Tensor | None) -> None:
    """``target.weight = source.weight[rows][:, columns]`` (a 1-D weight: ``[rows]``), ``target.bias =
    source.bias[rows]``; None keeps all."""
    weight = source.weight.detach()
    if rows is not None:
        weight = weight[rows]
    if columns is not None:
        weight = weight[:, columns]
    target.weight.copy_(weight)
    if getattr(source, "bias", None) is not None:
        target.bias.copy_(source.bias.detach() if rows is None else source.bias.detach()[rows])


@torch.no_grad()
def _init_pruned(side: LadderSideNetwork, decoder: nn.Module, config, reduced) -> None:
    head_dim, side_head_dim = _head_dim(config), reduced.head_dim
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    device = decoder.norm.weight.device
    kept = residual_dims(decoder, reduced.hidden_size).to(device)
    for layer, side_layer in zip(decoder.layers, side.layers):
        attention, side_attention = layer.self_attn, side_layer.self_attn
        energy = (_head_dim_scores(attention.q_proj.weight, head_dim)
                  + _head_dim_scores(attention.k_proj.weight, head_dim)).to(device)
        half = head_dim // 2
        pairs = _largest(energy[:half] + energy[half:], side_head_dim // 2)
        query_dims = torch.cat([pairs, pairs + half])
        value_dims = _largest(_head_dim_scores(attention.v_proj.weight, head_dim).to(device), side_head_dim)
        _copy_sliced(side_attention.q_proj, attention.q_proj, _head_rows(query_dims, heads, head_dim), kept)
        _copy_sliced(side_attention.k_proj, attention.k_proj, _head_rows(query_dims, kv_heads, head_dim), kept)
        _copy_sliced(side_attention.v_proj, attention.v_proj, _head_rows(value_dims, kv_heads, head_dim), kept)
        _copy_sliced(side_attention.o_proj, attention.o_proj, kept, _head_rows(value_dims, heads, head_dim))
        mlp, side_mlp = layer.mlp, side_layer.mlp
        channels = _largest((_row_energy(mlp.gate_proj.weight) + _row_energy(mlp.up_proj.weight)).to(device),
                            reduced.intermediate_size)
        _copy_sliced(side_mlp.gate_proj, mlp.gate_proj, channels, kept)
        _copy_sliced(side_mlp.up_proj, mlp.up_proj, channels, kept)
        _copy_sliced(side_mlp.down_proj, mlp.down_proj, kept, channels)
        _copy_sliced(side_layer.input_layernorm, layer.input_layernorm, kept, None)
        _copy_sliced(side_layer.post_attention_layernorm, layer.post_attention_layernorm, kept, None)
    _copy_sliced(side.norm, decoder.norm, kept, None)
    for down in side.downsamples:
        down.weight.zero_()
        down.weight[torch.arange(len(kept), device=device), kept] = 1


@torch.no_grad()
def _init_random(side: LadderSideNetwork, std: float) -> None:
    for module in side.modules():
        if isinstance(module, nn.Linear) and module is not side.upsample:
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif hasattr(module, "weight") and module.weight.dim() == 1:  # the norms
            module.weight.fill_(1.0)


# ---------------------------------------------------------------------------------------------
# The public functions
# ---------------------------------------------------------------------------------------------

def _attach(model: nn.Module, reduction: int, gate_temperature: float, caller: str) -> LadderSideNetwork:
    """Build the side network of ``model`` (weights as constructed), register it and its hooks,
    freeze the base. Checks the model; the arguments are the caller's to check."""
    decoder = _decoder(model, caller)
    if has_ladder_side(model):
        raise ValueError(f"{caller}: {type(model).__name__} has a ladder side network already "
                         f"(model.{SIDE_ATTRIBUTE})")
    if delta_parameter_ids(model):
        raise ValueError(f"{caller}: {type(model).__name__} carries other deltakern delta parameters; LST runs the "
                         f"backbone without autograd, so they would get no gradient (add LST to a plain model)")
    config = model.config
    reduced = side_config(config, reduction, caller)
    layer_class, norm, rotary_class = type(decoder.layers[0]), decoder.norm, type(decoder.rotary_emb)
    layers = [layer_class(reduced, layer_idx=i) for i in range(len(decoder.layers))]
    if getattr(reduced, "hidden_act", None) == "silu":
        for layer in layers:
            layer.mlp = SwiGLUSideMLP(layer.mlp)
    side_norm = type(norm)(reduced.hidden_size, eps=reduced.rms_norm_eps)
    side = LadderSideNetwork(layers, side_norm, rotary_class(config=reduced), config.hidden_size,
                             reduced.hidden_size, float(gate_temperature))
    side._run = None
    weight = decoder.embed_tokens.weight
    side.to(device=weight.device, dtype=weight.dtype)
    model.add_module(SIDE_ATTRIBUTE, side)
    decoder.register_forward_pre_hook(functools.partial(_before_backbone, side))
    decoder.register_forward_hook(functools.partial(_after_backbone, side), always_call=True)
    for index, layer in enumerate(decoder.layers):
        layer.register_forward_pre_hook(functools.partial(_before_layer, side, index), with_kwargs=True)
        layer.register_forward_hook(functools.partial(_after_layer, side, index))
    decoder.norm.register_forward_hook(functools.partial(_after_norm, side))
    freeze_base(model)
    return side


def add_ladder_side(model: nn.Module, reduction: int = 8, gate_temperature: float = 0.1,
                    init: str = "pruned") -> nn.Module:
    """Add an LST side network (see the module docstring) to a Llama-style ``model``, in place,
    and make its parameters the only trainable ones.

    Args:
        model: a Llama, Qwen2 or Mistral model with a decoder stack ``model.model`` (a causal LM or
            any head on it), without other deltakern methods.
        reduction: r; the side network has width hidden/r, FFN width intermediate/r and head_dim/r
            with the backbone's numbers of heads and layers. r must divide all three and leave an
            even head_dim.
        gate_temperature: T in ``mu_i = sigmoid(alpha_i / T)``, > 0 (the paper's 0.1).
        init: ``"pruned"`` (magnitude pruning of the backbone) or ``"random"``; the up-projection
            starts at zero either way, so the outputs are unchanged at initialisation.

    Returns:
        ``model``, with ``model.deltakern_ladder_side`` (a :class:`deltakern.nn.LadderSideNetwork`).

    Raises:
        NotImplementedError: a model family other than Llama, Qwen2 and Mistral.
        ValueError: a bad argument; a reduction that does not divide the widths or leaves an odd
            head_dim; a model that has a side network or other deltakern deltas already.
    """
    _check_arguments(reduction, gate_temperature, _CALLER)
    if init not in INITS:
        raise ValueError(f"{_CALLER}: init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    side = _attach(model, reduction, gate_temperature, _CALLER)
    if init == "pruned":
        _init_pruned(side, model.model, model.config, side.layers[0].self_attn.config)
    else:
        _init_random(side, getattr(model.config, "initializer_range", 0.02))
    return model


def has_ladder_side(model: nn.Module) -> bool:
    """Whether ``add_ladder_side`` gave ``model`` a side network."""
    return isinstance(getattr(model, SIDE_ATTRIBUTE, None), LadderSideNetwork)


def ladder_side_checkpoint(model: nn.Module) -> tuple[dict, dict]:
    """The LST delta of ``model`` as ``(config, state)``: ``{"format": "deltakern-lst",
    "format_version": 1, "reduction": r, "gate_temperature": T}`` and the side network's
    parameters by their names in it.

    Raises:
        ValueError: the model has no side network.
    """
    if not has_ladder_side(model):
        raise ValueError(f"deltakern.save: {type(model).__name__} has no ladder side network "
                         f"(call deltakern.add_ladder_side first)")
    side = getattr(model, SIDE_ATTRIBUTE)
    hidden, side_hidden = side.upsample.weight.shape
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "reduction": hidden // side_hidden,
              "gate_temperature": side.gate_temperature}
    return config, {name: parameter.detach() for name, parameter in side.named_parameters()}


def load_ladder_side(model: nn.Module, config: dict, state: dict) -> nn.Module:
    """Add the side network ``config`` describes to the plain ``model`` and load ``state`` into it.

    Raises:
        ValueError: a config key is missing or the format is another one; a tensor the side
            network needs is missing, one it has no place for is present, or a shape differs (each
            named); the reduction does not fit the model.
        NotImplementedError: an unsupported model family.
    """
    caller = "deltakern.load"
    check_config(caller, "LST", config, _CONFIG_KEYS, FORMAT, FORMAT_VERSION)
    _check_arguments(config["reduction"], config["gate_temperature"], caller)
    side = _attach(model, config["reduction"], config["gate_temperature"], caller)
    load_checked(caller, "LST", dict(side.named_parameters()), state)
    return model


# ---------------------------------------------------------------------------------------------
# The method's declaration
# ---------------------------------------------------------------------------------------------

E2E_REDUCTION = 8
E2E_GATE_TEMPERATURE = 0.1


class _ReferenceLST(nn.Module):
    """LST written out in plain PyTorch (PEFT has none): the frozen backbone run layer by layer
    under ``torch.no_grad()`` keeping every hidden state, then the side network of transformers
    decoder layers of width d/r (heads kept, head_dim/r) over them, the ladder mixes, the
    up-projection added before the backbone's final norm, and the LM head's shifted cross-entropy.
    Causal attention without a mask (the model's sdpa attention; inputs without padding). Its
    side parameters have the names of :class:`LadderSideNetwork`'s."""

    def __init__(self, base: nn.Module, reduction: int, gate_temperature: float):
        super().__init__()
        base.requires_grad_(False)
        self.base = base
        config = base.config
        reduced = copy.deepcopy(config)
        reduced.hidden_size //= reduction
        reduced.intermediate_size //= reduction
        reduced.head_dim = config.hidden_size // config.num_attention_heads // reduction
        decoder = base.model
        self.layers = nn.ModuleList(type(layer)(reduced, layer_idx=i) for i, layer in enumerate(decoder.layers))
        self.downsamples = nn.ModuleList(nn.Linear(config.hidden_size, reduced.hidden_size, bias=False)
                                         for _ in range(len(decoder.layers) + 1))
        self.gate_logits = nn.Parameter(torch.zeros(len(decoder.layers)))
        self.norm = type(decoder.norm)(reduced.hidden_size, eps=reduced.rms_norm_eps)
        self.upsample = nn.Linear(reduced.hidden_size, config.hidden_size, bias=False)
        self.side_rotary = type(decoder.rotary_emb)(config=reduced)
        self.gate_temperature = gate_temperature

    def get_base_model(self) -> nn.Module:
        """The backbone, as PEFT's ``PeftModel.get_base_model``."""
        return self.base

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        from transformers.modeling_outputs import CausalLMOutput

        decoder = self.base.model
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        with torch.no_grad():
            hidden = decoder.embed_tokens(input_ids)
            rotary = decoder.rotary_emb(hidden, positions)
            states = [hidden]
            for layer in decoder.layers:
                hidden = layer(hidden, position_ids=positions, position_embeddings=rotary)
                states.append(hidden)
        side_rotary = self.side_rotary(states[0], positions)
        stream = self.downsamples[0](states[0])
        for i, layer in enumerate(self.layers):
            side_out = layer(stream, position_ids=positions, position_embeddings=side_rotary)
            mu = torch.sigmoid(self.gate_logits[i] / self.gate_temperature)
            stream = mu * self.downsamples[i + 1](states[i + 1]) + (1 - mu) * side_out
        logits = self.base.lm_head(decoder.norm(states[-1] + self.upsample(self.norm(stream))))
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)


def _e2e_reference(base: nn.Module) -> nn.Module:
    """The plain-PyTorch LST, every side parameter drawn (norms around 1, gates around 0.5, a
    non-zero up-projection) so that every path matters."""
    weight = base.get_input_embeddings().weight
    model = _ReferenceLST(base, E2E_REDUCTION, E2E_GATE_TEMPERATURE).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("base."):
                continue
            if parameter.dim() == 1 and name != "gate_logits":  # norm weights
                parameter.normal_(1.0, 0.1)
            else:
                parameter.normal_(0.0, 0.1 if name == "gate_logits" else 0.05)
    return model


def _e2e_pairs(reference: nn.Module, ours: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    theirs = dict(reference.named_parameters())
    return [(f"{SIDE_ATTRIBUTE}.{name}", theirs[name], mine)
            for name, mine in getattr(ours, SIDE_ATTRIBUTE).named_parameters()]


# The side network is a new submodule, not a wrapper: it loads in any order; after BitFit.
register_method(MethodSpec(
    name="lst", label="a ladder side network", present=has_ladder_side,
    checkpoint=OwnFormat("deltakern_lst", save=ladder_side_checkpoint, load=load_ladder_side, load_order=2),
    e2e=E2EProviders(
        reference=_e2e_reference,
        deltakern=lambda base: add_ladder_side(base, reduction=E2E_REDUCTION, gate_temperature=E2E_GATE_TEMPERATURE),
        pairs=_e2e_pairs)))
