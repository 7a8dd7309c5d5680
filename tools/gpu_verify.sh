#!/usr/bin/env bash
# Final GPU pass: >2^31-element tests (serial: each takes GBs), the demo on CUDA, then the whole suite.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
echo "== large"; timeout 90 $PY -m pytest tests/test_large_gpu.py -q -p no:cacheprovider -rf --durations=5 2>&1 | tee "$OUT/large.log" | tail -12
echo "== demo cuda"; timeout 60 $PY -m mmkernels demo --quick --device cuda --out /tmp/demo_cuda --no-progress 2>&1 | tail -6 | tee "$OUT/demo_cuda.log"
echo "== suite"; timeout ${SUITE_TIMEOUT:-190} $PY -m pytest tests -q -n 8 -p no:cacheprovider -rf --ignore=tests/test_large_gpu.py --ignore=tests/test_ddp.py 2>&1 | tee "$OUT/suite.log" | grep -vE "^\.+ *\[|PytestBenchmarkWarning|warner\(|^\s*$" | tail -25
