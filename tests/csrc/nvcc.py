"""nvcc for the host emulations of the CUDA kernels (tests/csrc/*_cuda_host.cu): where it is,
the flags the real build compiles with, and one build of a harness into a shared library."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def find_nvcc() -> str | None:
    """$CUDA_HOME/bin/nvcc, else /usr/local/cuda/bin/nvcc, else nvcc on PATH."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return shutil.which("nvcc")


NVCC = find_nvcc()

# torch.utils.cpp_extension.COMMON_NVCC_FLAGS (what the real build passes), and one device arch:
# the device code is compiled but never run here.
NVCC_FLAGS = [
    "-O2", "-std=c++20", "-shared", "-Xcompiler", "-fPIC", "-Xcompiler", "-pthread",
    "-gencode", "arch=compute_80,code=sm_80",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]  # fmt: skip

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # deltakern::DType


def build_harness(source: Path, so: Path) -> Path:
    """nvcc ``source`` into the shared library ``so`` with csrc/include and csrc/cuda on the include
    path; fails the calling test with nvcc's output if it does not compile."""
    cmd = [NVCC, *NVCC_FLAGS, f"-I{REPO / 'csrc' / 'include'}", f"-I{REPO / 'csrc' / 'cuda'}", str(source), "-o", str(so)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"nvcc failed ({' '.join(cmd)}):\n{result.stdout}\n{result.stderr}")
    return so
