#!/usr/bin/env bash
# One call on the lent GPU machine: set up (reusing its torch), run the whole test suite with CUDA tensors
# (Triton compiled for real), then the benchmarks. Logs go to $OUT (the device tool brings them back).
# Usage: bash tools/gpu_session.sh [tests|bench|sanitize|all]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mmk_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=$PWD/.whl; fi
what=${1:-all}
bash tools/setup_env.sh > "$OUT/setup.log" 2>&1 || { tail -30 "$OUT/setup.log"; exit 1; }
tail -3 "$OUT/setup.log"; cp build_ext.log "$OUT/" 2>/dev/null
PY=.venv/bin/python
$PY -c "import mmkernels._ext as e; print('extension:', e.load() is not None, 'cuda:', e.has_cuda(), e.why_missing() or '')"
if [[ $what == tests || $what == all ]]; then
  timeout ${TEST_TIMEOUT:-420} $PY -m pytest tests -q --maxfail=40 -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -40
fi
if [[ $what == bench || $what == all ]]; then
  timeout ${BENCH_TIMEOUT:-420} $PY -m mmkernels bench --device cuda ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -60
  mkdir -p "$OUT/results"; cp benchmarks/results/*cuda* "$OUT/results/" 2>/dev/null
fi
if [[ $what == sanitize ]]; then
  for tool in memcheck racecheck; do
    timeout 240 compute-sanitizer --tool $tool --print-limit 20 $PY -m pytest ${SANITIZE_TESTS:-tests} -q -x -m gpu -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/sanitize_$tool.log"
  done
fi
