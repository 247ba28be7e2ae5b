"""What the rest of deltakern knows of each op and each delta method, declared once beside its code.

An op module (``deltakern/ops/<op>.py``) declares an :class:`OpSpec` with :func:`register_op`; the
op's benchmark suite lives in ``deltakern/benchmark/cases/<op>.py`` (``SUITE``) and its
ahead-of-time compile variants next to its Triton kernels, in ``deltakern/triton_kernels/<op>.py``
(``AOT``). A delta method (``deltakern/patch/<method>.py``) declares a :class:`MethodSpec` with
:func:`register_method`: its checkpoint format and its end-to-end benchmark providers.

``cli``, the benchmark harness, ``e2e``, ``triton_kernels.aot``, ``gpu_report`` and
``patch.checkpoint`` loop over :func:`ops` and :func:`methods` and name no op or method; adding an
op touches its own files, its tests and the package faces. ``tests/test_registry.py`` fails when a
registered op lacks a reference, a backend, a benchmark suite or an AOT entry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

_OPS: dict[str, OpSpec] = {}
_METHODS: dict[str, MethodSpec] = {}


@dataclass(frozen=True)
class OpSpec:
    """One op.

    name: the public function ``deltakern.<name>``, the stem of its files in every layer, and the
        prefix of its custom ops (``deltakern::<name>_fwd``, ``_bwd``, ``_fwd_triton``, ...).
    cli_name: its name in ``deltakern bench --ops`` and ``--shapes`` files.
    reference: the pure-PyTorch function every backend is tested against.
    backends: the backends that run it (a subset of ``backend.BACKENDS``).
    cuda_tensor_cores: what the GPU report says of its CUDA kernels when their cubins hold no
        tensor-core instruction: ``"SIMT"`` (written without tensor cores on purpose) or
        ``"cuBLAS"`` (its GEMMs run in cuBLAS, outside deltakern's cubins; its own kernels are
        element-wise).
    """

    name: str
    cli_name: str
    reference: Callable
    backends: tuple[str, ...]
    cuda_tensor_cores: str

    def bench_module(self) -> ModuleType:
        """``deltakern.benchmark.cases.<name>``: its benchmark ``SUITE``."""
        return importlib.import_module(f"deltakern.benchmark.cases.{self.name}")

    def triton_module(self) -> ModuleType:
        """``deltakern.triton_kernels.<name>``: its kernels, launchers and ``AOT`` spec (imports Triton)."""
        return importlib.import_module(f"deltakern.triton_kernels.{self.name}")


@dataclass(frozen=True)
class PeftFormat:
    """A method saved in PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``.

    peft_types: the ``peft_type`` values it loads. save(model) -> (config, state);
    load(model, config, state) -> model. PEFT's format holds one method per checkpoint.

    A method with named adapters (PEFT's multi-adapter layout: ``"default"`` at the root, every
    other adapter in a subfolder of its name) also declares adapters(model) -> its adapter names
    ([] when the model's delta is unnamed), save_adapter(model, name) -> (config, state) and
    load_adapter(model, config, state, name) -> model.
    """

    peft_types: tuple[str, ...]
    save: Callable
    load: Callable
    adapters: Callable | None = None
    save_adapter: Callable | None = None
    load_adapter: Callable | None = None


@dataclass(frozen=True)
class OwnFormat:
    """A method saved in deltakern's own ``<stem>.json`` + ``<stem>.safetensors``.

    load_order: the methods with their own files load in this order around the PEFT part (lower
    first, negative before PEFT's): wrappers that PEFT names refer to load first.
    """

    stem: str
    save: Callable
    load: Callable
    load_order: int


@dataclass(frozen=True)
class E2EProviders:
    """How the end-to-end benchmark (``deltakern.benchmark.e2e``) fine-tunes a Llama-style model with a method.

    reference(base) -> model: what a user runs today (PEFT, or plain torch where PEFT lacks the
        method), its delta weights drawn so that every path matters (not PEFT's zero init).
    deltakern(base) -> model: the same method through deltakern.
    pairs(reference_model, deltakern_model) -> [(name, reference parameter, deltakern parameter)]:
        every delta parameter, the two holding the same values (reshaped where the layouts differ).
    virtual_tokens: tokens the method puts before the input (prompt tuning, P-tuning, prefix):
        the model's positions must cover them.
    """

    reference: Callable
    deltakern: Callable
    pairs: Callable
    virtual_tokens: int = 0


@dataclass(frozen=True)
class MethodSpec:
    """One delta method.

    name: its name in the end-to-end suite (``E2EShape.method``). label: how messages name it.
    present(model) -> whether ``model`` carries it (so ``save`` writes it). checkpoint: its
    format, or None when another method's format carries it (P-tuning saves as prompt tuning).
    e2e: its end-to-end providers.
    """

    name: str
    label: str
    e2e: E2EProviders
    present: Callable | None = None
    checkpoint: PeftFormat | OwnFormat | None = None


def register_op(spec: OpSpec) -> OpSpec:
    if spec.name in _OPS:
        raise ValueError(f"deltakern.registry: op {spec.name!r} is registered twice")
    _OPS[spec.name] = spec
    return spec


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in _METHODS:
        raise ValueError(f"deltakern.registry: method {spec.name!r} is registered twice")
    if spec.checkpoint is not None and spec.present is None:
        raise ValueError(f"deltakern.registry: method {spec.name!r} has a checkpoint format but no present()")
    _METHODS[spec.name] = spec
    return spec


def ops() -> dict[str, OpSpec]:
    """Every op, in registration order (``deltakern.ops`` imports them)."""
    importlib.import_module("deltakern.ops")
    return dict(_OPS)


def methods() -> dict[str, MethodSpec]:
    """Every delta method, in registration order (``deltakern.patch`` imports them)."""
    importlib.import_module("deltakern.patch")
    return dict(_METHODS)


def op_by_cli_name(cli_name: str) -> OpSpec:
    for spec in ops().values():
        if spec.cli_name == cli_name:
            return spec
    raise KeyError(cli_name)
