// Interface between the CUDA kernels of group_grad_stats and group_grad_tensor_stats (group_grad_stats.cu) and
// their glue.
#pragma once
#include <c10/core/ScalarType.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <vector>

namespace mmk {
namespace cuda {

constexpr int kMaxGroups = 256;  // groups per call (modality encoders; the bounds travel as kernel arguments)

struct PairRef {
  const void* a;
  const void* b;
  int64_t numel;  // > 0
  c10::ScalarType dtype;
  int32_t group;
  int32_t index;  // position in the caller's list (the row of the per-tensor result)
};

// out (num_groups x 3 doubles, device): per group <a, b>, |a|^2, |b|^2; partials: 3 doubles per chunk of the
// whole list (num_chunks(numel) summed). Deterministic: chunk partials are combined in a fixed order.
cudaError_t launch_group_grad_stats(const std::vector<PairRef>& pairs, int num_groups, double* partials, double* out,
                                    cudaStream_t stream);

// The same, plus per_tensor (rows = the pairs' index, 3 doubles each; rows of tensors not in `pairs` are left
// as they are): each tensor's chunk partials summed in order.
cudaError_t launch_group_grad_tensor_stats(const std::vector<PairRef>& pairs, int num_groups, double* partials,
                                           double* out, double* per_tensor, cudaStream_t stream);

}  // namespace cuda
}  // namespace mmk
