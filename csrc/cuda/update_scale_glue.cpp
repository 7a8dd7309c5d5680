// CUDA implementation of mmkernels_C::update_scale_ (schema: csrc/module.cpp): checks, guard, stream, then
// update_scale.cu. Compiled only with -DMMKERNELS_WITH_CUDA.
#ifdef MMKERNELS_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../update_scale.h"
#include "update_scale.cuh"

namespace mmk {
namespace {

at::Tensor update_scale_cuda(at::TensorList params, at::TensorList snapshots, const at::Tensor& coeffs,
                             at::IntArrayRef group) {
  check_update_scale_inputs(params, snapshots, coeffs, group, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(coeffs.device());
  const auto k = coeffs.to(at::kDouble).contiguous();
  auto flags = k.isfinite().logical_not();  // on the device: no host read of the coefficients
  std::vector<cuda::ParamRef> refs;
  for (size_t i = 0; i < params.size(); ++i)
    if (params[i].numel() > 0)
      refs.push_back({params[i].data_ptr(), snapshots[i].const_data_ptr(), params[i].numel(), params[i].scalar_type(),
                      (int32_t)group[i]});
  if (refs.empty()) return flags;
  const cudaError_t err = cuda::launch_update_scale(refs, k.const_data_ptr<double>(), flags.const_data_ptr<bool>(),
                                                    c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "update_scale_: CUDA launch failed: ", cudaGetErrorString(err));
  return flags;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels_C, CUDA, m) { m.impl("update_scale_", &update_scale_cuda); }

}  // namespace mmk
#endif  // MMKERNELS_WITH_CUDA
