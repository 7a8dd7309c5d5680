// CUDA implementation of mmkernels_C::group_grad_combine_ (schema: csrc/group_grad_combine.cpp): checks, guard,
// coefficients as float64 on the device, stream, then group_grad_combine.cu. Compiled only with
// -DMMKERNELS_WITH_CUDA.
#ifdef MMKERNELS_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../group_grad_combine.h"
#include "../multi_tensor_apply.h"
#include "group_grad_combine.cuh"

namespace mmk {
namespace {

void group_grad_combine_cuda(at::TensorList grads, at::TensorList others, const at::Tensor& a, const at::Tensor& b,
                             const c10::optional<at::Tensor>& scale, at::IntArrayRef group) {
  check_group_grad_combine_inputs(grads, others, a, b, scale, group, c10::DeviceType::CUDA);
  cpu::check_disjoint(grads, "group_grad_combine_");
  if (grads.empty()) return;
  const c10::cuda::CUDAGuard guard(a.device());
  const auto av = a.to(at::kDouble).contiguous(), bv = b.to(at::kDouble).contiguous();
  const at::Tensor sv = scale.has_value() ? scale->to(at::kDouble).contiguous() : at::Tensor();
  std::vector<cuda::CombineRef> refs;
  for (size_t i = 0; i < grads.size(); ++i)
    if (grads[i].numel() > 0)
      refs.push_back({grads[i].data_ptr(), others[i].const_data_ptr(), grads[i].numel(), grads[i].scalar_type(),
                      (int32_t)i, (int32_t)group[i]});
  if (refs.empty()) return;
  const cudaError_t err = cuda::launch_group_grad_combine(
      refs, av.const_data_ptr<double>(), bv.const_data_ptr<double>(), sv.defined() ? sv.const_data_ptr<double>() : nullptr,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "group_grad_combine_: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels_C, CUDA, m) { m.impl("group_grad_combine_", &group_grad_combine_cuda); }

}  // namespace mmk
#endif  // MMKERNELS_WITH_CUDA
