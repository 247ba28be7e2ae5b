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

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


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
    cxx_flags = ["-O3"]
    if not with_cuda:
        return CppExtension("deltakern._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags})

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
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})
