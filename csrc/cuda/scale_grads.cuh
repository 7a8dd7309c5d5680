// Interface between the standalone CUDA kernels (scale_grads.cu, CUDA toolkit headers only) and the
// torch-facing glue (scale_grads_glue.cpp). No torch and no CUDA types here.
#pragma once
#include <stdint.h>

namespace mmk {
namespace cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

struct TensorDesc {
  void* ptr;      // contiguous data
  int64_t numel;  // > 0 (the glue drops empty tensors)
  int32_t dtype;  // DType
  int32_t index;  // position in the user's list: the Philox counter and the stats/flag slot
};

// Elements per block ("chunk"): one block of either launch handles one chunk of one tensor.
constexpr int64_t kChunk = 65536;

#if defined(__CUDACC__)
__host__ __device__
#endif
inline int64_t num_chunks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Runs both passes on `stream` (a cudaStream_t). Workspace, all device memory:
//   partials : 3 doubles per chunk of the whole list (sum of shifted values, of their squares, finiteness)
//   counters : one uint32 per list entry, zero on entry (blocks done per tensor; the last one finalises)
//   stdv     : one float per list entry (std + 1e-8, written by pass 1)
//   flags    : one bool per list entry, zero on entry (true: NaN/Inf found, tensor left unchanged)
// coeff: device pointer to one double. seed: device pointer to one int64, or null for "no noise".
// Returns a cudaError_t value (0 = success).
int launch_scale_grads(const TensorDesc* tensors, int n, const double* coeff, const int64_t* seed,
                       double* partials, unsigned int* counters, float* stdv, bool* flags, void* stream);

// out[i] = standard normal of element i of list entry `tensor` for `seed` (same stream as the CPU kernel).
int launch_philox_normal(uint64_t seed, uint32_t tensor, int64_t numel, float* out, void* stream);

}  // namespace cuda
}  // namespace mmk
