#!/usr/bin/env bash
# One call on the lent GPU machine: set up (reusing its torch), run the whole test suite with CUDA tensors
# (Triton compiled for real), then the benchmarks. Logs go to $OUT (the device tool brings them back).
# Usage: bash tools/gpu_session.sh [tests|bench|sanitize|all]
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
what=${1:-all}
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
