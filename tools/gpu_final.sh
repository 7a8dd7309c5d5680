#!/usr/bin/env bash
# Second GPU pass: benchmarks not yet recorded, band_energy with 3xTF32 dots, compute-sanitizer.
# Results come back as one tarball (the device tool returns at most 8 files).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
timeout ${BENCH_TIMEOUT:-300} $PY -m mmkernels bench --device cuda --ops ${OPS:-frm,modality_scores,overhead,scale_grads,vit_step} 2>&1 | tee "$OUT/bench.log" | grep -vE "^\s*$" | cut -c1-170 | tail -45
tar czf "$OUT/results.tgz" benchmarks/results/*cuda*
echo "== band_energy with MMKERNELS_BAND_ENERGY_DOT=tf32x3"
MMKERNELS_BAND_ENERGY_DOT=tf32x3 timeout 100 $PY -m mmkernels bench --device cuda --ops band_energy --out /tmp/tf32x3 2>&1 | grep -E "mmkernels|eager " | cut -c1-150 | tee "$OUT/tf32x3.log"
MMKERNELS_BAND_ENERGY_DOT=tf32x3 timeout 80 $PY -m pytest tests/test_band_energy.py -q -n 8 -p no:cacheprovider 2>&1 | tail -4 | tee -a "$OUT/tf32x3.log"
echo "== compute-sanitizer"
for tool in memcheck racecheck; do
  timeout 70 compute-sanitizer --tool $tool --print-limit 10 $PY -m pytest tests/test_scale_grads.py -q -m gpu -k "not bitwise_many" -p no:cacheprovider 2>&1 | tail -4 | tee "$OUT/sanitize_scale_grads_$tool.log"
done
timeout 60 compute-sanitizer --tool memcheck --print-limit 10 $PY -m pytest tests/test_frm.py tests/test_decision_fuse.py -q -m gpu -p no:cacheprovider 2>&1 | tail -4 | tee "$OUT/sanitize_triton_memcheck.log"
