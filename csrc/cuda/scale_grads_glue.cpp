// Torch-facing glue of the CUDA scale_grads_ kernels: tensors -> descriptors, workspace, stream. Compiled
// only with -DMMKERNELS_WITH_CUDA (setup.py adds csrc/cuda/*.cpp only for a CUDA build of torch), so the
// CPU build never needs CUDA headers.
#ifdef MMKERNELS_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include <vector>

#include "../scale_grads.h"
#include "scale_grads.cuh"

namespace mmk {

namespace {
int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::kF32;
    case at::kHalf: return cuda::kF16;
    case at::kBFloat16: return cuda::kBF16;
    case at::kDouble: return cuda::kF64;
    default: TORCH_CHECK(false, "scale_grads_: unsupported dtype ", t, " (float32, float16, bfloat16, float64)");
  }
  return -1;
}
}  // namespace

at::Tensor scale_grads_cuda(const std::vector<at::Tensor>& tensors, const at::Tensor& coeff,
                            const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(coeff.is_cuda() && coeff.numel() == 1 && coeff.is_floating_point(),
              "scale_grads_: coeff must be a 1-element floating CUDA tensor");
  const c10::cuda::CUDAGuard guard(coeff.device());
  const int64_t n = (int64_t)tensors.size();
  std::vector<cuda::TensorDesc> descs;
  descs.reserve(n);
  int64_t chunks = 0;
  for (int64_t i = 0; i < n; ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.device() == coeff.device() && t.is_contiguous(),
                "scale_grads_: tensors must be contiguous and on the device of coeff");
    const int code = dtype_code(t.scalar_type());
    if (t.numel() == 0) continue;
    descs.push_back({t.data_ptr(), t.numel(), code, (int32_t)i});
    chunks += cuda::num_chunks(t.numel());
  }
  TORCH_CHECK(chunks < (int64_t(1) << 31), "scale_grads_: too many elements in one call");
  auto opts = coeff.options();
  auto flags = at::zeros({n}, opts.dtype(at::kBool));
  if (descs.empty()) return flags;
  auto counters = at::zeros({n}, opts.dtype(at::kInt));
  auto stdv = at::empty({n}, opts.dtype(at::kFloat));
  auto partials = at::empty({3 * chunks}, opts.dtype(at::kDouble));
  const auto c = coeff.reshape({}).to(at::kDouble);  // device op, no sync
  const int64_t* seed_ptr = nullptr;
  at::Tensor seed_t;
  if (seed.has_value()) {
    seed_t = seed->reshape({}).to(coeff.device(), at::kLong);
    seed_ptr = seed_t.const_data_ptr<int64_t>();
  }
  const int err = cuda::launch_scale_grads(descs.data(), (int)descs.size(), c.const_data_ptr<double>(), seed_ptr,
                                           partials.data_ptr<double>(),
                                           reinterpret_cast<unsigned int*>(counters.data_ptr<int>()),
                                           stdv.data_ptr<float>(), flags.data_ptr<bool>(),
                                           c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "scale_grads_: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return flags;
}

at::Tensor philox_normal_cuda(int64_t seed, int64_t tensor, int64_t numel) {
  auto out = at::empty({numel}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA));
  const int err = cuda::launch_philox_normal((uint64_t)seed, (uint32_t)tensor, numel, out.data_ptr<float>(),
                                             c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "philox_normal: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return out;
}

}  // namespace mmk
#endif  // MMKERNELS_WITH_CUDA
