#!/usr/bin/env bash
# Work that only a lent GPU machine can do, in stages that each fit one device call (<= 10 min).
# Run from the repository root on the device, carrying .whl (see benchmarks/results/GPU_VALIDATION.md):
#   bash tools/gpu.sh verify     the >2^31-element tests, the demo on CUDA, the whole suite (Triton compiled)
#   bash tools/gpu.sh tune       python -m mmkernels tune: every launch config timed, the tuned table written
#   bash tools/gpu.sh bench      benchmarks with the tuned table, 3 interleaved repeats, L2 cold and warm
#   bash tools/gpu.sh steps      step overhead of every balancer (small CNNs and two ViT-B/16), re-timed
#   bash tools/gpu.sh sanitize   compute-sanitizer memcheck/racecheck over every kernel's GPU tests
#   bash tools/gpu.sh ncu        Nsight Compute: throughput, occupancy, registers of the Triton kernels
# Each stage leaves $OUT/results.tgz (changed results, tuned tables) and $OUT/<stage>.log.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/mmk_out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
if [ -d .whl ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=$PWD/.whl; fi
bash tools/setup_env.sh > "$OUT/setup.log" 2>&1 || { tail -30 "$OUT/setup.log"; exit 1; }
PY=.venv/bin/python
stage=${1:?stage: verify|tune|bench|steps|sanitize|ncu}
log="$OUT/$stage.log"
brief() { grep -vE "^\.+ *\[|PytestBenchmarkWarning|warner\(|^\s*$" | cut -c1-200; }
case $stage in
  verify)
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$log"
    timeout 90 $PY -m pytest tests/test_large_gpu.py -q -p no:cacheprovider -rf 2>&1 | tee -a "$log" | tail -5
    timeout 60 $PY -m mmkernels demo --quick --device cuda --out /tmp/demo_cuda --no-progress 2>&1 | tail -4 | tee -a "$log"
    timeout ${SUITE_TIMEOUT:-360} $PY -m pytest tests benchmarks -q -n 8 -p no:cacheprovider -rf --benchmark-disable \
      --ignore=tests/test_large_gpu.py --ignore=tests/test_ddp.py 2>&1 | tee -a "$log" | brief | tail -30 ;;
  tune)
    timeout ${TUNE_TIMEOUT:-540} $PY -m mmkernels tune --device cuda ${TUNE_ARGS:-} 2>&1 | tee "$log" | cut -c1-220 | tail -40 ;;
  bench)
    timeout ${BENCH_TIMEOUT:-540} $PY -m mmkernels bench --device cuda --repeats 3 --l2 cold,warm \
      --ops ${OPS:-frm,band_energy,modality_scores,decision_fuse,scale_grads} 2>&1 | tee "$log" | brief | tail -80 ;;
  steps)
    timeout ${BENCH_TIMEOUT:-540} $PY -m mmkernels bench --device cuda --repeats 3 --ops overhead,vit_step 2>&1 \
      | tee "$log" | brief | tail -40 ;;
  sanitize)
    for tool in memcheck racecheck; do
      for t in test_modality_scores test_band_energy test_frm test_decision_fuse test_scale_grads; do
        echo "== $tool $t" | tee -a "$log"
        timeout 100 compute-sanitizer --tool $tool --print-limit 10 $PY -m pytest tests/$t.py -q -m gpu \
          -p no:cacheprovider 2>&1 | tail -4 | tee -a "$log"
      done
    done ;;
  ncu)
    timeout 300 ncu --clock-control none --target-processes all -k "regex:_band|_scores_rows|_frm_kernel|_fuse" \
      --launch-skip 0 --launch-count 12 --section SpeedOfLight --section Occupancy --section LaunchStats \
      $PY tools/ncu_cases.py 2>&1 | tee "$log" | grep -E "^  [_a-z]|Memory Throughput|DRAM Throughput|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Compute \(SM\)" | head -150 ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
tar czf "$OUT/results.tgz" benchmarks/results mmkernels/tuned 2>/dev/null
echo "results in $OUT/results.tgz"
