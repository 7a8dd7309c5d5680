// CUDA implementation of mmkernels_C::group_grad_stats (schema: csrc/module.cpp) and group_grad_tensor_stats
// (schema: csrc/group_grad_stats.cpp): checks, workspace, guard,
// stream, then group_grad_stats.cu. Compiled only with -DMMKERNELS_WITH_CUDA.
#ifdef MMKERNELS_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../group_grad_stats.h"
#include "group_grad_stats.cuh"
#include "multi_tensor_apply.cuh"

namespace mmk {
namespace {

// The pairs with elements, the float64 options and the chunk workspace of one call (inputs checked).
struct Work {
  std::vector<cuda::PairRef> pairs;
  at::Tensor partials;
};

Work prepare(at::TensorList a, at::TensorList b, at::IntArrayRef group, int64_t num_groups) {
  TORCH_CHECK(num_groups <= cuda::kMaxGroups, "group_grad_stats: at most ", cuda::kMaxGroups, " groups per call, got ",
              num_groups);
  Work w;
  int64_t chunks = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].numel() == 0) continue;
    w.pairs.push_back({a[i].const_data_ptr(), b[i].const_data_ptr(), a[i].numel(), a[i].scalar_type(),
                       (int32_t)group[i], (int32_t)i});
    chunks += cuda::num_chunks(a[i].numel());
  }
  TORCH_CHECK(chunks < (int64_t(1) << 31), "group_grad_stats: too many elements in one call");
  w.partials = at::empty({3 * std::max<int64_t>(chunks, 1)}, a[0].options().dtype(at::kDouble));
  return w;
}

at::Tensor group_grad_stats_cuda(at::TensorList a, at::TensorList b, at::IntArrayRef group, int64_t num_groups) {
  check_group_grad_stats_inputs(a, b, group, num_groups, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(a[0].device());
  Work w = prepare(a, b, group, num_groups);
  auto out = at::empty({num_groups, 3}, w.partials.options());
  const cudaError_t err = cuda::launch_group_grad_stats(w.pairs, (int)num_groups, w.partials.data_ptr<double>(),
                                                        out.data_ptr<double>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "group_grad_stats: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

std::tuple<at::Tensor, at::Tensor> group_grad_tensor_stats_cuda(at::TensorList a, at::TensorList b,
                                                                at::IntArrayRef group, int64_t num_groups) {
  check_group_grad_stats_inputs(a, b, group, num_groups, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(a[0].device());
  Work w = prepare(a, b, group, num_groups);
  auto out = at::empty({num_groups, 3}, w.partials.options());
  auto per_tensor = at::zeros({(int64_t)a.size(), 3}, w.partials.options());  // empty tensors keep their 0 row
  const cudaError_t err = cuda::launch_group_grad_tensor_stats(
      w.pairs, (int)num_groups, w.partials.data_ptr<double>(), out.data_ptr<double>(), per_tensor.data_ptr<double>(),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "group_grad_tensor_stats: CUDA launch failed: ", cudaGetErrorString(err));
  return {out, per_tensor};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels_C, CUDA, m) {
  m.impl("group_grad_stats", &group_grad_stats_cuda);
  m.impl("group_grad_tensor_stats", &group_grad_tensor_stats_cuda);
}

}  // namespace mmk
#endif  // MMKERNELS_WITH_CUDA
