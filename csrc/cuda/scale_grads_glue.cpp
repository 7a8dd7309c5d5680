// CUDA implementations of the mmkernels_C ops (schemas: csrc/module.cpp) for scale_grads_: checks,
// workspace, device guard and stream, then the kernels of scale_grads.cu. Compiled only with
// -DMMKERNELS_WITH_CUDA (setup.py adds csrc/cuda/*.cpp only for a CUDA build of torch).
#ifdef MMKERNELS_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../scale_grads.h"
#include "multi_tensor_apply.cuh"
#include "scale_grads.cuh"

namespace mmk {
namespace {

at::Tensor scale_grads_cuda(at::TensorList tensors, const at::Tensor& coeff, const std::optional<at::Tensor>& seed) {
  check_scale_grads_inputs(tensors, coeff, seed, c10::DeviceType::CUDA);
  const int64_t n = (int64_t)tensors.size();
  std::vector<cuda::GradRef> grads;
  grads.reserve(n);
  int64_t chunks = 0;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) continue;
    grads.push_back({t.data_ptr(), t.numel(), t.scalar_type(), (int32_t)i, (int32_t)chunks});
    chunks += cuda::num_chunks(t.numel());
  }
  TORCH_CHECK(chunks < (int64_t(1) << 31), "scale_grads_: too many elements in one call (", chunks, " chunks)");
  const c10::cuda::CUDAGuard guard(coeff.device());
  // A non-finite coeff flags every tensor up front, on the device (no host read of coeff); the kernels
  // skip flagged tensors.
  const auto c = coeff.reshape({}).to(at::kDouble);
  auto flags = c.isfinite().logical_not().expand({n}).contiguous();
  if (grads.empty()) return flags;
  const auto opts = coeff.options();
  at::Tensor partials, counters, stdv;
  cuda::ScaleGradsWorkspace work{nullptr, nullptr, nullptr, flags.data_ptr<bool>()};
  const int64_t* seed_ptr = nullptr;
  if (seed.has_value()) {
    partials = at::empty({3 * chunks}, opts.dtype(at::kDouble));
    counters = at::zeros({n}, opts.dtype(at::kInt));
    stdv = at::empty({n}, opts.dtype(at::kFloat));
    work.partials = partials.data_ptr<double>();
    work.counters = reinterpret_cast<unsigned int*>(counters.data_ptr<int>());
    work.stdv = stdv.data_ptr<float>();
    seed_ptr = seed->const_data_ptr<int64_t>();
  }
  const cudaError_t err = cuda::launch_scale_grads(grads, c.const_data_ptr<double>(), seed_ptr, work,
                                                   c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "scale_grads_: CUDA launch failed: ", cudaGetErrorString(err));
  return flags;
}

at::Tensor philox_normal_cuda(const at::Tensor& seed, int64_t tensor, int64_t numel, int64_t offset) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "philox_normal: seed must be a 1-element int64 tensor");
  TORCH_CHECK(numel >= 0, "philox_normal: numel must be >= 0, got ", numel);
  TORCH_CHECK(offset >= 0 && offset % 4 == 0, "philox_normal: offset must be a multiple of 4 and >= 0, got ", offset);
  const c10::cuda::CUDAGuard guard(seed.device());
  auto out = at::empty({numel}, seed.options().dtype(at::kFloat));
  const cudaError_t err = cuda::launch_philox_normal(seed.const_data_ptr<int64_t>(), (uint32_t)tensor, numel,
                                                     offset / 4, out.data_ptr<float>(),
                                                     c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "philox_normal: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels_C, CUDA, m) {
  m.impl("scale_grads_", &scale_grads_cuda);
  m.impl("philox_normal", &philox_normal_cuda);
}

}  // namespace mmk
#endif  // MMKERNELS_WITH_CUDA
