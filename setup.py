"""Builds mmkernels and its optional extension mmkernels._C.

- C++ CPU sources (csrc/*.cpp) are built whenever a C++ compiler is present.
- CUDA sources (csrc/cuda/*.cu and their glue csrc/cuda/*.cpp) are added only when torch is a CUDA build
  and nvcc is found; they are compiled with -DMMKERNELS_WITH_CUDA.
- MMKERNELS_NO_EXT=1 skips the extension; the package then uses its Python/Triton paths only.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}

if os.environ.get("MMKERNELS_NO_EXT", "0") != "1" and glob.glob("csrc/*.cpp"):
    import torch
    from torch.utils import cpp_extension

    cpu_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    nvcc = cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    with_cuda = torch.version.cuda is not None and bool(nvcc or shutil.which("nvcc")) and bool(cuda_sources)
    extra = {"cxx": ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]}
    libraries = ["gomp"]
    define_macros = []
    if with_cuda:
        major, minor = (int(v) for v in torch.version.cuda.split(".")[:2])
        archs = os.environ.get("MMKERNELS_CUDA_ARCHS", "80;90")
        extra["nvcc"] = ["-O3", "-std=c++17", "-DMMKERNELS_WITH_CUDA"] + [
            f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs.split(";")
        ]
        extra["cxx"].append("-DMMKERNELS_WITH_CUDA")
        define_macros.append(("MMKERNELS_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            "mmkernels._C", cpu_sources + cuda_sources, include_dirs=[os.path.abspath("csrc")],
            extra_compile_args=extra, libraries=libraries, define_macros=define_macros,
        )
    else:
        ext = cpp_extension.CppExtension(
            "mmkernels._C", cpu_sources, include_dirs=[os.path.abspath("csrc")],
            extra_compile_args=extra["cxx"], libraries=libraries,
        )
    ext_modules.append(ext)
    cmdclass["build_ext"] = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

setup(
    name="mmkernels",
    version="0.1.0",
    description="Fused GPU kernels for balanced multimodal learning (MWAM, PDMP, OGM-GE, decision-level weighting)",
    packages=find_packages(include=["mmkernels", "mmkernels.*"]),
    package_data={"mmkernels": ["tuned/*.json"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "triton", "numpy"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
