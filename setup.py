"""Builds deltakern._C: the C++ CPU kernels always, the CUDA kernels as well when torch is a
CUDA build, nvcc is found and DELTAKERN_BUILD_CUDA is not "0".

Install torch first and build against it without isolation, as FlashAttention does:
    pip install torch ninja setuptools && pip install --no-build-isolation -e ".[dev]"

Environment:
    DELTAKERN_BUILD_CUDA=0        skip the CUDA kernels
    DELTAKERN_CUDA_ARCHS="80;90"  SM architectures to compile (cubins), plus PTX of the last
    MAX_JOBS=2                    parallel compile jobs (ninja)
"""

import glob
import os

import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME, else the real location of nvcc. torch guesses the
    parent of the nvcc on PATH, which is wrong when that nvcc is a wrapper script (here
    /usr/local/bin/nvcc wraps /usr/local/cuda/bin/nvcc, and /usr/local has no CUDA headers)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


if _find_cuda_home():
    os.environ["CUDA_HOME"] = _find_cuda_home()

import torch  # noqa: E402  (after CUDA_HOME is settled: cpp_extension reads it at import)
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda() -> tuple[bool, str]:
    if os.environ.get("DELTAKERN_BUILD_CUDA", "1") == "0":
        return False, "DELTAKERN_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"CUDA {torch.version.cuda}, nvcc in {CUDA_HOME}"


def _extension():
    with_cuda, why = _want_cuda()
    print(f"deltakern: CUDA kernels {'on' if with_cuda else 'off'} ({why})")
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    # at::parallel_for is a header template that expands to `#pragma omp parallel` in our own
    # objects: without -fopenmp it runs on one thread (the dropout passes took as long on 2
    # threads as on 1). The soname is torch's own libgomp.so.1, so one OpenMP runtime is loaded.
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if not with_cuda:
        return CppExtension("deltakern._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

    archs = [a.strip() for a in os.environ.get("DELTAKERN_CUDA_ARCHS", "80;90").split(";") if a.strip()]
    # BuildExtension turns this list into -gencode flags; without it, a machine with no GPU
    # would compile for every arch of the torch build.
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a[:-1]}.{a[-1]}" for a in archs) + "+PTX"
    cxx_flags += ["-DDELTAKERN_WITH_CUDA", f'-DDELTAKERN_CUDA_ARCHS="{",".join("sm_" + a for a in archs)}"']
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    return CUDAExtension(
        "deltakern._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
        extra_link_args=link_flags,
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})
