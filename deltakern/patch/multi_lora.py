"""Named LoRA adapters on a plain model: ``add_lora(..., adapter_name=...)`` (several adapters, each
with its own r, alpha, dropout and targets), :func:`set_adapter` (the active set, summed on every
row as in PEFT), and ``adapter_names=[...]`` on ``model(...)`` / ``model.generate(...)`` (one
adapter per sequence, PEFT's mixed batches, run by ``segmented_lora_linear``).

The layers of one model share an :class:`~deltakern.nn.multi_lora.AdapterRouting`, kept in the
model's ``__dict__``. ``add_lora`` with a name gives the model (once):
  - a forward pre-hook (with kwargs) that pops ``adapter_names`` and starts the routing, and an
    always-called forward hook that ends it, so an exception in the forward leaves no routing
    behind;
  - for a model with ``generate``, an instance-level ``generate`` that pops ``adapter_names`` (which
    transformers' keyword validation would refuse) and routes the whole generation; beams and
    ``num_return_sequences`` repeat each sequence k times along the batch (transformers'
    ``repeat_interleave``), and the layers repeat its adapter with it.
The segments of a batch are built by the first layer that sees an input shape and reused by every
other layer with the same adapters (one host sync per batch shape, not per layer).
"""

from __future__ import annotations

import functools

from torch import nn

from ..nn.lora import LoRALinear
from ..nn.multi_lora import BASE, AdapterRouting, MultiLoRALinear, check_adapter_name
from ..nn.nf4_linear import NF4Linear
from .common import freeze_base, replace_submodule
from .targets import resolve_targets

ROUTING_ATTR = "_deltakern_routing"
# The name the unnamed adapter of add_lora gets when a named adapter joins it (PEFT's default name).
DEFAULT_ADAPTER = "default"
_FORWARD = "forward"  # the routing owner of a forward call given adapter_names


def routing_of(model: nn.Module) -> AdapterRouting | None:
    """The routing shared by the named-adapter layers of ``model``, or None."""
    return model.__dict__.get(ROUTING_ATTR)


def has_named_lora(model: nn.Module) -> bool:
    return any(isinstance(m, MultiLoRALinear) for m in model.modules())


def adapter_names(model: nn.Module) -> list[str]:
    """The named adapters of ``model`` in the order added ([] without named adapters)."""
    routing = routing_of(model)
    if routing is not None:
        return list(routing.adapters)
    names: dict[str, None] = {}
    for module in model.modules():
        if isinstance(module, MultiLoRALinear):
            names.update(dict.fromkeys(module.adapter_names))
    return list(names)


def _checkpointing(module: nn.Module) -> bool:
    """Whether transformers' gradient (activation) checkpointing is on for ``module``."""
    for attribute in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the new name first
        if hasattr(type(module), attribute):
            return bool(getattr(module, attribute))
    return False


def _pre_forward(module: nn.Module, args: tuple, kwargs: dict):
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return args, kwargs
    if module.training and _checkpointing(module):
        raise NotImplementedError(
            "deltakern: adapter_names with gradient checkpointing is not supported yet (the recomputed forward "
            "runs after the routing ended); disable gradient checkpointing for mixed-adapter training")
    module.__dict__[ROUTING_ATTR].begin("deltakern: model(..., adapter_names=...)", names, expand=False,
                                         owner=_FORWARD)
    return args, kwargs


def _post_forward(module: nn.Module, args: tuple, kwargs: dict, output):
    module.__dict__[ROUTING_ATTR].end(_FORWARD)


def _generate(self: nn.Module, *args, adapter_names=None, **kwargs):
    """transformers' ``generate`` with PEFT's ``adapter_names`` (one name per input sequence)."""
    generate = type(self).generate
    if adapter_names is None:
        return generate(self, *args, **kwargs)
    with self.__dict__[ROUTING_ATTR].route(adapter_names, expand=True,
                                           owner_name="deltakern: model.generate(..., adapter_names=...)"):
        return generate(self, *args, **kwargs)


def _install(model: nn.Module) -> AdapterRouting:
    """The model's routing, created with its hooks (and ``generate``) the first time."""
    routing = routing_of(model)
    if routing is None:
        routing = AdapterRouting()
        model.__dict__[ROUTING_ATTR] = routing
        model.register_forward_pre_hook(_pre_forward, with_kwargs=True)
        model.register_forward_hook(_post_forward, with_kwargs=True, always_call=True)
        if callable(getattr(type(model), "generate", None)):
            # On the instance, not the class: other models of the class are left alone. A partial,
            # not a bound method, so that pickle (torch.save of the whole model) can rebuild it.
            model.generate = functools.partial(_generate, model)
    return routing


