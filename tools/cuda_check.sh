#!/usr/bin/env bash
# Compile the CUDA half of the extension without a GPU, when nvcc exists:
#  - each csrc/cuda/*.cu to an object for sm_80 and sm_90 (the kernels use the CUDA toolkit and torch's
#    header-only c10 parts: dtype dispatch, Half, BFloat16);
#  - each csrc/cuda/*.cpp (the torch-facing glue: TORCH_LIBRARY_IMPL(..., CUDA), streams, guards) through
#    a syntax-only host compile with -DMMKERNELS_WITH_CUDA.
# A CPU build of torch ships the c10/cuda headers but not the one CMake generates for CUDA builds; for this
# check only, an empty stand-in is put on the include path when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then echo "[cuda-check] nvcc not found: skipped"; exit 0; fi
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
TORCH_INC=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
CUDA_INC=""
for d in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" /usr/local/cuda; do
  if [ -n "$d" ] && [ -f "$d/include/cuda_runtime.h" ]; then CUDA_INC=$d/include; break; fi
done
shopt -s nullglob
cus=(csrc/cuda/*.cu)
glue=(csrc/cuda/*.cpp)
if [ ${#cus[@]} -eq 0 ] && [ ${#glue[@]} -eq 0 ]; then echo "[cuda-check] no CUDA sources"; exit 0; fi
out=build/cuda_check; mkdir -p "$out/include/c10/cuda/impl"
if [ ! -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  echo "#pragma once" > "$out/include/c10/cuda/impl/cuda_cmake_macros.h"
fi
# the flags torch's BuildExtension passes to nvcc
NVCC_TORCH=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
            -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -DMMKERNELS_WITH_CUDA)
# one nvcc call per file for both architectures (the host side is parsed once). -O0: nvcc's -O sets only the
# host compiler's optimisation (ptxas optimises the device code at its default -O3 either way), and the
# host object is thrown away, so optimising it would only cost time.
check_cu() {
  "$NVCC" -std=c++17 -O0 -Icsrc -I"$TORCH_INC" "${NVCC_TORCH[@]}" -Xcompiler -Wno-c++20-extensions \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -c "$1" \
    -o "$out/$(basename "$1" .cu).o" && echo "[cuda-check] $1: sm_80, sm_90 ok"
}
# torch's and CUDA's headers as system headers, as torch's extension build passes them (-isystem)
GLUE_FLAGS=(-std=c++17 -Wall -Wno-c++20-extensions -DMMKERNELS_WITH_CUDA -Icsrc -I"$out/pch" -I"$out/include"
            -isystem "$TORCH_INC" -isystem "$TORCH_INC/torch/csrc/api/include" -isystem "$CUDA_INC")
check_glue() {
  "${CXX:-c++}" "${GLUE_FLAGS[@]}" -fsyntax-only "$1" && echo "[cuda-check] $1: host compile ok"
}
# <ATen/ATen.h> is ~90% of a glue file's compile time, and they all include it first: it is precompiled once,
# with the glue files' own flags (a precompiled header must match them). gcc reads $out/pch/ATen/ATen.h.gch
# for the header only where it is a file's first include, the header itself anywhere else, so no file passes
# here that would not compile without it. Best effort: without the .gch the files just take longer.
precompile_aten() {
  mkdir -p "$out/pch/ATen"
  "${CXX:-c++}" "${GLUE_FLAGS[@]}" -x c++-header "$TORCH_INC/ATen/ATen.h" -o "$out/pch/ATen/ATen.h.gch" \
    > "$out/pch.log" 2>&1 || { rm -f "$out/pch/ATen/ATen.h.gch"; echo "[cuda-check] no precompiled ATen.h ($out/pch.log)"; }
}
# at most CUDA_CHECK_JOBS (default: one per core) compiles at a time: more only add memory (~0.6 GB each)
jobs=${CUDA_CHECK_JOBS:-$(nproc)}
status=0 running=0
spawn() {
  "$@" &
  running=$((running + 1))
  if ((running >= jobs)); then wait -n || status=1; running=$((running - 1)); fi
}
# the first jobs-1 .cu files compile while the header is precompiled, then the rest and the glue files
for f in "${cus[@]:0:jobs-1}"; do spawn check_cu "$f"; done
if [ ${#glue[@]} -gt 0 ] && [ -n "$CUDA_INC" ]; then precompile_aten; fi
for f in "${cus[@]:jobs-1}"; do spawn check_cu "$f"; done
for f in "${glue[@]}"; do
  if [ -z "$CUDA_INC" ]; then echo "[cuda-check] $f: skipped (cuda_runtime.h not found; set CUDA_HOME)"; continue; fi
  spawn check_glue "$f"
done
while ((running > 0)); do wait -n || status=1; running=$((running - 1)); done
exit $status
