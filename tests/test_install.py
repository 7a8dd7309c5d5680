"""A user's install: build the wheel with pip's default build isolation, install it into a fresh virtual
environment outside the repository, and check what that copy gets (backend, extension, optional parts).

The fresh environment reuses this interpreter's packages (torch, numpy, ninja) through a .pth file, so no
torch is downloaded; ``--no-index`` proves that installing the wheel needs nothing that is not there. The
compiled extension comes from the first-use build cache (``python -m mmkernels._build``, which
tools/setup_env.sh runs), so the test compiles nothing when that cache is warm.

The pip tests are marked slow (about a minute, most of it pip's isolated builds): ``-m "not slow"``
deselects them locally; CI runs them (``make test``).

Also here: what works without triton (a CPU-only torch does not bring it), checked in a subprocess whose
import system refuses ``triton``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env=None, timeout=600):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMKERNELS_", "PYTHONPATH"))}
    env.update(extra)
    return env


def _fresh_venv(path: Path) -> Path:
    """A venv without packages of its own that sees this interpreter's site-packages (never the repo)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    py = path / "bin" / "python"
    site_dir = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    parents = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    Path(site_dir, "_parent_env.pth").write_text("\n".join(parents) + "\n")
    return py


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheels")
    _run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-w", str(out), "-q"], cwd=out,
         env=_clean_env())
    (whl,) = out.glob("mmkernels-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    py = _fresh_venv(root / "venv")
    _run([py, "-m", "pip", "install", "--no-index", "-q", str(wheel)], cwd=root, env=_clean_env())
    return py, root


@pytest.mark.slow
def test_wheel_is_pure_and_carries_the_sources(wheel):
    # built under isolation (no torch there): no compiled module, but everything a first-use build needs
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not any(n.endswith((".so", ".pyd")) for n in names)
    for need in ("mmkernels/py.typed", "mmkernels/_csrc/module.cpp", "mmkernels/_build.py"):
        assert need in names, need
    assert any(n.startswith("mmkernels/_csrc/cuda/") and n.endswith(".cu") for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    hard = [r for r in requires if "extra ==" not in r]
    assert sorted(r.split()[1].split(">")[0].split("=")[0] for r in hard) == ["ninja", "numpy", "torch"], hard
    for extra in ("demo", "bench", "lightning", "hf", "test"):
        assert f"Provides-Extra: {extra}" in meta


CHECK = textwrap.dedent("""
    import json, sys, warnings, torch
    import mmkernels
    from mmkernels import _ext, _build
    ext = _ext.load()
    g = torch.randn(1000, dtype=torch.float32)
    want = (g.double() * 0.5).float()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flags = mmkernels.scale_grads_([g], torch.tensor(0.5))
    print(json.dumps({
        "file": mmkernels.__file__, "version": mmkernels.__version__, "backend": mmkernels.get_backend(),
        "ext": None if ext is None else ext.__file__, "why": _ext.why_missing(),
        "cache": str(_build.cache_root()), "exact": bool(torch.equal(g, want)), "flags": flags.tolist(),
        "warnings": [str(w.message) for w in caught],
    }))
""")


def _check(py, cwd, **env):
    import json

    return json.loads(_run([py, "-c", CHECK], cwd=cwd, env=_clean_env(**env)).strip().splitlines()[-1])


@pytest.mark.slow
def test_installed_copy_compiles_or_loads_the_extension(installed):
    py, root = installed
    r = _check(py, root)
    assert Path(r["file"]).resolve().is_relative_to(root), r["file"]  # the installed copy, not the checkout
    assert r["backend"] == "auto"
    assert r["ext"] is not None, r["why"]  # a compiler and ninja are present here
    assert Path(r["ext"]).resolve().is_relative_to(Path(r["cache"]).resolve()), r  # the first-use build
    assert r["exact"] and r["flags"] == [False] and r["warnings"] == []
    # the cache holds one build per torch version: a second process loads it without compiling
    res = subprocess.run([py, "-c", "from mmkernels import _ext; assert _ext.load() is not None"], cwd=root,
                         env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "compiling" not in res.stderr, res.stderr


@pytest.mark.slow
def test_without_a_compiler_the_pytorch_path_runs(installed, tmp_path):
    py, root = installed
    r = _check(py, root, CXX=str(tmp_path / "no-such-c++"), MMKERNELS_CACHE=str(tmp_path / "empty-cache"))
    assert r["ext"] is None
    assert "no C++ compiler" in r["why"] and "PyTorch path" in r["why"], r["why"]
    assert r["exact"] and r["flags"] == [False]  # same result from the reference path
    assert len(r["warnings"]) == 1 and "no C++ compiler" in r["warnings"][0]


@pytest.mark.slow
def test_a_cached_build_loads_without_compiler_or_compiling(installed, tmp_path):
    py, root = installed
    r = _check(py, root, CXX=str(tmp_path / "no-such-c++"), MMKERNELS_JIT="0")
    assert r["ext"] is not None and r["why"] is None, r["why"]  # the cache filled by the test above
    assert r["exact"] and r["warnings"] == []


@pytest.mark.slow
def test_jit_off_and_no_ext_say_so(installed, tmp_path):
    py, root = installed
    r = _check(py, root, MMKERNELS_JIT="0", MMKERNELS_CACHE=str(tmp_path / "c"))
    assert r["ext"] is None and "python -m mmkernels._build" in r["why"]
    r = _check(py, root, MMKERNELS_NO_EXT="1")
    assert r["ext"] is None and "MMKERNELS_NO_EXT=1" in r["why"] and r["exact"]


@pytest.mark.slow
def test_editable_install_uses_the_checkout(tmp_path):
    py = _fresh_venv(tmp_path / "venv")
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)], cwd=tmp_path, env=_clean_env())
    out = _run([py, "-c", "import mmkernels, mmkernels.balance; print(mmkernels.__file__)"], cwd=tmp_path,
               env=_clean_env())
    assert Path(out.strip()).resolve() == (REPO / "mmkernels" / "__init__.py").resolve()


