"""Many adapters in one batch, end to end (``deltakern bench --ops e2e-multi``): the Llama-style model
of ``e2e.py`` with n LoRA adapters (r=16, alpha=32, all linear layers, B drawn from N(0, 0.02²)),
a batch of sequences whose sequence j belongs to adapter ``j mod n``.

Modes (not ``e2e``'s: this suite compares serving and training several adapters at once):

- ``fwd``: inference, the model in eval mode under ``torch.no_grad`` (logits of the whole batch);
- ``full``: one training step (zero_grad, forward with labels, backward, AdamW step over every
  adapter's parameters); ``bwd``: the backward of that step alone.

Providers:

- ``single-adapter``: deltakern's ``add_lora`` with ONE adapter over the whole batch: the floor
  (the issue's targets: 8 adapters within 1.05× of it for inference, 1.10× for a training step);
- ``reference``: PEFT. Inference: the mixed batch through ``model(..., adapter_names=...)``.
  Training: PEFT refuses ``adapter_names`` in training, so a PEFT user trains the adapters apart:
  n steps, each ``set_adapter(i)`` and a step on adapter i's sequences (the same tokens in all);
- ``deltakern-<backend>``: ``add_lora(..., adapter_name=...)`` n times and
  ``model(..., adapter_names=...)`` for both modes (one step trains every adapter).

No dropout on any side (``lora_dropout=0``): PEFT's mixed batches run in eval mode only.

Checks (the same weights on every side, eval mode): deltakern's mixed batch against PEFT's
``adapter_names`` forward: the loss and every adapter's gradients; the single adapter against PEFT
with that adapter active; PEFT's n separate steps against its mixed batch (adapter i's gradient of
its own mean loss, times its share of the batch, is its gradient of the batch's mean loss).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .e2e import (
    _SEED,
    _TOLERANCES,
    LEARNING_RATE,
    _require_hf,
    check_model_fields,
    llama_base,
)
from .harness import BenchSuite, check_close, saved_tensors_bytes

R, ALPHA, B_STD = 16, 32, 0.02


@dataclass(frozen=True)
class MultiAdapterShape:
    """A Llama-style model (as :class:`~deltakern.benchmark.e2e.E2EShape`) with ``adapters`` LoRA
    adapters over ``batch`` sequences of ``seq`` tokens (``batch`` a multiple of ``adapters``)."""

    adapters: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seq: int
    batch: int

    def __post_init__(self):
        check_model_fields(self, ("adapters", "hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "seq",
                                  "batch"))
        if self.batch % self.adapters:
            raise ValueError(f"MultiAdapterShape: batch ({self.batch}) must be a multiple of adapters ({self.adapters})")

    def __str__(self) -> str:
        return f"adapters={self.adapters},h={self.hidden},L={self.layers},seq={self.seq},b={self.batch}"


# The case: 8 sequences of 128 tokens over 8 adapters, on e2e's CPU model; on CUDA e2e's
# CUDA model with 8 sequences of 1024 tokens.
DEFAULT_SHAPES = {
    "cpu": (MultiAdapterShape(8, hidden=512, layers=4, heads=8, kv_heads=2, intermediate=1376, vocab=4096, seq=128,
                              batch=8),),
    "cuda": (MultiAdapterShape(8, hidden=2048, layers=8, heads=16, kv_heads=4, intermediate=5504, vocab=32000,
                               seq=1024, batch=8),),
}
QUICK_SHAPES = (MultiAdapterShape(4, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176, vocab=256, seq=16,
                                  batch=4),)


class _Provider:
    """One provider: ``model``, the ``params`` its optimizer trains, ``infer`` (a forward for eval
    mode under no_grad) and ``forwards``: the training forwards of one step, each a callable that
    returns a loss (one for a mixed or single-adapter batch, n for PEFT's separate steps, each of
    which selects its adapter first). ``backend`` is forced around every call."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], infer: Callable,
                 forwards: list[Callable[[], torch.Tensor]], backend: str | None = None):
        self.model, self.params, self._infer, self._forwards, self.backend = model, params, infer, forwards, backend

    def _forced(self, fn: Callable):
        if self.backend is None:
            return fn()
        from ..backend import use_backend

        with use_backend(self.backend):
            return fn()

    def infer(self) -> torch.Tensor:
        self.model.eval()
        try:
            with torch.no_grad():
                return self._forced(self._infer)
        finally:
            self.model.train()

    @property
    def forwards(self) -> list[Callable[[], torch.Tensor]]:
        return [lambda forward=forward: self._forced(forward) for forward in self._forwards]


