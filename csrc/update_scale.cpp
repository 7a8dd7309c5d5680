// CPU kernel of update_scale_ (Python: mmkernels/ops/update_scale.py): for parameters grouped by modality,
// theta <- theta0 + k_g * (theta - theta0) with snapshots theta0 and one coefficient per group, in one
// multi-tensor pass (a functor on csrc/multi_tensor_apply.h). A group whose coefficient is NaN/Inf is left
// unchanged and flagged. Arithmetic in fp32 (fp64 for fp64 parameters), rounded once, no FMA (the CUDA
// kernel and the PyTorch reference round the same way). fp32 runs 8 lanes at a time under AVX2 (target
// "avx2" without "fma", so the compiler cannot contract the product and the sum either).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "multi_tensor_apply.h"
#include "noise.h"
#include "update_scale.h"

namespace mmk {

namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
void pull_range(T* p, const T* s, int64_t n, double k) {
  using A = acc_t<T>;
  const A c = static_cast<A>(k);
  for (int64_t i = 0; i < n; ++i) {
    const A x = static_cast<A>(p[i]), x0 = static_cast<A>(s[i]);
    if constexpr (std::is_same_v<A, float>) {
      p[i] = static_cast<T>(fadd(x0, fmul(c, fadd(x, -x0))));
    } else {
      p[i] = static_cast<T>(x0 + c * (x - x0));
    }
  }
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) void pull_range_f32_avx2(float* p, const float* s, int64_t n, float c) {
  const __m256 vc = _mm256_set1_ps(c);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 x0 = _mm256_loadu_ps(p + i), s0 = _mm256_loadu_ps(s + i);
    const __m256 x1 = _mm256_loadu_ps(p + i + 8), s1 = _mm256_loadu_ps(s + i + 8);
    _mm256_storeu_ps(p + i, _mm256_add_ps(s0, _mm256_mul_ps(vc, _mm256_sub_ps(x0, s0))));
    _mm256_storeu_ps(p + i + 8, _mm256_add_ps(s1, _mm256_mul_ps(vc, _mm256_sub_ps(x1, s1))));
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 x0 = _mm256_loadu_ps(p + i), s0 = _mm256_loadu_ps(s + i);
    _mm256_storeu_ps(p + i, _mm256_add_ps(s0, _mm256_mul_ps(vc, _mm256_sub_ps(x0, s0))));
  }
  for (; i < n; ++i) p[i] = fadd(s[i], fmul(c, fadd(p[i], -s[i])));
}
#endif

template <typename T>
void pull(T* p, const T* s, int64_t n, double k) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    if (isa::avx2()) return pull_range_f32_avx2(p, s, n, static_cast<float>(k));
  }
#endif
  pull_range(p, s, n, k);
}

at::Tensor update_scale_cpu(at::TensorList params, at::TensorList snapshots, const at::Tensor& coeffs,
                            at::IntArrayRef group) {
  check_update_scale_inputs(params, snapshots, coeffs, group, c10::DeviceType::CPU);
  const auto k = coeffs.to(at::kDouble).contiguous();
  const double* kv = k.const_data_ptr<double>();
  auto flags = k.isfinite().logical_not();
  const bool* bad = flags.const_data_ptr<bool>();
  std::vector<int64_t> numel(params.size());
  for (size_t i = 0; i < params.size(); ++i) numel[i] = params[i].numel();
  const cpu::ChunkList list(numel, 16384);
  cpu::for_each_chunk(list, [&](const cpu::Chunk& ch, int64_t) {
    const int64_t g = group[ch.tensor];
    if (bad[g]) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[ch.tensor].scalar_type(), "update_scale_", [&] {
      pull(params[ch.tensor].data_ptr<scalar_t>() + ch.begin,
                 snapshots[ch.tensor].const_data_ptr<scalar_t>() + ch.begin, ch.end - ch.begin, kv[g]);
    });
  });
  return flags;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels_C, CPU, m) { m.impl("update_scale_", &update_scale_cpu); }

}  // namespace mmk
