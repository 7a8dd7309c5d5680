#!/usr/bin/env bash
# Compile each csrc/cuda/*.cu standalone (no torch headers) for sm_80 and sm_90, when nvcc exists.
# The kernels are written so they need only the CUDA toolkit; the torch-facing glue is in .cpp files.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then echo "[cuda-check] nvcc not found: skipped"; exit 0; fi
shopt -s nullglob
srcs=(csrc/cuda/*.cu)
if [ ${#srcs[@]} -eq 0 ]; then echo "[cuda-check] no CUDA sources"; exit 0; fi
out=build/cuda_check; mkdir -p "$out"
for f in "${srcs[@]}"; do
  for arch in 80 90; do
    "$NVCC" -std=c++17 -O3 -Icsrc -gencode "arch=compute_${arch},code=sm_${arch}" -c "$f" \
      -o "$out/$(basename "$f" .cu).sm${arch}.o"
  done
  echo "[cuda-check] $f: sm_80, sm_90 ok"
done
