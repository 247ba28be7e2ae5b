"""How deltakern._C was built, and that deltakern works without it."""

import os
import shutil
import subprocess
import sys

import torch

import deltakern
from deltakern import _native
from deltakern.gpu_report import parse_resource_usage
from deltakern.registry import ops


def cuda_build_expected() -> bool:
    """setup.py's rule: CUDA kernels when torch is a CUDA build, nvcc exists and not disabled."""
    return (
        torch.version.cuda is not None
        and (shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc"))
        and os.environ.get("DELTAKERN_BUILD_CUDA", "1") != "0"
    )


def test_extension_loads_with_cpu_kernels():
    assert _native.C is not None, _native.LOAD_ERROR
    assert _native.has_cpu_kernels()
    assert hasattr(torch.ops.deltakern, "lora_linear_fwd")


# Every op has its kernels in csrc/cuda/<op>.cu.
CUDA_SOURCES = tuple(ops())


def cuobjdump(*args) -> str:
    """Triton's bundled cuobjdump on the built extension."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, *args, _native.C.__file__], capture_output=True, text=True, check=True).stdout


def test_cuda_kernels_built_for_sm80_and_sm90():
    if not cuda_build_expected():
        assert not _native.has_cuda_kernels()
        return
    assert _native.has_cuda_kernels()
    archs = os.environ.get("DELTAKERN_CUDA_ARCHS", "80;90").split(";")
    assert _native.cuda_archs() == [f"sm_{a}" for a in archs]
    listing = cuobjdump("--list-elf")
    for source in CUDA_SOURCES:
        for arch in archs:
            assert f"{source}.sm_{arch}.cubin" in listing


def test_cuda_kernels_use_no_local_memory():
    """No register spills: every kernel of every cubin has 0 bytes of stack and local memory
    (the resource usage ptxas recorded in the cubins of the built extension)."""
    if not cuda_build_expected():
        return
    functions = parse_resource_usage(cuobjdump("--dump-resource-usage"))
    for source in CUDA_SOURCES:
        assert any(f.source == source for f in functions), f"no {source} kernel in the cubins"
    spilling = [(f.name, f.registers, f.stack, f.local) for f in functions if f.stack or f.local]
    assert not spilling, f"kernels using local memory (name, registers, stack, local): {spilling}"


def test_import_without_extension_falls_back_to_reference():
    code = (
        "import sys; sys.modules['deltakern._C'] = None\n"
        "import torch, deltakern\n"
        "from deltakern.backend import select_backend, availability\n"
        "print(select_backend('lora_linear', 'cpu'))\n"
        "print(availability('cpu')['cpu'])\n"
        "x = torch.randn(3, 4); w = torch.randn(5, 4); a = torch.randn(2, 4); b = torch.randn(5, 2)\n"
        "print(deltakern.lora_linear(x, w, None, a, b, 1.0).shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DELTAKERN_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.splitlines()
    assert out[0] == "reference"
    assert out[1].startswith("deltakern._C could not be loaded")
    assert out[2] == "torch.Size([3, 5])"


def test_forcing_cpu_without_extension_names_the_reason():
    code = (
        "import sys; sys.modules['deltakern._C'] = None\n"
        "import torch, deltakern\n"
        "x = torch.randn(3, 4); w = torch.randn(5, 4); a = torch.randn(2, 4); b = torch.randn(5, 2)\n"
        "with deltakern.use_backend('cpu'):\n"
        "    deltakern.lora_linear(x, w, None, a, b, 1.0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "backend 'cpu' is forced but unavailable: deltakern._C could not be loaded" in result.stderr


def test_version():
    assert deltakern.__version__ == "0.1.0"
