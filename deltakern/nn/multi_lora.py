"""``MultiLoRALinear``: a linear layer with several named LoRA adapters (PEFT's multi-adapter
``LoraLayer``), and ``AdapterRouting``, the state its layers share in one model: the adapters'
names, the active set, and for a mixed batch the adapter of each sequence.

A layer runs one of three paths:
  - a mixed batch (``AdapterRouting.route``, or ``adapter_names=`` on the layer itself): every
    row gets its sequence's adapter (or none, ``"__base__"``) through ``segmented_lora_linear``;
    the segments of all the model's adapters are built once per batch shape (one host sync) and
    each layer takes those of its own adapters from them;
  - one active adapter: ``lora_linear``, as ``LoRALinear`` runs;
  - several active adapters (PEFT's semantics: their updates are summed on every row): with no
    dropout in effect, one ``lora_linear`` over the concatenated factors (``[A_1; A_2; ...]`` and
    ``[s_1 B_1, s_2 B_2, ...]``); with dropout, the first adapter in ``lora_linear`` and the others
    added in plain PyTorch, each with its own dropout mask (as PEFT draws them).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops.lora_linear import lora_linear
from ..ops.segmented_lora_linear import (
    LoraSegments,
    lora_segments,
    segmented_lora_linear,
)
from .wrapped_linear import WrappedLinear

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names
_OWNER = "deltakern.nn.MultiLoRALinear"


def check_adapter_name(owner: str, name) -> str:
    """A valid new adapter name: a non-empty str without ``.`` (it becomes a parameter name), not
    ``"__base__"``."""
    if not isinstance(name, str) or not name or "." in name or name == BASE:
        raise ValueError(f"{owner}: an adapter name must be a non-empty str without '.' and other than "
                         f"{BASE!r}, got {name!r}")
    return name


def concatenated_factors(lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor],
                         scalings: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A, B, s)`` with ``s · (x Aᵀ) Bᵀ = Σ_k s_k (x A_kᵀ) B_kᵀ``: the adapters' factors stacked
    along the rank (``[A_1; A_2; ...]``, ``[B_1, B_2, ...]``), so several adapters without dropout
    run as one ``lora_linear``. Each B_k is scaled by its s_k unless all scalings agree (then
    ``s`` is the common one). Autograd carries the gradients back to each adapter's factors."""
    if len(lora_A) == 1:
        return lora_A[0], lora_B[0], scalings[0]
    stacked_A = torch.cat(list(lora_A), dim=0)
    if all(s == scalings[0] for s in scalings):
        return stacked_A, torch.cat(list(lora_B), dim=1), scalings[0]
    return stacked_A, torch.cat([b * s for b, s in zip(lora_B, scalings)], dim=1), 1.0


@dataclass
class _Batch:
    """The adapter of each sequence of the batch being run. index: int64 CPU ``[B]``, positions in
    ``AdapterRouting.adapters`` (-1: none). expand: a layer may see ``k·B`` rows along dim 0, the
    sequences repeated k times each (generate's beams and num_return_sequences)."""

    names: tuple[str, ...]
    index: torch.Tensor
    expand: bool
    owner: object
    segments: dict = field(default_factory=dict)