NO_TRITON = textwrap.dedent("""
    import importlib.abc, json, sys
    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, NoTriton())
    import torch
    import mmkernels
    from mmkernels.balance import OGMGE, PDMP, split_linear_head
    out = {"triton_loaded": "triton" in sys.modules}
    x = torch.randn(4, 3, 16, 16)
    logits, y = torch.randn(2, 4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    enc = {"a": torch.nn.Linear(3, 3), "b": torch.nn.Linear(3, 3)}
    g = torch.randn(7, dtype=torch.float64)
    cases = {
        "modality_scores": lambda: mmkernels.modality_scores(logits, y)[0],
        "scale_grads_": lambda: (mmkernels.scale_grads_([g], torch.tensor(0.5)), g)[1],
        "grad_scale": lambda: mmkernels.grad_scale(torch.ones(3), torch.tensor(0.5)),
        "OGMGE": lambda: OGMGE(enc).step(logits={"a": logits[0], "b": logits[1]}, labels=y),
        "PDMP": lambda: PDMP(enc, performance={"a": 0.9, "b": 0.5}).step(),
        "frm": lambda: mmkernels.frm(x),
        "band_ratio": lambda: mmkernels.band_ratio(torch.randn(4, 32), 0.25),
        "decision_fuse": lambda: mmkernels.decision_fuse(logits, torch.ones(2, 5, dtype=torch.float64),
                                                         torch.ones(2, dtype=torch.float64)),
    }
    for name, f in cases.items():
        try:
            out[name] = f().double().tolist()
        except ImportError as exc:
            out[name] = f"ImportError: {exc}"
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def without_triton():
    import json

    env = _clean_env(PYTHONPATH=str(REPO), MMKERNELS_NO_EXT="1")
    return json.loads(_run([sys.executable, "-c", NO_TRITON], cwd=REPO, env=env).strip().splitlines()[-1])


def test_import_and_reference_paths_work_without_triton(without_triton):
    r = without_triton
    assert r["triton_loaded"] is False  # import mmkernels and the balancers never import triton
    assert len(r["scale_grads_"]) == 7 and r["grad_scale"] == [1.0, 1.0, 1.0]
    assert r["PDMP"] == pytest.approx([1.2, 0.8])


@pytest.mark.parametrize("op", ["frm", "band_ratio", "decision_fuse", "modality_scores", "OGMGE"])
def test_ops_with_kernels_work_without_triton(without_triton, op):
    # the op modules take triton from mmkernels._triton, whose stand-in leaves the kernels defined
    assert not str(without_triton[op]).startswith("ImportError"), without_triton[op]
