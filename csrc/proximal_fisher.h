// Argument checks of mmkernels_C::proximal_fisher_, shared by the CPU (proximal_fisher.cpp) and CUDA
// (cuda/proximal_fisher_glue.cpp) implementations: all of them run before any gradient is written.
#pragma once
#include <ATen/core/Tensor.h>

#include "multi_tensor_apply.h"

namespace mmk {

inline void check_proximal_fisher_inputs(at::TensorList grads, at::TensorList params, at::TensorList anchors,
                                         const at::Tensor& beta, const at::Tensor& weights, at::IntArrayRef group,
                                         c10::DeviceType device) {
  const int64_t n = (int64_t)grads.size();
  TORCH_CHECK((int64_t)params.size() == n && (int64_t)anchors.size() == n && (int64_t)group.size() == n,
              "proximal_fisher_: got ", n, " gradients, ", params.size(), " parameters, ", anchors.size(),
              " anchors and ", group.size(), " group indices");
  TORCH_CHECK(beta.dim() == 1 && beta.scalar_type() == at::kDouble && beta.device().type() == device &&
                  beta.is_contiguous(),
              "proximal_fisher_: beta must be a contiguous 1-D float64 tensor on ", device);
  TORCH_CHECK(weights.dim() == 1 && weights.numel() == n && weights.scalar_type() == at::kDouble &&
                  weights.device() == beta.device() && weights.is_contiguous(),
              "proximal_fisher_: weights must be a contiguous float64 tensor of ", n, " entries on ", beta.device());
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    const auto st = g.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                "proximal_fisher_: grads[", i, "] has dtype ", st, "; supported are float32, float16, bfloat16, float64");
    for (const at::Tensor* t : {&params[i], &anchors[i]})
      TORCH_CHECK(t->scalar_type() == st && t->sizes() == g.sizes(), "proximal_fisher_: params[", i, "] and anchors[",
                  i, "] must have the dtype and shape of grads[", i, "] (", st, " ", g.sizes(), "), got ",
                  t->scalar_type(), " ", t->sizes());
    TORCH_CHECK(g.layout() == at::kStrided && params[i].layout() == at::kStrided &&
                    anchors[i].layout() == at::kStrided && g.is_contiguous() && params[i].is_contiguous() &&
                    anchors[i].is_contiguous(),
                "proximal_fisher_: grads[", i, "], params[", i, "] and anchors[", i, "] must be dense and contiguous");
    TORCH_CHECK(g.device() == beta.device() && params[i].device() == beta.device() &&
                    anchors[i].device() == beta.device(),
                "proximal_fisher_: grads[", i, "], params[", i, "] and anchors[", i, "] must be on ", beta.device());
    TORCH_CHECK(group[i] >= 0 && group[i] < beta.numel(), "proximal_fisher_: group[", i, "] = ", group[i],
                " is not in [0, ", beta.numel(), ")");
  }
  cpu::check_disjoint(grads, "proximal_fisher_");
}

}  // namespace mmk
