// Argument checks of the mmkernels_C::scale_grads_ kernels, shared by the CPU (scale_grads.cpp) and CUDA
// (cuda/scale_grads_glue.cpp) implementations: all of them run before any tensor is written.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "multi_tensor_apply.h"

namespace mmk {

inline void check_scale_grads_inputs(at::TensorList tensors, const at::Tensor& coeff,
                                     const std::optional<at::Tensor>& seed, c10::DeviceType device) {
  TORCH_CHECK(coeff.numel() == 1 && coeff.is_floating_point() && coeff.device().type() == device,
              "scale_grads_: coeff must be a 1-element floating tensor on ", device, ", got ", coeff.numel(),
              " elements of ", coeff.scalar_type(), " on ", coeff.device());
  for (int64_t i = 0; i < (int64_t)tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.layout() == at::kStrided, "scale_grads_: tensors[", i, "] has layout ", t.layout(),
                "; only dense tensors are supported");
    const auto st = t.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                "scale_grads_: tensors[", i, "] has dtype ", st, "; supported are float32, float16, bfloat16, float64");
    TORCH_CHECK(t.device() == coeff.device(), "scale_grads_: tensors[", i, "] is on ", t.device(),
                " but coeff is on ", coeff.device());
    TORCH_CHECK(t.is_contiguous(), "scale_grads_: tensors[", i, "] is not contiguous (the Python wrapper passes a "
                "contiguous copy)");
  }
  cpu::check_disjoint(tensors, "scale_grads_");
  if (seed.has_value()) {
    TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong && seed->device() == coeff.device(),
                "scale_grads_: seed must be a 1-element int64 tensor on ", coeff.device());
  }
}

}  // namespace mmk
