// Interface between the CUDA kernels of proximal_fisher_ (proximal_fisher.cu) and their glue
// (proximal_fisher_glue.cpp).
#pragma once
#include <c10/core/ScalarType.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <vector>

namespace mmk {
namespace cuda {

constexpr int kMaxFisherGroups = 64;  // groups per call (modality encoders; the bounds travel as kernel arguments)

struct PullRef {
  void* grad;          // written
  const void* param;   // read
  const void* anchor;  // read
  int64_t numel;       // > 0
  c10::ScalarType dtype;
  int32_t index;       // position in the caller's list (its Fisher weight)
  int32_t group;       // its beta and its Fisher sum
};

// grads += beta[group] * (params - anchors) (groups whose beta is 0 or NaN/Inf are not written); out (num_groups
// doubles, device): sum over the group's tensors of weights[index] * sum(grad^2) after the pull. partials: one
// double per chunk of the whole list. Deterministic: chunk partials are combined in a fixed order.
cudaError_t launch_proximal_fisher(const std::vector<PullRef>& refs, int num_groups, const double* beta,
                                   const double* weights, double* partials, double* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace mmk
