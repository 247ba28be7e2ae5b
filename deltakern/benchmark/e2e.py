"""End-to-end fine-tuning step of ``deltakern bench``: a Llama-style causal LM built from a
transformers ``LlamaConfig`` with random weights (nothing downloads), fine-tuned by LoRA, prefix
tuning, Houlsby adapters, prompt tuning, P-tuning v1, BitFit or (IA)³, the PEFT way (or plain torch where
PEFT lacks the method) against deltakern's.

One training step (mode ``full``) is ``zero_grad`` + forward with ``labels`` (mean cross-entropy of
the next token) + ``loss.backward()`` + ``AdamW.step()`` over the trainable (delta) parameters:
everything a training loop does per batch, so ``tokens / step time`` is the training throughput.
Mode ``fwd`` is the forward with the autograd graph built, ``bwd`` the backward alone.

Providers (the ``providers`` dict of :class:`E2ECase`):

- ``floor``: the base model with every weight frozen, fed its input embeddings as a leaf that
  requires grad, so backward runs through every activation to the input and computes no weight
  gradient; its "optimizer" only clears that gradient. No delta method can train for less: a step
  at ``x floor`` 1.00 would cost nothing over running the frozen model forward and backward. It is
  the first provider, so the tables' ``x base`` column and ``ratio_to_floor`` in ``summary.json``
  are relative to it.
- ``reference``: what a user runs today, as each method declares it (``MethodSpec.e2e``, in
  ``deltakern/patch/<method>.py``): PEFT's ``get_peft_model`` where PEFT has the method (LoRA
  r=16 on all linear layers, 32 prefix or prompt tokens, P-tuning's MLP encoder, (IA)³ with its
  Llama defaults), plain torch where it has not (Houlsby adapters as forward hooks, BitFit's
  biases).
- ``torch.compile``: the compiled reference, on CUDA only (there the eval-mode check below
  compiles a second graph; the 3 warm-up steps absorb the train-mode one). It works on CPU too,
  but compiling is too slow for the suite's budget (~90 s for the whole end-to-end part) on this
  2-core machine: 42 s for the first call of the LoRA reference at the CPU default shape, 14-26 s
  per method even at the quick shape, and for LoRA as much again for the train-mode graph (dropout
  on) after the eval-mode check.
- ``deltakern-<backend>``: the same model with the method's ``deltakern`` builder (``add_lora``,
  ``add_prefix``, ...) and the ops forced to ``backend`` with :func:`deltakern.use_backend`. Prompt
  tuning, P-tuning and BitFit use no deltakern kernel (virtual tokens are a concatenation before
  the first layer; BitFit trains biases ``nn.Linear`` already adds), so their ratio to the
  reference is expected near 1.0: these rows show what the methods cost in the same loop, and that
  deltakern adds nothing to it.

Both models have the same base weights (one seeded build, copied) and the same delta weights (the
reference's, drawn by the method so that every path matters, copied into deltakern's). ``check``
compares the loss and every delta parameter's gradient with the eager reference's in the same
dtype, with dropout off in both (eval mode): LoRA dropout draws its masks from different generators
(torch's for PEFT, Philox for deltakern), so with dropout on the two steps differ by design. The
timed steps run in train mode with ``lora_dropout=0.05``. Sequences are packed to the full length,
so no attention mask is passed: both sides build only the causal structure. With virtual tokens
(prompt tuning, P-tuning) both sides prepend ``-100`` labels for them, so the loss is over the same
``batch * seq`` targets (the last virtual token predicts the first real one) and the logits cover
``32 + seq`` positions.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..registry import methods
from .harness import BenchSuite, check_close, saved_tensors_bytes

LEARNING_RATE = 1e-4
_SEED = 0
# Loss and each delta gradient, relative to the largest magnitude of the reference's tensor:
# (atol, rtol) of check_close. deltakern's fused kernels sum in another order than PEFT's chain of
# ops. fp32: the worst scaled errors at the CPU default shapes were 0.012 (lora), 0.009 (prefix)
# and 0.006 (adapter). bf16: 0.24, 0.10 and 0.39 at the quick shapes. fp16 (CUDA only: the CPU
# backend has no fp16) takes bf16's bound unmeasured; it keeps 3 more mantissa bits.
_TOLERANCES = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (5e-2, 5e-2), torch.float16: (5e-2, 5e-2)}
# bf16/fp16 steps are checked against the reference's step computed in fp32 from the same weights,
# as FlashAttention checks its low-precision kernels: deltakern's error may be at most twice the
# reference's own (plus 0.5% of the largest magnitude, about 1.3 bf16 ulps, for tensors the
# reference happens to get almost exactly). A fixed bound does not scale: at the default CPU shape the
# Houlsby adapters' bf16 gradients of both sides sat 13-17% from fp32, beyond the 5e-2 set at the
# quick shapes, while neither was worse than the other.
_LOW_PRECISION_FACTOR, _LOW_PRECISION_ATOL = 2.0, 5e-3


def check_model_fields(shape, names: tuple[str, ...]) -> None:
    """The fields ``names`` of an end-to-end shape are ints >= 1, and its hidden size, attention
    heads and key/value heads divide as a Llama model needs; ``ValueError`` naming the shape's
    class otherwise."""
    owner = type(shape).__name__
    for name in names:
        value = getattr(shape, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be an int >= 1, got {value!r}")
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise ValueError(f"{owner}: hidden ({shape.hidden}) must be a multiple of heads ({shape.heads}) and heads "
                         f"a multiple of kv_heads ({shape.kv_heads})")


def llama_base(shape, dtype: torch.dtype, device: str, positions: int) -> nn.Module:
    """The Llama-style causal LM of an end-to-end shape (its hidden, layers, heads, kv_heads,
    intermediate and vocab), random weights from seed _SEED, ``positions`` positions, no cache."""
    transformers, _ = _require_hf()
    config = transformers.LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=positions, use_cache=False)
    torch.manual_seed(_SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class E2EShape:
    """A Llama-style model (``hidden`` size, ``layers``, attention ``heads`` and ``kv_heads``, FFN
    ``intermediate`` size, ``vocab``) fine-tuned with ``method`` on ``batch`` sequences of ``seq``
    tokens. Raises ``ValueError`` for an unknown method or a size that does not fit."""

    method: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seq: int
    batch: int

    def __post_init__(self):
        if self.method not in methods():
            raise ValueError(f"E2EShape: unknown method {self.method!r}; expected one of {', '.join(methods())}")
        check_model_fields(self, ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "seq", "batch"))

    def __str__(self) -> str:
        return f"{self.method},h={self.hidden},L={self.layers},seq={self.seq},b={self.batch}"


def _shapes(hidden, layers, heads, kv_heads, intermediate, vocab, seq, batch) -> tuple[E2EShape, ...]:
    return tuple(E2EShape(method, hidden, layers, heads, kv_heads, intermediate, vocab, seq, batch) for method in methods())


# Head size 64 (CPU) / 128 (CUDA), grouped-query attention with 4 query heads per key/value head
# and an FFN 2.6875 times the hidden size, as in Llama 2/3. Vocabularies are chosen so the output
# layer holds 16% of the weights the tokens are multiplied by (CPU: 2.1M of 13.2M; CUDA: 65.5M
# of 420M), between Llama 2 7B (2%) and Llama 3.2 1B (21%); a 32000-word head on the 512-wide CPU
# model would be 60% of them and hide the layers the methods change.
E2E_DEFAULT_SHAPES = {
    "cpu": _shapes(hidden=512, layers=4, heads=8, kv_heads=2, intermediate=1376, vocab=4096, seq=256, batch=4),
    "cuda": _shapes(hidden=2048, layers=8, heads=16, kv_heads=4, intermediate=5504, vocab=32000, seq=1024, batch=8),
}
# --e2e-size large: the second scale of issue 21 (hidden 1024, 8 layers, 2048 tokens), the same head
# shape and FFN ratio; the output layer again 16% of the weights (16.8M of 105M).
E2E_LARGE_SHAPES = _shapes(hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=2752, vocab=16384, seq=512, batch=4)
E2E_QUICK_SHAPES = _shapes(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176, vocab=256, seq=32, batch=2)


def _require_hf():
    try:
        import peft
        import transformers
    except ImportError as error:
        raise ValueError(f"the end-to-end benchmark builds its models with transformers and PEFT: {error}") from error
    return transformers, peft


class _Step:
    """A provider: calling it runs the forward with labels on ``model`` and returns the loss;
    ``backend`` (if any) is forced with ``deltakern.use_backend`` around the forward (the op's
    backward runs on the backend its forward chose)."""

    def __init__(self, model: nn.Module, call: Callable, inputs: dict, backend: str | None = None):
        self.model, self.call, self.inputs, self.backend = model, call, inputs, backend

    def __call__(self) -> torch.Tensor:
        if self.backend is None:
            with warnings.catch_warnings():
                # PEFT's prefix tuning passes ``past_key_values``, which transformers 5 deprecates.
                warnings.simplefilter("ignore", FutureWarning)
                return self.call(**self.inputs).loss
        from ..backend import use_backend

        with use_backend(self.backend):
            return self.call(**self.inputs).loss


class _ClearGradient:
    """The floor's optimizer: nothing to update; ``zero_grad`` drops the embeddings' gradient so
    steps do not accumulate it."""

    def __init__(self, embeddings: torch.Tensor):
        self.embeddings = embeddings

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.embeddings.grad = None

    def step(self) -> None:
        pass


class E2ECase:
    """The two models of one :class:`E2EShape` and the providers that train them for one step.

    Attributes:
        shape, dtype, device: as given.
        tokens: tokens per training step, ``batch * seq``.
        warmup, repeats: the steps to warm up and to time per mode, in place of the suite's (a
            step of a default shape is 0.3-0.5 s on CPU, 20-50 times an op benchmark's call).
        reference: the PEFT model (or the base model with eager adapter hooks, or with BitFit's biases).
        model: the deltakern model.
    """

    def __init__(self, shape: E2EShape, dtype: torch.dtype, device: str):
        if not isinstance(shape, E2EShape):
            raise ValueError(f"E2ECase: shape must be an E2EShape, got {type(shape).__name__}")
        self.shape, self.dtype, self.device = shape, dtype, device
        self.tokens = shape.batch * shape.seq
        # CPU: the whole end-to-end part (6 methods, reference and deltakern-cpu, 13-19 s each) took
        # 93 s wall with (1, 5) on this idle 2-core machine, 8.5 min under a CI run's load.
        # CUDA: 3 warm-up steps cover torch.compile's train-mode graph and its lazily compiled backward.
        self.warmup, self.repeats = (1, 5) if device == "cpu" else (3, 10)
        base = llama_base(shape, dtype, device, shape.seq + max(m.e2e.virtual_tokens for m in methods().values()))
        ours = copy.deepcopy(base)
        self.floor = copy.deepcopy(base).requires_grad_(False).train()
        providers = methods()[shape.method].e2e
        torch.manual_seed(_SEED + 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.reference = providers.reference(base).train()
        self.model = providers.deltakern(ours).train()
        self.pairs = providers.pairs(self.reference, self.model)
        trainable = {id(p) for p in self.model.parameters() if p.requires_grad}
        if trainable != {id(mine) for _, _, mine in self.pairs}:
            raise RuntimeError(f"E2ECase: deltakern's trainable parameters do not pair up with the reference's "
                               f"({len(trainable)} trainable, {len(self.pairs)} pairs)")
        self._initial = [reference.detach().clone() for _, reference, _ in self.pairs]
        self._load_initial()
        g = torch.Generator().manual_seed(_SEED + 1)
        ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=g).to(device)
        self.inputs = {"input_ids": ids, "labels": ids}
        with torch.no_grad():
            embeddings = self.floor.get_input_embeddings()(ids)
        self.floor_inputs = {"inputs_embeds": embeddings.requires_grad_(True), "labels": ids}
        self._optimizers: dict[int, torch.optim.Optimizer | _ClearGradient] = {
            id(self.floor): _ClearGradient(self.floor_inputs["inputs_embeds"])}
        self._expected: dict[str, torch.Tensor] | None = None
        self._expected_fp32: dict[str, torch.Tensor] | None = None

    def _load_initial(self) -> None:
        """Give both models the delta weights they started with (timed steps move them)."""
        with torch.no_grad():
            for (_, reference, ours), initial in zip(self.pairs, self._initial):
                reference.copy_(initial)
                ours.copy_(initial.reshape(ours.shape))  # a method's two layouts may differ (its pairs say)

    # -- providers --------------------------------------------------------------------------

    def providers(self, backends: Iterable[str], with_compile: bool = True) -> dict[str, _Step]:
        """``floor``, ``reference``, ``torch.compile`` (CUDA only, see the module docstring) and
        ``deltakern-<backend>``."""
        found = {"floor": _Step(self.floor, self.floor, self.floor_inputs),
                 "reference": _Step(self.reference, self.reference, self.inputs)}
        if with_compile and self.device == "cuda":
            found["torch.compile"] = _Step(self.reference, torch.compile(self.reference), self.inputs)
        for backend in backends:
            found[f"deltakern-{backend}"] = _Step(self.model, self.model, self.inputs, backend)
        return found

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        if id(model) not in self._optimizers:
            trainable = [p for p in model.parameters() if p.requires_grad]
            self._optimizers[id(model)] = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
        return self._optimizers[id(model)]

    def _gradients(self, fn: _Step) -> dict[str, torch.Tensor]:
        """Loss and delta gradients of one step of ``fn`` at the initial delta weights, dropout off."""
        self._load_initial()
        fn.model.zero_grad(set_to_none=True)
        fn.model.eval()
        try:
            loss = fn()
            loss.backward()
        finally:
            fn.model.train()
        column = 1 if fn.model is self.reference else 2
        found = {"loss": loss.detach()}
        for pair in self.pairs:
            found[pair[0]] = pair[column].grad.detach().reshape(pair[1].shape).clone()
        fn.model.zero_grad(set_to_none=True)
        return found

    def check(self, provider: str, fn: _Step) -> tuple[bool, float]:
        """Compare ``fn``'s loss and delta gradients with the eager reference's, each relative to the
        largest magnitude of the reference's tensor. In fp32 the reference's own run is the
        expectation; in bf16/fp16 the expectation is the reference computed in fp32, and ``fn``'s
        error may be at most twice the low-precision reference's (``_LOW_PRECISION_FACTOR``).
        The floor has no delta: its loss from the embeddings must equal the frozen base model's
        loss from the token ids, and its backward must reach the embeddings."""
        if fn.model is self.floor:
            return self._check_floor(fn)
        results = self._gradients(fn)
        if self._expected is None:
            self._expected = results if provider == "reference" else self._gradients(
                _Step(self.reference, self.reference, self.inputs))
        scales = {name: expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
                  for name, expected in self._expected.items()}
        if self.dtype in (torch.bfloat16, torch.float16):
            return self._check_against_fp32(results, scales)
        atol, rtol = _TOLERANCES[self.dtype]
        return check_close({name: value / scales[name] for name, value in results.items()},
                           {name: value / scales[name] for name, value in self._expected.items()}, atol, rtol)

    def _check_against_fp32(self, results: dict[str, torch.Tensor],
                            scales: dict[str, torch.Tensor]) -> tuple[bool, float]:
        """Each tensor's largest error against the fp32 reference, over its bound
        ``2 · (the low-precision reference's error) + 5e-3``, all relative to ``scales``."""
        if self._expected_fp32 is None:
            self._expected_fp32 = self._reference_in_fp32()
        worst = 0.0
        for name, value in results.items():
            exact = self._expected_fp32[name].double()
            scale = scales[name].double()
            reference_error = ((self._expected[name].double() - exact).abs().max() / scale).item()
            error = ((value.double() - exact).abs().max() / scale).item()
            worst = max(worst, error / (_LOW_PRECISION_FACTOR * reference_error + _LOW_PRECISION_ATOL))
        return worst <= 1.0 and math.isfinite(worst), worst

    def _reference_in_fp32(self) -> dict[str, torch.Tensor]:
        """The loss and delta gradients of :meth:`_gradients` for an fp32 copy of the reference
        (its low-precision weights, exactly representable in fp32, at their initial values)."""
        self._load_initial()
        names = {id(p): name for name, p in self.reference.named_parameters()}
        exact = copy.deepcopy(self.reference).float()
        parameters = dict(exact.named_parameters())
        exact.eval()
        loss = _Step(exact, exact, self.inputs)()
        loss.backward()
        found = {"loss": loss.detach()}
        for pair in self.pairs:
            found[pair[0]] = parameters[names[id(pair[1])]].grad.detach().clone()
        return found

    def _check_floor(self, fn: _Step) -> tuple[bool, float]:
        embeddings = self.floor_inputs["inputs_embeds"]
        self.floor.eval()
        try:
            loss = fn()
            loss.backward()
            with torch.no_grad():
                expected = self.floor(**self.inputs).loss
        finally:
            self.floor.train()
        reached = embeddings.grad is not None and bool(embeddings.grad.abs().sum() > 0)
        embeddings.grad = None
        error = (loss.detach() - expected).abs().item() / max(expected.abs().item(), torch.finfo(expected.dtype).tiny)
        atol, _ = _TOLERANCES[self.dtype]
        return reached and error <= atol, error

    def run_mode(self, provider: str, fn: _Step, mode: str) -> tuple[Callable, Callable | None]:
        """(timed callable, setup) for ``mode``: ``fwd`` builds the graph, ``bwd`` runs backward
        only, ``full`` is the training step (zero_grad, forward, backward, AdamW step)."""
        model = fn.model
        optimizer = self._optimizer(model)
        if mode == "fwd":
            return fn, None
        if mode == "full":
            def step():
                optimizer.zero_grad(set_to_none=True)
                fn().backward()
                optimizer.step()

            return step, None
        if mode != "bwd":
            raise ValueError(f"E2ECase.run_mode: unknown mode {mode!r}; expected fwd, bwd or full")

        def setup():
            optimizer.zero_grad(set_to_none=True)
            return fn()

        return (lambda loss: loss.backward()), setup

    def saved_bytes(self, fn: _Step) -> int:
        """Bytes autograd saves for the backward of one forward of ``fn``, parameters excluded."""
        return saved_tensors_bytes(fn, exclude=list(fn.model.parameters()))


SUITE = BenchSuite("e2e", E2EShape, E2E_DEFAULT_SHAPES, E2E_QUICK_SHAPES, E2ECase)
