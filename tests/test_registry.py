"""The op and method registry (deltakern/registry.py): every declared op has a reference, its
backends, a benchmark suite and an AOT entry; every method its end-to-end providers and a
checkpoint format; and code outside an op's own files does not name it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

import deltakern
from deltakern import _native
from deltakern.backend import BACKENDS
from deltakern.benchmark.harness import BenchSuite
from deltakern.registry import OpSpec, OwnFormat, PeftFormat, methods, ops

ROOT = Path(deltakern.__file__).resolve().parent.parent


def _has_kernel(qualified: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualified, dispatch_key)


def op_problems(spec: OpSpec) -> list[str]:
    """What ``spec`` lacks of a complete op; empty for a complete one."""
    problems = []
    if not callable(spec.reference):
        problems.append("no reference function")
    if getattr(deltakern, spec.name, None) is None:
        problems.append(f"no public deltakern.{spec.name}")
    if tuple(spec.backends) != BACKENDS:
        problems.append(f"backends {spec.backends}, expected {BACKENDS}")
    for suffix in ("fwd_triton", "bwd_triton"):
        if not torch._C._dispatch_has_kernel(f"deltakern::{spec.name}_{suffix}"):
            problems.append(f"no Triton custom op deltakern::{spec.name}_{suffix}")
    if _native.has_cpu_kernels():
        keys = ["CPU"] + (["CUDA"] if _native.has_cuda_kernels() else [])
        for suffix in ("fwd", "bwd"):
            name = f"deltakern::{spec.name}_{suffix}"
            missing = [key for key in keys if not torch._C._dispatch_has_kernel(name) or not _has_kernel(name, key)]
            if missing:
                problems.append(f"no {'/'.join(missing)} kernel for {name}")
    try:
        suite = spec.bench_module().SUITE
    except (ImportError, AttributeError) as error:
        problems.append(f"no benchmark suite ({error})")
    else:
        if not isinstance(suite, BenchSuite) or suite.name != spec.name:
            problems.append(f"benchmark SUITE is not a BenchSuite named {spec.name!r}")
        elif not (suite.defaults("cpu") and suite.quick_shapes):
            problems.append("benchmark suite without default or quick shapes")
    if spec.cuda_tensor_cores not in ("SIMT", "cuBLAS"):
        problems.append(f"cuda_tensor_cores {spec.cuda_tensor_cores!r}, expected 'SIMT' or 'cuBLAS'")
    try:
        aot = spec.triton_module().AOT
    except (ImportError, AttributeError) as error:
        problems.append(f"no AOT entry ({error})")
    else:
        if not aot.kernels or not aot.variants:
            problems.append("AOT entry without kernels or variants")
    return problems


def test_the_registry_lists_every_op_and_method():
    assert list(ops()) == ["lora_linear", "prefix_attention", "adapter", "ia3_linear", "qlora_linear", "dora_linear",
                          "segmented_lora_linear"]
    assert [spec.cli_name for spec in ops().values()] == ["lora", "prefix", "adapter", "ia3", "qlora", "dora",
                                                          "multi-lora"]
    assert list(methods()) == ["lora", "qlora", "dora", "prefix", "adapter", "prompt", "ptuning", "bitfit", "ia3", "lst"]


@pytest.mark.parametrize("name", list(ops()))
def test_every_op_is_complete(name):
    assert op_problems(ops()[name]) == []


def test_an_incomplete_op_is_caught():
    """A declared op with nothing behind it: every missing piece is named."""
    spec = OpSpec(name="nothing_linear", cli_name="nothing", reference=None, backends=("reference",),
                  cuda_tensor_cores="tensor cores")
    problems = op_problems(spec)
    for expected in ("no reference function", "no public deltakern.nothing_linear", "backends ('reference',)",
                     "no Triton custom op deltakern::nothing_linear_fwd_triton", "no benchmark suite",
                     "cuda_tensor_cores 'tensor cores'", "no AOT entry"):
        assert any(p.startswith(expected) for p in problems), (expected, problems)
    if _native.has_cpu_kernels():
        assert "no CPU" + ("/CUDA" if _native.has_cuda_kernels() else "") + \
            " kernel for deltakern::nothing_linear_fwd" in problems
    # One piece missing from a real op is caught too.
    lora = ops()["lora_linear"]
    assert op_problems(dataclasses.replace(lora, name="lora_linear_v2")) != []
    assert op_problems(dataclasses.replace(lora, reference="not callable")) == ["no reference function"]


def test_every_method_declares_e2e_providers_and_a_format():
    formats = {}
    for name, spec in methods().items():
        assert callable(spec.e2e.reference) and callable(spec.e2e.deltakern) and callable(spec.e2e.pairs), name
        if spec.checkpoint is None:
            continue
        assert callable(spec.present) and callable(spec.checkpoint.save) and callable(spec.checkpoint.load), name
        keys = spec.checkpoint.peft_types if isinstance(spec.checkpoint, PeftFormat) else (spec.checkpoint.stem,)
        assert isinstance(spec.checkpoint, (PeftFormat, OwnFormat))
        for key in keys:
            assert formats.setdefault(key, name) == name, f"{key} is declared by {formats[key]} and {name}"
    # P-tuning is saved as PEFT's P_TUNING type, which prompt tuning's format reads.
    assert methods()["ptuning"].checkpoint is None and formats["P_TUNING"] == "prompt"


def test_registering_twice_raises():
    from deltakern.registry import register_method, register_op

    with pytest.raises(ValueError, match="op 'lora_linear' is registered twice"):
        register_op(ops()["lora_linear"])
    with pytest.raises(ValueError, match="method 'lora' is registered twice"):
        register_method(methods()["lora"])


# Files that may name every op: the package faces, and the GPU report's generated list of known
# failing compiles (data: one row key per compile, each naming its op).
FACES = ("__init__.py", "bindings.cpp", "aot_known_problems.py")
# An op's own files: those whose path names its method (nn/lora.py, patch/ia3.py, ...) or the op.
# The LoRA variants (QLoRA, DoRA) are built on lora_linear's decomposition and kernels: their
# files are lora_linear's family. The segmented (multi-adapter) op's layers are multi_lora.py.
OWN = {"lora_linear": ("lora", "dora"), "prefix_attention": ("prefix",), "ia3_linear": ("ia3",),
       "qlora_linear": ("qlora",), "dora_linear": ("dora",),
       "segmented_lora_linear": ("segmented_lora", "multi_lora")}


def files_naming(name: str) -> list[str]:
    """Source files of deltakern/ and csrc/ that name ``name``, outside its own files and the faces."""
    pattern = re.compile(re.escape(name))
    found = []
    for path in sorted([*ROOT.joinpath("deltakern").rglob("*.py"), *ROOT.joinpath("csrc").rglob("*.*")]):
        relative = path.relative_to(ROOT).as_posix()
        if path.name in FACES or any(key in relative for key in OWN[name]) or path.suffix not in (".py", ".cpp", ".h", ".cu", ".cuh"):
            continue
        if pattern.search(path.read_text(errors="replace")):
            found.append(relative)
    return found


@pytest.mark.parametrize("name", list(OWN))
def test_an_op_is_named_in_at_most_three_other_files(name):
    """The layout's test: adding an op touches its own files, its tests and the package faces.
    ("adapter" is left out: it is also the word PEFT uses for any delta, adapter_config.json.)"""
    assert len(files_naming(name)) <= 3, files_naming(name)
