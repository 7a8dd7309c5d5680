// CUDA implementation of mmkernels_C::proximal_fisher_ (schema: csrc/proximal_fisher.cpp): checks, workspace,
// guard, stream, then proximal_fisher.cu. Compiled only with -DMMKERNELS_WITH_CUDA.
#ifdef MMKERNELS_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../proximal_fisher.h"
#include "multi_tensor_apply.cuh"
#include "proximal_fisher.cuh"

namespace mmk {
namespace {

at::Tensor proximal_fisher_cuda(at::TensorList grads, at::TensorList params, at::TensorList anchors,
                                const at::Tensor& beta, const at::Tensor& weights, at::IntArrayRef group) {
  check_proximal_fisher_inputs(grads, params, anchors, beta, weights, group, c10::DeviceType::CUDA);
  const int64_t num_groups = beta.numel();
  TORCH_CHECK(num_groups >= 1 && num_groups <= cuda::kMaxFisherGroups, "proximal_fisher_: 1 to ",
              cuda::kMaxFisherGroups, " groups per call, got ", num_groups);
  const c10::cuda::CUDAGuard guard(beta.device());
  std::vector<cuda::PullRef> refs;
  int64_t chunks = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].numel() == 0) continue;
    refs.push_back({grads[i].data_ptr(), params[i].const_data_ptr(), anchors[i].const_data_ptr(), grads[i].numel(),
                    grads[i].scalar_type(), (int32_t)i, (int32_t)group[i]});
    chunks += cuda::num_chunks(grads[i].numel());
  }
  TORCH_CHECK(chunks < (int64_t(1) << 31), "proximal_fisher_: too many elements in one call");
  auto out = at::empty({num_groups}, beta.options());
  auto partials = at::empty({std::max<int64_t>(chunks, 1)}, beta.options());
  const cudaError_t err =
      cuda::launch_proximal_fisher(refs, (int)num_groups, beta.const_data_ptr<double>(),
                                   weights.const_data_ptr<double>(), partials.data_ptr<double>(), out.data_ptr<double>(),
                                   c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "proximal_fisher_: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels_C, CUDA, m) { m.impl("proximal_fisher_", &proximal_fisher_cuda); }

}  // namespace mmk
#endif  // MMKERNELS_WITH_CUDA
