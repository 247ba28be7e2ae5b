"""``add_adapters``: bottleneck adapters in Houlsby, Pfeiffer or parallel placement.

Each adapter is a :class:`deltakern.nn.Adapter` (one fused ``adapter`` op) held by a small wrapper
that replaces the module it attaches to and keeps that module as its child ``base_layer``, so the
base parameters keep recognisable names (``...o_proj.base_layer.weight``, as in PEFT) and the
adapter's are ``...o_proj.adapter.down.weight`` etc. Where each placement puts its adapters, with
the module names of :mod:`deltakern.patch.families`:

| placement | attaches to | computes |
|---|---|---|
| ``"houlsby"`` | attention output projection and FFN output projection | ``y + s·A(y)``, y the projection's output |
| ``"pfeiffer"`` | FFN output projection | ``y + s·A(y)`` |
| ``"parallel"`` | the FFN | ``ffn(x) + s·A(x)``, x the FFN's input |

with ``A(z) = act(z Wdᵀ + bd) Wuᵀ + bu``. The adapter sits before the block's residual add (and,
for BERT/RoBERTa, before the output dropout and LayerNorm). T5 decoder blocks get their attention
adapter after self-attention's output projection only (the family table's attention output);
cross-attention (``layer.1.EncDecAttention.o``) gets none, so every block has the same two adapters.

Parallel on post-LayerNorm families (BERT/RoBERTa): the FFN is ``intermediate`` + ``output.dense``
and ``output`` computes ``LayerNorm(dropout(dense(i)) + a)`` from the intermediate activations i
and the attention output a, which is also the FFN's input. The adapter term ``s·A(a)`` only has to
join that sum, so the wrapper around ``output`` passes ``a + s·A(a)`` (the op with its default
residual) as ``output``'s residual input: ``LayerNorm(dropout(dense(i)) + s·A(a) + a)``, the FFN
output plus the parallel adapter plus the residual, without re-implementing ``output``. The only
difference to adding the adapter inside the dropout is that the adapter branch is not dropped out.
"""

from __future__ import annotations

import functools

import math

import torch
from torch import nn

from ..activations import check_activation
from ..nn import Adapter
from ..registry import E2EProviders, MethodSpec, OwnFormat, register_method
from .common import check_config, freeze_base, load_checked, replace_submodule
from .families import blocks, family_of

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
FORMAT = "deltakern-adapters"
FORMAT_VERSION = 1
_CONFIG_KEYS = ("format", "format_version", "bottleneck", "placement", "activation", "scaling")


class _AdapterWrapper(nn.Module):
    """Holds the replaced module as ``base_layer`` and the adapter as ``adapter``; attributes the
    wrapper does not have are read from ``base_layer``, so model code that inspects the module it
    called (T5 reads ``wo.weight.dtype``) keeps working."""

    placement: str

    def __init__(self, base_layer: nn.Module, adapter: Adapter):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapter"):
                raise
            return getattr(self.base_layer, name)


class SequentialAdapter(_AdapterWrapper):
    """``base_layer`` followed by an adapter: ``y + s·A(y)`` with ``y = base_layer(...)``.

    Shapes: the base layer's inputs; its output y ``[..., d_model]`` and the result ``[..., d_model]``.
    """

    def __init__(self, base_layer: nn.Module, adapter: Adapter, placement: str):
        super().__init__(base_layer, adapter)
        self.placement = placement

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.adapter(self.base_layer(*args, **kwargs))


class ParallelAdapter(_AdapterWrapper):
    """An FFN with an adapter alongside it: ``ffn(x) + s·A(x)``, one ``adapter`` op with the FFN's
    output as its residual.

    Shapes: x ``[..., d_model]`` → ``[..., d_model]``.
    """

    placement = "parallel"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(x, residual=self.base_layer(x))


class PostNormParallelAdapter(_AdapterWrapper):
    """BERT's FFN output module (``LayerNorm(dropout(dense(i)) + a)``) with a parallel adapter on
    the FFN's input a: its residual input becomes ``a + s·A(a)`` (see the module docstring).

    Shapes: hidden_states i ``[..., intermediate]``, input_tensor a ``[..., d_model]`` → ``[..., d_model]``.
    """

    placement = "parallel"

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.base_layer(hidden_states, self.adapter(input_tensor))


_WRAPPERS = (SequentialAdapter, ParallelAdapter, PostNormParallelAdapter)


def _check_arguments(caller: str, bottleneck, placement, activation, scaling) -> None:
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
        raise ValueError(f"{caller}: bottleneck must be an int >= 1, got {bottleneck!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"{caller}: unknown placement {placement!r}; expected one of {', '.join(PLACEMENTS)}")
    check_activation(caller, activation)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"{caller}: scaling must be a finite number, got {scaling!r}")


