// Argument checks of mmkernels_C::group_grad_combine_, shared by the CPU (group_grad_combine.cpp) and CUDA
// (cuda/group_grad_combine_glue.cpp) implementations.
#pragma once
#include <ATen/core/Tensor.h>

namespace mmk {

inline void check_group_grad_combine_inputs(at::TensorList grads, at::TensorList others, const at::Tensor& a,
                                            const at::Tensor& b, const c10::optional<at::Tensor>& scale,
                                            at::IntArrayRef group, c10::DeviceType device) {
  const int64_t n = (int64_t)grads.size();
  TORCH_CHECK((int64_t)others.size() == n && (int64_t)group.size() == n, "group_grad_combine_: got ", n,
              " tensors in grads, ", others.size(), " in others and ", group.size(), " group indices");
  TORCH_CHECK(a.dim() == 1 && b.sizes() == a.sizes() && a.numel() >= 1,
              "group_grad_combine_: a and b must be (G,) with G >= 1, got ", a.sizes(), " and ", b.sizes());
  const int64_t num_groups = a.numel();
  for (const at::Tensor* c : {&a, &b})
    TORCH_CHECK(c->is_floating_point() && c->device().type() == device,
                "group_grad_combine_: a and b must be floating tensors on ", c10::DeviceTypeName(device));
  if (scale.has_value())
    TORCH_CHECK(scale->dim() == 1 && scale->numel() == n && scale->is_floating_point() &&
                    scale->device() == a.device(),
                "group_grad_combine_: scale must be a floating (", n, ",) tensor on ", a.device(), ", got ",
                scale->sizes(), " ", scale->scalar_type(), " on ", scale->device());
  for (int64_t i = 0; i < n; ++i) {
    const auto st = grads[i].scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                "group_grad_combine_: grads[", i, "] has dtype ", st,
                "; supported are float32, float16, bfloat16, float64");
    TORCH_CHECK(others[i].scalar_type() == st && others[i].sizes() == grads[i].sizes(), "group_grad_combine_: others[",
                i, "] is ", others[i].scalar_type(), " ", others[i].sizes(), " but grads[", i, "] is ", st, " ",
                grads[i].sizes());
    TORCH_CHECK(grads[i].layout() == at::kStrided && others[i].layout() == at::kStrided && grads[i].is_contiguous() &&
                    others[i].is_contiguous(),
                "group_grad_combine_: grads[", i, "] and others[", i, "] must be dense and contiguous");
    TORCH_CHECK(grads[i].device() == a.device() && others[i].device() == a.device(), "group_grad_combine_: grads[",
                i, "] and others[", i, "] must be on ", a.device());
    TORCH_CHECK(group[i] >= 0 && group[i] < num_groups, "group_grad_combine_: group[", i, "] = ", group[i],
                " is not in [0, ", num_groups, ")");
  }
}

}  // namespace mmk