class AdapterRouting:
    """What the ``MultiLoRALinear`` layers of one model share.

    adapters: every adapter name, in the order added (a layer holds a subset of them).
    active: the active adapters (summed on every row when no per-sequence routing is set).
    batch: the per-sequence routing of the forward (or generate call) in progress, or None.
    """

    def __init__(self) -> None:
        self.adapters: list[str] = []
        self.active: tuple[str, ...] = ()
        self.batch: _Batch | None = None

    def register(self, name: str) -> None:
        if name not in self.adapters:
            self.adapters.append(name)
            if not self.active:  # the first adapter is active, as in PEFT
                self.active = (name,)

    def check_names(self, owner: str, names, allow_base: bool) -> tuple[str, ...]:
        """``names`` (a str or a sequence of str) as a tuple, each a known adapter (or ``"__base__"``
        when ``allow_base``); a ``ValueError`` lists the known ones otherwise."""
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{owner}: adapter names must be a str or a list of str, got {names!r}")
        allowed = set(self.adapters) | ({BASE} if allow_base else set())
        unknown = sorted({n for n in names if n not in allowed})
        if unknown:
            known = ", ".join(map(repr, self.adapters)) or "none"
            base = f" (or {BASE!r} for the base model)" if allow_base else ""
            raise ValueError(f"{owner}: unknown adapter name(s) {', '.join(map(repr, unknown))}; the model's "
                             f"adapters are {known}{base}")
        return tuple(names)

    def set_active(self, owner: str, names) -> None:
        names = self.check_names(owner, names, allow_base=False)
        if not names:
            raise ValueError(f"{owner}: give at least one adapter to activate")
        self.active = tuple(dict.fromkeys(names))

    def begin(self, owner_name: str, names, expand: bool, owner: object) -> None:
        """Start routing sequence b of the batch to adapter ``names[b]``."""
        if self.batch is not None:
            raise ValueError(f"{owner_name}: adapter_names given while another forward or generate call with "
                             f"adapter_names is in progress on this model")
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise ValueError(f"{owner_name}: adapter_names must be a non-empty list with one adapter name "
                             f"(or {BASE!r}) per sequence, got {names!r}")
        names = self.check_names(owner_name, names, allow_base=True)
        position = {n: i for i, n in enumerate(self.adapters)}
        index = torch.tensor([position.get(n, -1) for n in names], dtype=torch.int64)
        self.batch = _Batch(names, index, expand, owner)

    def end(self, owner: object | None = None) -> None:
        """Stop routing (only the routing ``owner`` started, when given)."""
        if self.batch is not None and (owner is None or self.batch.owner is owner):
            self.batch = None

    @contextlib.contextmanager
    def route(self, names, expand: bool = False, owner_name: str = "deltakern") -> Iterator[None]:
        """Within the block, sequence b of every batch is routed to adapter ``names[b]``."""
        token = object()
        self.begin(owner_name, names, expand, token)
        try:
            yield
        finally:
            self.end(token)

    def _all_segments(self, lead: tuple[int, ...], repeat: int, device: torch.device) -> LoraSegments:
        """The segments of every adapter of the model for a batch of shape ``lead``: built once per
        batch shape (one host sync) and shared by all layers."""
        key = (lead, None, device)
        found = self.batch.segments.get(key)
        if found is None:
            per_sequence = self.batch.index.repeat_interleave(repeat)
            index = per_sequence.view(-1, *([1] * (len(lead) - 1))).expand(lead)
            found = lora_segments(index.to(device), len(self.adapters))
            self.batch.segments[key] = found
        return found

    def segments(self, layer_adapters: tuple[str, ...], x: torch.Tensor, owner: str) -> LoraSegments:
        """The segments of ``x [B', ..., in]`` for a layer holding ``layer_adapters`` (in its own
        order), built at the first layer that asks and reused by the others."""
        batch = self.batch
        lead = tuple(x.shape[:-1])
        sequences = batch.index.numel()
        if not lead:
            raise ValueError(f"{owner}: adapter_names routing needs an input [batch, ..., in], got shape "
                             f"{tuple(x.shape)}")
        rows = lead[0]
        if rows != sequences and not (batch.expand and rows % sequences == 0):
            raise ValueError(f"{owner}: adapter_names has {sequences} entries, the layer's input has a batch "
                             f"dimension of {rows} (one adapter name per sequence)")
        key = (lead, layer_adapters, x.device)
        found = batch.segments.get(key)
        if found is None:
            everyone = self._all_segments(lead, rows // sequences, x.device)
            # This layer's segments are those of its adapters, taken from the batch's segments
            # (no host sync): rows of adapters the layer lacks are in none (base only).
            positions = [self.adapters.index(name) for name in layer_adapters]
            if positions == list(range(len(self.adapters))):
                batch.segments[key] = everyone
                return everyone
            parts = [everyone.order[everyone.offsets[p]:everyone.offsets[p + 1]] for p in positions]
            offsets = [0]
            for p in positions:
                offsets.append(offsets[-1] + everyone.offsets[p + 1] - everyone.offsets[p])
            found = LoraSegments(torch.cat(parts), tuple(offsets), everyone.num_rows)
            batch.segments[key] = found
        return found


class MultiLoRALinear(WrappedLinear):
    """Wraps ``base`` (an ``nn.Linear`` or transformers' ``Conv1D``) with named LoRA adapters:
    adapter k adds ``scaling_k · B_k(A_k(drop_k(x)))``.

    Each adapter is initialised as PEFT does (``lora_A`` kaiming-uniform, a = √5; ``lora_B`` zeros)
    and has its own r, alpha, dropout and scaling (``alpha / r``, or ``alpha / √r`` with rsLoRA).
    Which adapters run is read from ``routing`` (an :class:`AdapterRouting` shared by the layers of
    one model; a layer built alone gets its own): the active set, or per sequence when routing is
    set. An adapter the layer does not hold contributes nothing here.

    Attributes:
        base_layer: the wrapped layer (frozen by the caller); ``fan_in_fan_out`` for a ``Conv1D``.
        lora_A: ``nn.ParameterDict`` name -> ``[r, in]``; lora_B: name -> ``[out, r]``.
        r, alpha, dropout_p, scaling: dicts by adapter name.

    Shapes: input ``[..., in]``, output ``[..., out]``. With ``adapter_names`` (one name per entry
    of the input's first dimension) the layer routes its own batch.
    """

    def __init__(self, base: nn.Module, routing: AdapterRouting | None = None):
        super().__init__(base, _OWNER)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.routing = routing if routing is not None else AdapterRouting()

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The adapters this layer holds, in the order added."""
        return tuple(self.lora_A.keys())

    def add_adapter(self, name: str, r: int, alpha: float, dropout_p: float = 0.0, use_rslora: bool = False) -> None:
        """Add adapter ``name`` (PEFT's initialisation: this adapter starts as a no-op)."""
        check_adapter_name(_OWNER, name)
        if name in self.lora_A:
            raise ValueError(f"{_OWNER}: the layer already has an adapter {name!r}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{_OWNER}: r must be an int >= 1, got {r!r}")
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"{_OWNER}: dropout_p must be in [0, 1), got {dropout_p!r}")
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        self.adopt_adapter(name, lora_A, lora_B, r, alpha, dropout_p, alpha / math.sqrt(r) if use_rslora else alpha / r)

    def adopt_adapter(self, name: str, lora_A: nn.Parameter, lora_B: nn.Parameter, r: int, alpha: float,
                      dropout_p: float, scaling: float) -> None:
        """Hold the given parameters (not copies: an optimizer holding them keeps training them) as
        adapter ``name``."""
        self.lora_A[name] = lora_A
        self.lora_B[name] = lora_B
        self.r[name], self.alpha[name] = r, alpha
        self.dropout_p[name], self.scaling[name] = float(dropout_p), float(scaling)
        self.routing.register(name)

    def delta_parameters(self) -> Iterator[nn.Parameter]:
        return iter([*self.lora_A.values(), *self.lora_B.values()])

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """``[lora_A, lora_B]`` of adapter ``name``, or ``[]`` when this layer lacks it."""
        return [self.lora_A[name], self.lora_B[name]] if name in self.lora_A else []

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Make ``names`` the active set (of every layer sharing this layer's routing)."""
        self.routing.set_active(_OWNER, names)

    def _dense_weight(self) -> torch.Tensor:
        return self.base_layer.weight.t() if self.fan_in_fan_out else self.base_layer.weight

    def forward(self, x: torch.Tensor, adapter_names: Sequence[str] | None = None) -> torch.Tensor:
        if adapter_names is not None:
            with self.routing.route(adapter_names, owner_name=_OWNER):
                return self.forward(x)
        if self.routing.batch is not None:
            return self._forward_routed(x)
        return self._forward_active(x)

    def _p(self, name: str) -> float:
        return self.dropout_p[name] if self.training else 0.0

    def _forward_routed(self, x: torch.Tensor) -> torch.Tensor:
        names = self.adapter_names
        if not names:
            return self.base_layer(x)
        segments = self.routing.segments(names, x, _OWNER)
        return segmented_lora_linear(
            x, self._dense_weight(), self.base_layer.bias, [self.lora_A[n] for n in names],
            [self.lora_B[n] for n in names], [self.scaling[n] for n in names], segments,
            dropout_p=[self._p(n) for n in names])

    def _forward_active(self, x: torch.Tensor) -> torch.Tensor:
        active = [n for n in self.routing.active if n in self.lora_A]
        if not active:
            return self.base_layer(x)
        weight, bias = self._dense_weight(), self.base_layer.bias
        first = active[0]
        if len(active) == 1:
            return lora_linear(x, weight, bias, self.lora_A[first], self.lora_B[first], self.scaling[first],
                               self._p(first))
        if all(self._p(n) == 0.0 for n in active):
            lora_A, lora_B, scaling = concatenated_factors([self.lora_A[n] for n in active],
                                                           [self.lora_B[n] for n in active],
                                                           [self.scaling[n] for n in active])
            return lora_linear(x, weight, bias, lora_A, lora_B, scaling, 0.0)
        # Dropout in effect: each adapter draws its own mask (PEFT's semantics).
        out = lora_linear(x, weight, bias, self.lora_A[first], self.lora_B[first], self.scaling[first],
                          self._p(first))
        for name in active[1:]:
            dropped = nn.functional.dropout(x, self._p(name), training=True) if self._p(name) else x
            update = nn.functional.linear(nn.functional.linear(dropped, self.lora_A[name]), self.lora_B[name])
            out = out + self.scaling[name] * update
        return out

    @classmethod
    def from_lora_linear(cls, layer: nn.Module, name: str, routing: AdapterRouting) -> MultiLoRALinear:
        """A ``MultiLoRALinear`` holding a ``LoRALinear``'s base and its factors (the same parameter
        objects) as adapter ``name``. DoRA and NF4 bases are refused (NotImplementedError)."""
        if layer.use_dora or layer.nf4_base:
            kind = "DoRA" if layer.use_dora else "an NF4 (QLoRA) base"
            raise NotImplementedError(f"{_OWNER}: named adapters do not support {kind} yet; the model's "
                                      f"LoRALinear layers use it")
        multi = cls(layer.base_layer, routing)
        multi.adopt_adapter(name, layer.lora_A, layer.lora_B, layer.r, layer.alpha, layer.dropout_p, layer.scaling)
        multi.train(layer.training)
        return multi

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={self.r[n]}, scaling={self.scaling[n]:g}, dropout_p={self.dropout_p[n]:g})"
                             for n in self.adapter_names)
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{adapters}]"
