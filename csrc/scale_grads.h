// Torch-facing declarations of the scale_grads_ kernels (CPU: scale_grads.cpp, CUDA glue:
// cuda/scale_grads_glue.cpp). Contract shared by both:
//   tensors : contiguous fp32/fp16/bf16/fp64 tensors on one device (the Python wrapper makes
//             non-contiguous ones contiguous and copies back)
//   coeff   : 0-d floating tensor on that device
//   seed    : 1-element int64 tensor on that device (drawn from the user's torch.Generator), or None
//             for "no noise"
// returns a bool tensor (len(tensors),) on that device: true where the tensor held a NaN/Inf and was
// therefore left unchanged.
#pragma once
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace mmk {

at::Tensor scale_grads_cpu(const std::vector<at::Tensor>& tensors, const at::Tensor& coeff,
                           const std::optional<at::Tensor>& seed);
// Standard normals n of list entry `tensor` for `seed` (element i of that tensor gets n[i]); exposes the
// noise stream for tests and for checking CPU/CUDA agreement.
at::Tensor philox_normal_cpu(int64_t seed, int64_t tensor, int64_t numel);

#ifdef MMKERNELS_WITH_CUDA
at::Tensor scale_grads_cuda(const std::vector<at::Tensor>& tensors, const at::Tensor& coeff,
                            const std::optional<at::Tensor>& seed);
at::Tensor philox_normal_cuda(int64_t seed, int64_t tensor, int64_t numel);
#endif

}  // namespace mmk
