# Sourced by the tools/gpu_*.sh scripts on the lent GPU machine: output folder, offline wheels, set-up
# (reusing the machine's torch), and PY pointing at the environment's python.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/mmk_out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
if [ -d .whl ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=$PWD/.whl; fi
bash tools/setup_env.sh > "$OUT/setup.log" 2>&1 || { tail -30 "$OUT/setup.log"; exit 1; }
PY=.venv/bin/python
