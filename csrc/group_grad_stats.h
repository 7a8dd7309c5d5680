// Argument checks of mmkernels_C::group_grad_stats, shared by the CPU (group_grad_stats.cpp) and CUDA
// (cuda/group_grad_stats_glue.cpp) implementations.
#pragma once
#include <ATen/core/Tensor.h>

namespace mmk {

inline void check_group_grad_stats_inputs(at::TensorList a, at::TensorList b, at::IntArrayRef group,
                                          int64_t num_groups, c10::DeviceType device) {
  const int64_t n = (int64_t)a.size();
  TORCH_CHECK((int64_t)b.size() == n && (int64_t)group.size() == n, "group_grad_stats: got ", n, " tensors in a, ",
              b.size(), " in b and ", group.size(), " group indices");
  TORCH_CHECK(num_groups >= 1, "group_grad_stats: num_groups must be >= 1, got ", num_groups);
  for (int64_t i = 0; i < n; ++i) {
    const auto st = a[i].scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                "group_grad_stats: a[", i, "] has dtype ", st, "; supported are float32, float16, bfloat16, float64");
    TORCH_CHECK(b[i].scalar_type() == st && b[i].sizes() == a[i].sizes(), "group_grad_stats: b[", i, "] is ",
                b[i].scalar_type(), " ", b[i].sizes(), " but a[", i, "] is ", st, " ", a[i].sizes());
    TORCH_CHECK(a[i].layout() == at::kStrided && b[i].layout() == at::kStrided && a[i].is_contiguous() &&
                    b[i].is_contiguous(),
                "group_grad_stats: a[", i, "] and b[", i, "] must be dense and contiguous");
    TORCH_CHECK(a[i].device().type() == device && b[i].device() == a[i].device() && a[i].device() == a[0].device(),
                "group_grad_stats: a[", i, "] and b[", i, "] must be on ", a[0].device());
    TORCH_CHECK(group[i] >= 0 && group[i] < num_groups, "group_grad_stats: group[", i, "] = ", group[i],
                " is not in [0, ", num_groups, ")");
  }
}

}  // namespace mmk
