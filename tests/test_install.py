"""A user's install: build the wheel with pip's default build isolation, install it into a fresh virtual
environment outside the repository, and check what that copy gets (backend, extension, optional parts).

The fresh environment reuses this interpreter's packages (torch, numpy, ninja) through a .pth file, so no
torch is downloaded; ``--no-index`` proves that installing the wheel needs nothing that is not there. The
compiled extension comes from the first-use build cache (``python -m mmkernels._build``, which
tools/setup_env.sh runs), so the test compiles nothing when that cache is warm.

Marked slow (about a minute, most of it pip's isolated build): ``-m "not slow"`` deselects it locally.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

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


def test_without_a_compiler_the_pytorch_path_runs(installed, tmp_path):
    py, root = installed
    r = _check(py, root, CXX=str(tmp_path / "no-such-c++"), MMKERNELS_CACHE=str(tmp_path / "empty-cache"))
    assert r["ext"] is None
    assert "no C++ compiler" in r["why"] and "PyTorch path" in r["why"], r["why"]
    assert r["exact"] and r["flags"] == [False]  # same result from the reference path
    assert len(r["warnings"]) == 1 and "no C++ compiler" in r["warnings"][0]


def test_jit_off_and_no_ext_say_so(installed, tmp_path):
    py, root = installed
    r = _check(py, root, MMKERNELS_JIT="0", MMKERNELS_CACHE=str(tmp_path / "c"))
    assert r["ext"] is None and "python -m mmkernels._build" in r["why"]
    r = _check(py, root, MMKERNELS_NO_EXT="1")
    assert r["ext"] is None and "MMKERNELS_NO_EXT=1" in r["why"] and r["exact"]


def test_editable_install_uses_the_checkout(tmp_path):
    py = _fresh_venv(tmp_path / "venv")
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)], cwd=tmp_path, env=_clean_env())
    out = _run([py, "-c", "import mmkernels, mmkernels.balance; print(mmkernels.__file__)"], cwd=tmp_path,
               env=_clean_env())
    assert Path(out.strip()).resolve() == (REPO / "mmkernels" / "__init__.py").resolve()