class MultiAdapterCase:
    """The models of one :class:`MultiAdapterShape` and their providers.

    Attributes: shape, dtype, device; tokens (per step); warmup, repeats (as e2e's); peft (the PEFT
    model with n adapters); mixed (deltakern's named adapters); single (deltakern's one adapter,
    adapter 0's weights); names (adapter per sequence).
    """

    def __init__(self, shape: MultiAdapterShape, dtype: torch.dtype, device: str):
        if not isinstance(shape, MultiAdapterShape):
            raise ValueError(f"MultiAdapterCase: shape must be a MultiAdapterShape, got {type(shape).__name__}")
        import deltakern

        _, peft = _require_hf()
        self.shape, self.dtype, self.device = shape, dtype, device
        self.tokens = shape.batch * shape.seq
        self.warmup, self.repeats = (1, 5) if device == "cpu" else (3, 10)
        base = llama_base(shape, dtype, device, shape.seq)
        mixed, single = copy.deepcopy(base), copy.deepcopy(base)
        self.adapters = [f"adapter{i}" for i in range(shape.adapters)]
        lora_config = peft.LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                      target_modules="all-linear")
        torch.manual_seed(_SEED + 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.peft = peft.get_peft_model(base, lora_config, adapter_name=self.adapters[0])
            for name in self.adapters[1:]:
                self.peft.add_adapter(name, lora_config)
        with torch.no_grad():
            for name, parameter in self.peft.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, B_STD)
        self.peft.train()
        for name in self.adapters:
            deltakern.add_lora(mixed, r=R, alpha=ALPHA, dropout_p=0.0, target_modules="all-linear", adapter_name=name)
        deltakern.add_lora(single, r=R, alpha=ALPHA, dropout_p=0.0, target_modules="all-linear")
        self.mixed, self.single = mixed.train(), single.train()
        self.pairs = self._pairs()
        self._initial = [p.detach().clone() for _, p, _ in self.pairs]
        self._load_initial()
        g = torch.Generator().manual_seed(_SEED + 1)
        self.ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=g).to(device)
        self.names = [self.adapters[j % shape.adapters] for j in range(shape.batch)]
        self.rows = {name: [j for j, n in enumerate(self.names) if n == name] for name in self.adapters}
        # Keyed by the ids of the parameters trained, which live as long as the case: a provider
        # object is rebuilt by each providers() call, and a dropped one's id can come back for
        # another provider (which then stepped the first one's parameters).
        self._optimizers: dict[tuple[int, ...], torch.optim.Optimizer] = {}
        self._expected: dict[str, dict[str, torch.Tensor]] = {}

    def _pairs(self) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
        """(name, PEFT parameter, deltakern parameter) for every adapter's lora_A and lora_B in the
        mixed model and, for the first adapter, in the single-adapter model."""
        from peft.tuners.lora import LoraLayer

        pairs = []
        for path, layer in self.peft.get_base_model().named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            mine = self.mixed.get_submodule(path)
            for name in self.adapters:
                pairs.append((f"{path}.lora_A.{name}", layer.lora_A[name].weight, mine.lora_A[name]))
                pairs.append((f"{path}.lora_B.{name}", layer.lora_B[name].weight, mine.lora_B[name]))
            one = self.single.get_submodule(path)
            first = self.adapters[0]
            pairs.append((f"single:{path}.lora_A", layer.lora_A[first].weight, one.lora_A))
            pairs.append((f"single:{path}.lora_B", layer.lora_B[first].weight, one.lora_B))
        return pairs

    def _load_initial(self) -> None:
        with torch.no_grad():
            for (_, reference, ours), initial in zip(self.pairs, self._initial):
                reference.copy_(initial)
                ours.copy_(initial)

    # -- providers --------------------------------------------------------------------------

    def _adapter_params(self, model: nn.Module, single: bool) -> list[nn.Parameter]:
        column = 1 if model is self.peft else 2
        return [pair[column] for pair in self.pairs if pair[0].startswith("single:") == single]

    def _peft_step_on(self, name: str) -> torch.Tensor:
        """PEFT's training forward of adapter ``name`` on its own sequences (``set_adapter`` also
        makes only that adapter trainable, as a PEFT user's separate run would)."""
        rows = self.rows[name]
        self.peft.set_adapter(name)
        return self.peft(input_ids=self.ids[rows], labels=self.ids[rows]).loss

    def providers(self, backends: Iterable[str], with_compile: bool = True) -> dict[str, _Provider]:
        """``single-adapter``, ``reference`` and ``deltakern-<backend>``; torch.compile is left out
        (PEFT's mixed batch indexes its rows by adapter in Python)."""
        ids, names = self.ids, self.names
        single, mixed, peft = self.single, self.mixed, self.peft
        found = {
            "single-adapter": _Provider(single, self._adapter_params(single, True),
                                        lambda: single(input_ids=ids).logits,
                                        [lambda: single(input_ids=ids, labels=ids).loss]),
            "reference": _Provider(peft, self._adapter_params(peft, False),
                                   lambda: peft(input_ids=ids, adapter_names=names).logits,
                                   [lambda name=name: self._peft_step_on(name) for name in self.adapters]),
        }
        for backend in backends:
            found[f"deltakern-{backend}"] = _Provider(
                mixed, self._adapter_params(mixed, False), lambda: mixed(input_ids=ids, adapter_names=names).logits,
                [lambda: mixed(input_ids=ids, labels=ids, adapter_names=names).loss], backend)
        return found

    def _optimizer(self, fn: _Provider) -> torch.optim.Optimizer:
        key = tuple(id(p) for p in fn.params)
        if key not in self._optimizers:
            self._optimizers[key] = torch.optim.AdamW(fn.params, lr=LEARNING_RATE)
        return self._optimizers[key]

    # -- checks -----------------------------------------------------------------------------

    def _gradients(self, fn: _Provider) -> dict[str, torch.Tensor]:
        """At the initial weights, eval mode: the batch's mean loss (the mean of the forwards'
        losses: every forward covers the same number of tokens) and its gradient for every
        parameter ``fn`` trains (zeros where a forward left one without)."""
        self._load_initial()
        for p in fn.params:
            p.requires_grad_(True)
            p.grad = None
        fn.model.eval()
        try:
            forwards = fn.forwards
            total = 0.0
            for forward in forwards:
                loss = forward() / len(forwards)
                loss.backward()
                total = total + loss.detach()
        finally:
            fn.model.train()
            for p in fn.params:  # PEFT's set_adapter froze all but the last adapter
                p.requires_grad_(True)
        found = {"loss": total}
        for i, p in enumerate(fn.params):
            found[i] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
            p.grad = None
        return found

    def _expectation(self, single: bool) -> dict[str, torch.Tensor]:
        """PEFT in eval mode: the mixed batch through ``adapter_names`` or, for the single adapter,
        its first adapter over the whole batch."""
        key = "single" if single else "mixed"
        if key not in self._expected:
            ids, peft = self.ids, self.peft

            def forward() -> torch.Tensor:
                if single:
                    peft.set_adapter(self.adapters[0])
                    return peft(input_ids=ids, labels=ids).loss
                return peft(input_ids=ids, labels=ids, adapter_names=self.names).loss

            fn = _Provider(peft, self._adapter_params(peft, single), None, [forward])
            self._expected[key] = self._gradients(fn)
        return self._expected[key]

    def check(self, provider: str, fn: _Provider) -> tuple[bool, float]:
        """Loss and gradients against PEFT's eval-mode expectation, each relative to the largest
        magnitude of the expected tensor (as e2e's check)."""
        results = self._gradients(fn)
        expected = self._expectation(provider == "single-adapter")
        scales = {name: value.abs().max().clamp_min(torch.finfo(value.dtype).tiny) for name, value in expected.items()}
        atol, rtol = _TOLERANCES[self.dtype]
        return check_close({name: value / scales[name] for name, value in results.items()},
                           {name: value / scales[name] for name, value in expected.items()}, atol, rtol)

    # -- timing -----------------------------------------------------------------------------

    def run_mode(self, provider: str, fn: _Provider, mode: str) -> tuple[Callable, Callable | None]:
        """(timed callable, setup): ``fwd`` inference, ``full`` a training step (for PEFT's
        separate steps, n of them), ``bwd`` the backward(s) alone."""
        optimizer = self._optimizer(fn)
        if mode == "fwd":
            return fn.infer, None
        if mode == "full":
            def step():
                for forward in fn.forwards:
                    optimizer.zero_grad(set_to_none=True)
                    forward().backward()
                    optimizer.step()

            return step, None
        if mode != "bwd":
            raise ValueError(f"MultiAdapterCase.run_mode: unknown mode {mode!r}; expected fwd, bwd or full")

        def setup():
            optimizer.zero_grad(set_to_none=True)
            return [forward() for forward in fn.forwards]

        return (lambda losses: [loss.backward() for loss in losses]), setup

    def saved_bytes(self, fn: _Provider) -> int:
        """Bytes autograd saves for the backward of one training forward, parameters excluded (for
        PEFT's separate steps, the largest of its n forwards: they run one after another)."""
        params = list(fn.model.parameters())
        return max(saved_tensors_bytes(forward, exclude=params) for forward in fn.forwards)


SUITE = BenchSuite("e2e_multi", MultiAdapterShape, DEFAULT_SHAPES, QUICK_SHAPES, MultiAdapterCase)
