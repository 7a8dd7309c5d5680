// Interface between the CUDA kernel of group_grad_combine_ (group_grad_combine.cu) and its glue.
#pragma once
#include <c10/core/ScalarType.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <vector>

namespace mmk {
namespace cuda {

struct CombineRef {
  void* grads;
  const void* others;
  int64_t numel;  // > 0
  c10::ScalarType dtype;
  int32_t index;  // position in the caller's list: the entry of scale
  int32_t group;  // the entry of a and b
};

// grads_t <- p_t * grads_t + q_t * others_t with p_t = scale[t] * a[g], q_t = scale[t] * b[g] (float64 device
// arrays; scale nullptr: 1); one launch per dtype for the whole list.
cudaError_t launch_group_grad_combine(const std::vector<CombineRef>& refs, const double* a, const double* b,
                                      const double* scale, cudaStream_t stream);

}  // namespace cuda
}  // namespace mmk
