"""Compile ``mmkernels._C`` on first use when the installed package does not carry a built one.

Why not always at install time: ``pip install`` builds in an isolated environment that does not see the
user's torch, and a build requirement on torch there installs whichever torch the resolver picks (often
another release, several GB), so an extension built against it would not load next to the user's torch.
The package therefore installs as pure Python by default, and the C++ (and, with a CUDA build of torch and
nvcc, CUDA) kernels are compiled here, against the torch that is actually imported, the first time they are
needed. The result is cached per torch version, CUDA version, Python version and source hash under
``$MMKERNELS_CACHE`` (default ``~/.cache/mmkernels``), so later processes only load it.

``pip install --no-build-isolation .`` (torch visible to the build) still builds ``mmkernels._C`` at install
time; that build is found first and nothing is compiled here.

Environment:
    MMKERNELS_NO_EXT=1   never use the extension (pure PyTorch paths).
    MMKERNELS_JIT=0      use a built (or cached) extension if there is one, never compile.
    MMKERNELS_CACHE=dir  where compiled extensions are kept.
    CXX                  the C++ compiler (default ``c++``), as for any torch extension.

``python -m mmkernels._build`` compiles now (e.g. in a container image) and prints where the result is.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

_PKG = Path(__file__).resolve().parent
# release flags: no debug info (the default -g of Python's build flags made a 15 MB module of 210 KB code)
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-g0"]
NVCC_FLAGS = ["-O3", "-std=c++17", "-DMMKERNELS_WITH_CUDA"]
LD_FLAGS = ["-lgomp"]


def source_dir() -> Path | None:
    """The C++/CUDA sources: shipped inside the wheel as ``mmkernels/_csrc``, or the checkout's ``csrc``."""
    for d in (_PKG / "_csrc", _PKG.parent / "csrc"):
        if d.is_dir() and any(d.glob("*.cpp")):
            return d
    return None


def sources(src: Path) -> tuple[list[Path], list[Path]]:
    """(CPU sources ``*.cpp``, CUDA sources ``cuda/*.cu`` + ``cuda/*.cpp``), the layout setup.py builds."""
    cpu = sorted(src.glob("*.cpp"))
    cuda = sorted(list((src / "cuda").glob("*.cu")) + list((src / "cuda").glob("*.cpp")))
    return cpu, cuda


def _cuda_toolkit() -> bool:
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return False
    home = cpp_extension.CUDA_HOME
    return bool((home and os.path.exists(os.path.join(home, "bin", "nvcc"))) or shutil.which("nvcc"))


def cache_root() -> Path:
    base = os.environ.get("MMKERNELS_CACHE")
    if base:
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mmkernels"


def build_dir(src: Path, with_cuda: bool) -> Path:
    """One folder per torch/CUDA/Python version and source content: an upgrade never loads a stale build."""
    import torch

    h = hashlib.sha256()
    cpu, cuda = sources(src)
    for f in sorted(cpu + (cuda if with_cuda else []) + list(src.glob("*.h")) + list(src.glob("cuda/*.cuh"))):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(" ".join(CXX_FLAGS + NVCC_FLAGS).encode())
    tag = (f"torch{torch.__version__.replace('+', '_')}-"
           f"{'cu' + torch.version.cuda if with_cuda else 'cpu'}-py{sys.version_info[0]}{sys.version_info[1]}")
    return cache_root() / tag / h.hexdigest()[:12]


def missing_tools() -> str | None:
    """What is missing to compile here (None: a compiler and ninja are present)."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found; install g++ or clang, or set CXX)"
    try:
        from torch.utils import cpp_extension

        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed (`pip install ninja`)"
    return None


def build(verbose: bool = False, compile: bool = True):
    """Compile (or load the cached build of) the extension for the imported torch; returns the module.

    ``compile=False`` only loads a cached build. Raises RuntimeError saying what is missing when there is
    no cached build and it cannot be compiled here.
    """
    src = source_dir()
    if src is None:
        raise RuntimeError("the C++ sources are not part of this installation (mmkernels/_csrc is missing)")
    cpu, cuda = sources(src)
    with_cuda = _cuda_toolkit() and bool(cuda)
    out = build_dir(src, with_cuda)
    cached = sorted(out.glob("_C*.so")) + sorted(out.glob("_C*.pyd"))
    if cached and not (out / "lock").exists():
        # the folder is keyed by torch, CUDA, Python and source hash: a finished build there is current,
        # and loading it needs neither a compiler nor ninja (e.g. a runtime image built from a dev image)
        import importlib.util

        spec = importlib.util.spec_from_file_location("_C", cached[0])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    if not compile:
        raise RuntimeError(f"no compiled build in {out}")
    why = missing_tools()
    if why is not None:
        raise RuntimeError(f"cannot compile mmkernels._C: {why}")
    from torch.utils import cpp_extension

    out.mkdir(parents=True, exist_ok=True)
    if not cached:
        print(f"mmkernels: compiling the C++{'/CUDA' if with_cuda else ''} extension once for this torch "
              f"(about a minute; cached in {out})", file=sys.stderr, flush=True)
    cflags = CXX_FLAGS + (["-DMMKERNELS_WITH_CUDA"] if with_cuda else [])
    archs = os.environ.get("MMKERNELS_CUDA_ARCHS", "80;90")
    mod = cpp_extension.load(
        name="_C",
        sources=[str(p) for p in cpu + (cuda if with_cuda else [])],
        extra_cflags=cflags,
        extra_cuda_cflags=NVCC_FLAGS + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs.split(";")],
        extra_ldflags=LD_FLAGS,
        extra_include_paths=[str(src)],
        build_directory=str(out),
        with_cuda=with_cuda,
        verbose=verbose,
    )
    return mod


def load_fallback(import_error: Exception):
    """Called by :func:`mmkernels._ext.load` when ``import mmkernels._C`` failed (no install-time build).

    Returns ``(module, None)`` after compiling or loading the cached first-use build, or ``(None, reason)``
    with a message for the user that says what is missing and how to get it.
    """
    fallback = "The PyTorch path is used instead."
    if os.environ.get("MMKERNELS_NO_EXT", "0") == "1":
        return None, f"mmkernels._C is disabled (MMKERNELS_NO_EXT=1). {fallback}"
    if os.environ.get("MMKERNELS_JIT", "1") == "0":
        try:
            mod = build(compile=False)
        except Exception:
            return None, (f"mmkernels._C is not built ({import_error}) and MMKERNELS_JIT=0 forbids compiling it "
                          f"on first use; run `python -m mmkernels._build` to compile it. {fallback}")
        sys.modules["mmkernels._C"] = mod
        return mod, None
    try:
        mod = build()
    except Exception as exc:  # a missing tool or a failed compile must not break the pure-PyTorch package
        detail = str(exc).strip().splitlines()
        detail = " ".join(detail[-3:]) if detail else type(exc).__name__
        return None, (f"mmkernels._C could not be compiled on first use: {detail}. {fallback} "
                      "Set MMKERNELS_NO_EXT=1 to skip the extension without this warning.")
    sys.modules["mmkernels._C"] = mod
    return mod, None


def main() -> int:
    try:
        mod = build(verbose="-v" in sys.argv[1:])
    except Exception as exc:  # report, do not trace back: this is a user-facing command
        print(f"mmkernels: {exc}", file=sys.stderr)
        return 1
    print(f"mmkernels._C ready: {mod.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
