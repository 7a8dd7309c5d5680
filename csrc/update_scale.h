// Argument checks of mmkernels_C::update_scale_, shared by the CPU (update_scale.cpp) and CUDA
// (cuda/update_scale_glue.cpp) implementations: all of them run before any parameter is written.
#pragma once
#include <ATen/core/Tensor.h>

#include "multi_tensor_apply.h"

namespace mmk {

inline void check_update_scale_inputs(at::TensorList params, at::TensorList snapshots, const at::Tensor& coeffs,
                                      at::IntArrayRef group, c10::DeviceType device) {
  const int64_t n = (int64_t)params.size();
  TORCH_CHECK((int64_t)snapshots.size() == n && (int64_t)group.size() == n, "update_scale_: got ", n,
              " parameters, ", snapshots.size(), " snapshots and ", group.size(), " group indices");
  TORCH_CHECK(coeffs.dim() == 1 && coeffs.is_floating_point() && coeffs.device().type() == device,
              "update_scale_: coeffs must be a 1-D floating tensor on ", device);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& s = snapshots[i];
    const auto st = p.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                "update_scale_: params[", i, "] has dtype ", st, "; supported are float32, float16, bfloat16, float64");
    TORCH_CHECK(p.layout() == at::kStrided && s.layout() == at::kStrided && p.is_contiguous() && s.is_contiguous(),
                "update_scale_: params[", i, "] and snapshots[", i, "] must be dense and contiguous");
    TORCH_CHECK(s.scalar_type() == st && s.sizes() == p.sizes(), "update_scale_: snapshots[", i, "] is ",
                s.scalar_type(), " ", s.sizes(), " but params[", i, "] is ", st, " ", p.sizes());
    TORCH_CHECK(p.device() == coeffs.device() && s.device() == coeffs.device(), "update_scale_: params[", i,
                "] and snapshots[", i, "] must be on ", coeffs.device());
    TORCH_CHECK(group[i] >= 0 && group[i] < coeffs.numel(), "update_scale_: group[", i, "] = ", group[i],
                " is not in [0, ", coeffs.numel(), ")");
  }
  cpu::check_disjoint(params, "update_scale_");
}

}  // namespace mmk