def _factory(module: nn.Module, name: str, caller: str) -> dict:
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return {"device": parameter.device, "dtype": parameter.dtype}
    raise ValueError(f"{caller}: module {name!r} has no floating-point parameter to take the adapter's device and dtype from")


def _add(model: nn.Module, bottleneck: int, placement: str, activation: str, scaling: float, caller: str,
         state: dict | None = None) -> nn.Module:
    """Build every adapter, load ``state`` into them when given (checked first), and only then put
    them into the model, so a bad argument or checkpoint leaves the model as it was."""
    _check_arguments(caller, bottleneck, placement, activation, scaling)
    family = family_of(model, caller)
    found = blocks(model, caller)
    if has_adapters(model):
        raise ValueError(f"{caller}: the model already has deltakern adapters; add them to a model without adapters")
    # Every attachment point of the supported families reads or writes the residual stream.
    d_model = int(model.config.hidden_size)
    if placement == "houlsby":
        targets = [name for b in found for name in (b.attention_output_name, b.ffn_output_name)]
    elif placement == "pfeiffer":
        targets = [b.ffn_output_name for b in found]
    else:
        targets = [b.ffn_name for b in found]
    wrappers = {}
    for name in targets:
        base = model.get_submodule(name)
        adapter = Adapter(d_model, bottleneck, activation=activation, scaling=scaling).to(**_factory(base, name, caller))
        if placement != "parallel":
            wrapper = SequentialAdapter(base, adapter, placement)
        elif family.post_layernorm:
            wrapper = PostNormParallelAdapter(base, adapter)
        else:
            wrapper = ParallelAdapter(base, adapter)
        wrappers[name] = wrapper.train(base.training)
    if state is not None:
        load_checked(caller, "adapter", {f"{name}.adapter.{key}": value for name, wrapper in wrappers.items()
                                         for key, value in wrapper.adapter.named_parameters()}, state)
    for name, wrapper in wrappers.items():
        replace_submodule(model, name, wrapper)
    freeze_base(model)
    return model


def add_adapters(model: nn.Module, bottleneck: int = 64, placement: str = "houlsby", activation: str = "relu",
                 scaling: float = 1.0) -> nn.Module:
    """Insert bottleneck adapters into a Hugging Face model of a supported family, in place.

    Args:
        model: Llama, Qwen2, Mistral, GPT-2, BERT/RoBERTa or T5 model (any head).
        bottleneck: the adapters' hidden size r >= 1 (weights ``down [r, d_model]``, ``up [d_model, r]``).
        placement: ``"houlsby"`` (after the attention output projection and after the FFN output
            projection, 2 per block), ``"pfeiffer"`` (after the FFN output projection, 1 per block) or
            ``"parallel"`` (alongside the FFN, 1 per block); see the module docstring.
        activation: one of ``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"silu"``, ``"tanh"``.
        scaling: the factor s on each adapter's output.

    Returns:
        ``model`` with the adapters (Houlsby init: near the identity) on the device and in the
        dtype of the module each attaches to; only adapter parameters (and other deltakern delta
        parameters already present) are trainable.

    Raises:
        ValueError: a bad argument, a model outside the families (naming what was looked for), or a
            model that already has adapters.
    """
    return _add(model, bottleneck, placement, activation, scaling, "deltakern.add_adapters")


