// Interface between the CUDA kernel of update_scale_ (update_scale.cu) and its glue (update_scale_glue.cpp).
#pragma once
#include <c10/core/ScalarType.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <vector>

namespace mmk {
namespace cuda {

struct ParamRef {
  void* param;           // written
  const void* snapshot;  // read
  int64_t numel;         // > 0
  c10::ScalarType dtype;
  int32_t group;         // coefficient slot
};

// params <- snapshots + coeffs[group] * (params - snapshots), skipping groups whose flag is set.
cudaError_t launch_update_scale(const std::vector<ParamRef>& params, const double* coeffs, const bool* flags,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace mmk