def add_named_lora(model: nn.Module, adapter_name: str, r: int, alpha: float, dropout_p: float, target_modules,
                   use_rslora: bool) -> nn.Module:
    """``add_lora(model, ..., adapter_name=...)``: see :func:`deltakern.add_lora`."""
    caller = "deltakern.add_lora"
    check_adapter_name(caller, adapter_name)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{caller}: r must be an int >= 1, got {r!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{caller}: dropout_p must be in [0, 1), got {dropout_p!r}")
    known = adapter_names(model)
    if adapter_name in known:
        raise ValueError(f"{caller}: the model already has an adapter {adapter_name!r}; its adapters are {known}")
    # Unnamed LoRA already there becomes the adapter "default" (the same parameter objects).
    unnamed = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for _, layer in unnamed:
        if layer.use_dora or layer.nf4_base:
            kind = "DoRA" if layer.use_dora else "an NF4 (QLoRA) base"
            raise NotImplementedError(f"{caller}: named adapters do not support {kind} yet, and the model's "
                                      f"unnamed LoRA uses it")
    if unnamed and adapter_name == DEFAULT_ADAPTER:
        raise ValueError(f"{caller}: the model's unnamed LoRA becomes the adapter {DEFAULT_ADAPTER!r}; give the "
                         f"new adapter another name")
    # Resolved before any change: a bad target leaves the model as it was.
    names = resolve_targets(model, target_modules, None, caller, strict=True, wrapped=(MultiLoRALinear, LoRALinear))
    quantized = [n for n in names if isinstance(model.get_submodule(n), NF4Linear)]
    if quantized:
        raise NotImplementedError(f"{caller}: named adapters over NF4 (QLoRA) layers are not supported yet: "
                                  f"{quantized[:4]}")
    routing = _install(model)
    for name, layer in unnamed:
        replace_submodule(model, name, MultiLoRALinear.from_lora_linear(layer, DEFAULT_ADAPTER, routing))
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, MultiLoRALinear):
            wrapper = MultiLoRALinear(layer, routing)
            wrapper.train(layer.training)
            replace_submodule(model, name, wrapper)
            layer = wrapper
        layer.add_adapter(adapter_name, r, alpha, dropout_p, use_rslora)
    routing.register(adapter_name)  # also when every target was new
    freeze_base(model)
    return model


def set_adapter(model: nn.Module, adapter_name: str | list[str]) -> nn.Module:
    """Make ``adapter_name`` (a name or a list of names) the active adapters of ``model``: with
    no ``adapter_names`` in the call, every row gets the sum of the active adapters' updates (PEFT's
    ``set_adapter``). One active adapter runs ``lora_linear``; several run as one ``lora_linear``
    over their concatenated factors when no dropout is in effect (eval mode or dropout 0), else as
    a sum with a dropout mask per adapter.

    Unlike PEFT's ``set_adapter``, ``requires_grad`` is left as it is: inactive adapters are not in
    the computation and get no gradient (None), and mixed batches can still train every adapter.

    Returns ``model``.

    Raises:
        ValueError: ``model`` has no named adapters, a name is unknown (the message lists the
            model's adapters), or the list is empty.
    """
    routing = routing_of(model)
    if routing is None:
        raise ValueError("deltakern.set_adapter: the model has no named LoRA adapters; add them with "
                         "deltakern.add_lora(model, ..., adapter_name=...)")
    routing.set_active("deltakern.set_adapter", adapter_name)
    return model


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapters of ``model`` (see :func:`set_adapter`)."""
    routing = routing_of(model)
    return list(routing.active) if routing is not None else []


def adapter_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """Every parameter of named adapter ``adapter_name`` of ``model`` (``lora_A`` and ``lora_B`` of
    each layer holding it), e.g. for its own optimizer parameter group.

    Raises:
        ValueError: the name is not one of the model's adapters.
    """
    known = adapter_names(model)
    if adapter_name not in known or adapter_name == BASE:
        raise ValueError(f"deltakern: unknown adapter {adapter_name!r}; the model's adapters are {known}")
    return [p for m in model.modules() if isinstance(m, MultiLoRALinear) for p in m.adapter_parameters(adapter_name)]