def _wrappers(model: nn.Module) -> list[tuple[str, _AdapterWrapper]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, _WRAPPERS)]


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` holds adapters inserted by :func:`add_adapters`."""
    return bool(_wrappers(model))


def _adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{name}.adapter.{key}": value
            for name, wrapper in _wrappers(model) for key, value in wrapper.adapter.named_parameters()}


def adapters_checkpoint(model: nn.Module) -> tuple[dict, dict]:
    """The adapters of ``model`` as ``(config, state)``: config is the json-able dict of
    ``format``, ``format_version``, ``bottleneck``, ``placement``, ``activation`` and ``scaling``;
    state maps each adapter tensor's qualified name in ``model`` (``<module>.adapter.down.weight``
    ``[r, d_model]``, ``.down.bias [r]``, ``.up.weight [d_model, r]``, ``.up.bias [d_model]``) to it.

    Raises ``ValueError`` when the model has no adapters or adapters with different settings.
    """
    caller = "deltakern.save"
    wrappers = _wrappers(model)
    if not wrappers:
        raise ValueError(f"{caller}: the model has no deltakern adapters")
    settings = {(w.adapter.bottleneck, w.placement, w.adapter.activation, w.adapter.scaling) for _, w in wrappers}
    if len(settings) > 1:
        raise ValueError(f"{caller}: the model's adapters differ in (bottleneck, placement, activation, scaling): "
                         f"{sorted(settings)}; the adapter format holds one setting")
    bottleneck, placement, activation, scaling = settings.pop()
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "bottleneck": bottleneck, "placement": placement,
              "activation": activation, "scaling": scaling}
    return config, {key: value.detach() for key, value in _adapter_parameters(model).items()}


def load_adapters(model: nn.Module, config: dict, state: dict) -> nn.Module:
    """Add the adapters ``config`` describes to the plain base ``model`` and load ``state`` into them.

    Args:
        model: a model of a supported family without adapters.
        config: as written by :func:`adapters_checkpoint`.
        state: qualified adapter tensor name → tensor, as written by :func:`adapters_checkpoint`.

    Returns:
        ``model`` with the adapters loaded (cast to the adapters' dtype and device).

    Raises:
        ValueError: a config key is missing or the format is another one; a key of the model's
            adapters is missing from ``state``, ``state`` has a key the model's adapters do not, or
            a tensor has the wrong shape (each named).
    """
    caller = "deltakern.load"
    check_config(caller, "adapter", config, _CONFIG_KEYS, FORMAT, FORMAT_VERSION)
    model = _add(model, config["bottleneck"], config["placement"], config["activation"], config["scaling"], caller,
                 state=state)
    return model


# ---------------------------------------------------------------------------------------------
# The method's declaration
# ---------------------------------------------------------------------------------------------

E2E_BOTTLENECK = 64


class _HoulsbyAdapter(nn.Module):
    """The eager reference adapter: ``y + up(relu(down(y)))``, weights ``down [r, d]``, ``up [d, r]``."""

    def __init__(self, d_model: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(torch.relu(self.down(y)))


def _houlsby_targets(model: nn.Module) -> list[str]:
    """Where Houlsby puts adapters in a LlamaForCausalLM: after each attention and FFN output projection."""
    return [f"model.layers.{i}.{name}" for i in range(model.config.num_hidden_layers)
            for name in ("self_attn.o_proj", "mlp.down_proj")]


def _e2e_reference(base: nn.Module) -> nn.Module:
    """PEFT has no bottleneck adapters: an eager Houlsby adapter ``y + up(relu(down(y)))``
    (bottleneck 64) as a forward hook on every attention and FFN output projection (the placement
    of ``add_adapters(..., placement="houlsby")``), in plain torch; Houlsby's near-identity init,
    with non-zero biases so that their gradients are checked too."""
    base.requires_grad_(False)
    weight = base.get_input_embeddings().weight
    adapters = nn.ModuleList()
    for name in _houlsby_targets(base):
        adapter = _HoulsbyAdapter(base.config.hidden_size, E2E_BOTTLENECK).to(device=weight.device, dtype=weight.dtype)
        for parameter in adapter.parameters():
            nn.init.normal_(parameter, std=1e-2)
        adapters.append(adapter)
        # A partial, not a closure: copy.deepcopy of the model (the bf16 check's fp32 copy) then
        # hooks the copied adapter.
        base.get_submodule(name).register_forward_hook(functools.partial(_apply_e2e_adapter, adapter))
    base.add_module("houlsby_adapters", adapters)
    return base


def _apply_e2e_adapter(adapter: nn.Module, module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    return adapter(out)


def _e2e_pairs(reference: nn.Module, ours: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    pairs = []
    for name, theirs in zip(_houlsby_targets(reference), reference.houlsby_adapters):
        mine = ours.get_submodule(name).adapter
        for key in ("down.weight", "down.bias", "up.weight", "up.bias"):
            pairs.append((f"{name}.adapter.{key}", theirs.get_parameter(key), mine.get_parameter(key)))
    return pairs


# Adapters load before PEFT's part of a checkpoint: their wrappers are what LoRA names refer to
# when both are present (a LoRA layer inside an adapter wrapper is saved as
# "<module>.base_layer"), whichever was added first.
register_method(MethodSpec(
    name="adapter", label="adapters", present=has_adapters,
    checkpoint=OwnFormat("deltakern_adapters", save=adapters_checkpoint, load=load_adapters, load_order=-1),
    e2e=E2EProviders(
        reference=_e2e_reference,
        deltakern=lambda base: add_adapters(base, bottleneck=E2E_BOTTLENECK, placement="houlsby", activation="relu",
                                            scaling=1.0),
        pairs=_e2e_pairs)))
