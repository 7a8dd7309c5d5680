"""Build script of the optional extension mmkernels._C (package metadata lives in pyproject.toml).

- Under pip's default build isolation torch is not importable here, so the wheel is pure Python and the
  extension is compiled on first use against the user's own torch (mmkernels/_build.py explains why).
- With torch importable (``pip install --no-build-isolation .``, ``python setup.py build_ext --inplace``)
  the extension is built now: C++ CPU sources csrc/*.cpp always, CUDA sources csrc/cuda/*.cu and their glue
  csrc/cuda/*.cpp only when torch is a CUDA build and nvcc is found (with -DMMKERNELS_WITH_CUDA). The
  extension is optional: a failed compile leaves a working pure-Python install.
- MMKERNELS_NO_EXT=1 skips the extension.

Either way the sources ship inside the package as mmkernels/_csrc, so a first-use build needs no checkout.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}


def _torch():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return None, None
    return torch, cpp_extension


torch, cpp_extension = (None, None) if os.environ.get("MMKERNELS_NO_EXT", "0") == "1" else _torch()
if torch is not None and glob.glob("csrc/*.cpp"):
    # same flags as the first-use build (mmkernels/_build.py); -g0: release build, no debug info
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-g0"]
    cpu_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    nvcc = cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    with_cuda = torch.version.cuda is not None and bool(nvcc or shutil.which("nvcc")) and bool(cuda_sources)
    common = dict(include_dirs=[os.path.abspath("csrc")], libraries=["gomp"], extra_link_args=["-Wl,-s"])
    if with_cuda:
        archs = os.environ.get("MMKERNELS_CUDA_ARCHS", "80;90")
        extra = {"cxx": cxx + ["-DMMKERNELS_WITH_CUDA"],
                 "nvcc": ["-O3", "-std=c++17", "-DMMKERNELS_WITH_CUDA"]
                 + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs.split(";")]}
        ext = cpp_extension.CUDAExtension("mmkernels._C", cpu_sources + cuda_sources, extra_compile_args=extra,
                                          define_macros=[("MMKERNELS_WITH_CUDA", "1")], **common)
    else:
        ext = cpp_extension.CppExtension("mmkernels._C", cpu_sources, extra_compile_args=cxx, **common)
    ext.optional = True  # no compiler, or a failed compile: warn and install the pure-Python package
    ext_modules.append(ext)
    cmdclass["build_ext"] = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

setup(
    # the C++/CUDA sources travel inside the package for the first-use build
    packages=find_packages(include=["mmkernels", "mmkernels.*"]) + ["mmkernels._csrc", "mmkernels._csrc.cuda"],
    package_dir={"mmkernels._csrc": "csrc", "mmkernels._csrc.cuda": "csrc/cuda"},
    package_data={"mmkernels": ["py.typed", "tuned/*.json"], "mmkernels._csrc": ["*.cpp", "*.h"],
                  "mmkernels._csrc.cuda": ["*.cu", "*.cuh", "*.cpp"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
