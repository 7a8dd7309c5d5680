// CPU kernel of group_grad_combine_ (Python: mmkernels/ops/group_grad_combine.py): in place, for every tensor t
// of group g(t), grads_t <- s_t * (a_g * grads_t + b_g * others_t), one multi-tensor pass (a functor on
// csrc/multi_tensor_apply.h). MMPareto's combined gradient is this with grads = the summed gradient, others =
// the multimodal gradient, (a, b) from its weights and s_t from its per-tensor magnitude rule.
// Coefficients: the products s_t * a_g and s_t * b_g in float64, rounded once to the arithmetic type (fp32
// for fp16/bf16/fp32 tensors, fp64 for fp64), then two products and one sum without FMA contraction, the
// result rounded once to the tensor's dtype: the CUDA kernel and the PyTorch reference round the same way.
// Float32 runs through an AVX2 loop (compiled without FMA, so it rounds the same) where the CPU has one.
// The op's schema is defined here, a fragment of the namespace that csrc/module.cpp defines.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "group_grad_combine.h"
#include "group_grad_lanes.h"
#include "multi_tensor_apply.h"
#include "noise.h"

namespace mmk {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
void combine_portable(T* g, const T* h, int64_t begin, int64_t n, double p, double q) {
  using A = acc_t<T>;
  const A cp = static_cast<A>(p), cq = static_cast<A>(q);
  for (int64_t i = begin; i < n; ++i) {
    const A x = static_cast<A>(g[i]), y = static_cast<A>(h[i]);
    if constexpr (std::is_same_v<A, float>) {
      g[i] = static_cast<T>(fadd(fmul(cp, x), fmul(cq, y)));
    } else {
      g[i] = static_cast<T>(cp * x + cq * y);
    }
  }
}

// Whole 16-element blocks; returns how many elements it took.
// AVX2 without FMA: a contracted multiply-add would round once where the other paths round twice.
__attribute__((target("avx2"))) int64_t combine_avx2(float* g, const float* h, int64_t n, float p, float q) {
  const __m256 cp = _mm256_set1_ps(p), cq = _mm256_set1_ps(q);
  const int64_t m = n - n % 16;
  for (int64_t i = 0; i < m; i += 16) {
    const __m256 x0 = _mm256_loadu_ps(g + i), x1 = _mm256_loadu_ps(g + i + 8);
    const __m256 y0 = _mm256_loadu_ps(h + i), y1 = _mm256_loadu_ps(h + i + 8);
    _mm256_storeu_ps(g + i, _mm256_add_ps(_mm256_mul_ps(cp, x0), _mm256_mul_ps(cq, y0)));
    _mm256_storeu_ps(g + i + 8, _mm256_add_ps(_mm256_mul_ps(cp, x1), _mm256_mul_ps(cq, y1)));
  }
  return m;
}

template <typename T>
void combine_range(T* g, const T* h, int64_t n, double p, double q) {
  int64_t done = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (isa::avx2_fma()) done = combine_avx2(g, h, n, static_cast<float>(p), static_cast<float>(q));
  }
  combine_portable(g, h, done, n, p, q);
}

void group_grad_combine_cpu(at::TensorList grads, at::TensorList others, const at::Tensor& a, const at::Tensor& b,
                            const c10::optional<at::Tensor>& scale, at::IntArrayRef group) {
  check_group_grad_combine_inputs(grads, others, a, b, scale, group, c10::DeviceType::CPU);
  cpu::check_disjoint(grads, "group_grad_combine_");
  const auto av = a.to(at::kDouble).contiguous(), bv = b.to(at::kDouble).contiguous();
  const at::Tensor sv = scale.has_value() ? scale->to(at::kDouble).contiguous() : at::Tensor();
  const double *ap = av.const_data_ptr<double>(), *bp = bv.const_data_ptr<double>();
  const double* sp = sv.defined() ? sv.const_data_ptr<double>() : nullptr;
  const int64_t n = (int64_t)grads.size();
  std::vector<double> p(n), q(n);
  std::vector<int64_t> numel(n);
  for (int64_t i = 0; i < n; ++i) {
    const double s = sp ? sp[i] : 1.0;
    p[i] = s * ap[group[i]];
    q[i] = s * bp[group[i]];
    numel[i] = grads[i].numel();
  }
  const cpu::ChunkList list(numel, 16384);
  cpu::for_each_chunk(list, [&](const cpu::Chunk& ch, int64_t) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[ch.tensor].scalar_type(), "group_grad_combine_",
                                    [&] {
                                      combine_range(grads[ch.tensor].data_ptr<scalar_t>() + ch.begin,
                                                    others[ch.tensor].const_data_ptr<scalar_t>() + ch.begin,
                                                    ch.end - ch.begin, p[ch.tensor], q[ch.tensor]);
                                    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmkernels_C, m) {
  // In place: grads[i] <- scale[i] * (a[group[i]] * grads[i] + b[group[i]] * others[i]) (scale None: 1).
  m.def("group_grad_combine_(Tensor(a!)[] grads, Tensor[] others, Tensor a, Tensor b, Tensor? scale, "
        "int[] group) -> ()");
}

TORCH_LIBRARY_IMPL(mmkernels_C, CPU, m) { m.impl("group_grad_combine_", &group_grad_combine_cpu); }

}  // namespace mmk
