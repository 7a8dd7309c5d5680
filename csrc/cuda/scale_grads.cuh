// Interface between the CUDA kernels of scale_grads_ (scale_grads.cu) and their torch-facing glue
// (scale_grads_glue.cpp): raw device pointers, the header-only c10 dtype enum, a CUDA stream.
#pragma once
#include <c10/core/ScalarType.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <vector>

namespace mmk {
namespace cuda {

struct GradRef {
  void* ptr;             // contiguous device data
  int64_t numel;         // > 0 (the glue drops empty tensors)
  c10::ScalarType dtype;
  int32_t index;         // position in the user's list: the noise counter and the flag/statistic slot
  int32_t chunk_base;    // first per-chunk slot of this tensor in ScaleGradsWorkspace::partials
};

struct ScaleGradsWorkspace {  // device memory
  double* partials;           // 3 per chunk of the whole list (noise only)
  unsigned int* counters;     // one per list entry, zero on entry (noise only)
  float* stdv;                // one per list entry (noise only)
  bool* flags;                // one per list entry, filled with !isfinite(coeff) on entry
};

// Both passes of scale_grads_ on `stream`; seed == nullptr: no noise. Returns the launch status.
cudaError_t launch_scale_grads(const std::vector<GradRef>& grads, const double* coeff, const int64_t* seed,
                               const ScaleGradsWorkspace& work, cudaStream_t stream);

// out[i] = the standard normal of element i of list entry `tensor` for *seed (the CPU kernel's stream).
cudaError_t launch_philox_normal(const int64_t* seed, uint32_t tensor, int64_t numel, int64_t first_group, float* out,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace mmk
