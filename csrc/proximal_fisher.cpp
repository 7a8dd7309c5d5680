// CPU kernel of proximal_fisher_ (Python: mmkernels/ops/proximal_fisher.py), InfoReg's per-step work on the
// parameter gradients of each modality encoder, in one multi-tensor pass (a functor on
// csrc/multi_tensor_apply.h): the proximal pull g <- g + beta_g * (theta - theta0) toward the parameters
// theta0 at the start of the epoch (or window), and the Fisher-trace term sum_t w_t * sum(g^2) of the
// pulled gradient, per group. The released code adds the pull before it accumulates g*g, so the trace
// sees the pulled gradient. A group whose beta is 0 (not regulated this step) or NaN/Inf is not written
// and only its gradients are read. Arithmetic: fp32 (fp64 for fp64) for the pull, rounded once per op
// (no FMA; the CUDA kernel and the PyTorch reference round alike), squares summed in fp64 in the lanes of
// csrc/group_grad_lanes.h (float32 through AVX2 or AVX-512 loops where the CPU has them, with the same bits) and chunk
// partials combined in chunk order, so the result depends neither on the CPU nor on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "group_grad_lanes.h"
#include "multi_tensor_apply.h"
#include "noise.h"
#include "proximal_fisher.h"

namespace mmk {

namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Elements [begin, n) of the chunk, element i into lane i % 16.
template <typename T>
void sum_squares_portable(const T* g, int64_t begin, int64_t n, double* s) {
  int64_t i = begin;
  for (; i + lanes::kLanes <= n; i += lanes::kLanes)
    for (int l = 0; l < lanes::kLanes; ++l) {
      const double x = static_cast<double>(g[i + l]);
      s[l] += x * x;
    }
  for (; i < n; ++i) {
    const double x = static_cast<double>(g[i]);
    s[i % lanes::kLanes] += x * x;
  }
}

template <typename T>
void pull_sum_squares_portable(T* g, const T* p, const T* p0, int64_t begin, int64_t n, double beta, double* s) {
  using A = acc_t<T>;
  const A c = static_cast<A>(beta);
  for (int64_t i = begin; i < n; ++i) {
    const A x = static_cast<A>(g[i]), w = static_cast<A>(p[i]), w0 = static_cast<A>(p0[i]);
    T y;
    if constexpr (std::is_same_v<A, float>) {
      y = static_cast<T>(fadd(x, fmul(c, fadd(w, -w0))));
    } else {
      y = static_cast<T>(x + c * (w - w0));
    }
    g[i] = y;
    const double d = static_cast<double>(y);  // the trace sees the gradient as stored
    s[i % lanes::kLanes] += d * d;
  }
}

// Whole 16-element blocks; return how many elements they took.
__attribute__((target("avx2,fma"))) int64_t sum_squares_avx2(const float* g, int64_t n, double* s) {
  __m256d acc[4];
  for (int k = 0; k < 4; ++k) acc[k] = _mm256_setzero_pd();
  const int64_t m = n - n % lanes::kLanes;
  for (int64_t i = 0; i < m; i += lanes::kLanes) {
    lanes::prefetch_ahead(g + i);
    __m256d x[4];
    lanes::widen16(g + i, x);
    for (int k = 0; k < 4; ++k) acc[k] = _mm256_fmadd_pd(x[k], x[k], acc[k]);
  }
  lanes::store_lanes(acc, s);
  return m;
}

// AVX2 without FMA: a contracted multiply-add would round the pull once where the other paths round twice (the
// squares of floats are exact in fp64, so their separate multiply and add lose nothing).
__attribute__((target("avx2"))) int64_t pull_sum_squares_avx2(float* g, const float* p, const float* p0,
                                                                  int64_t n, float beta, double* s) {
  const __m256 c = _mm256_set1_ps(beta);
  __m256d acc[4];
  for (int k = 0; k < 4; ++k) acc[k] = _mm256_setzero_pd();
  const int64_t m = n - n % lanes::kLanes;
  for (int64_t i = 0; i < m; i += lanes::kLanes) {
    for (int h = 0; h < 2; ++h) {
      const int64_t j = i + 8 * h;
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(p + j), _mm256_loadu_ps(p0 + j));
      const __m256 y = _mm256_add_ps(_mm256_loadu_ps(g + j), _mm256_mul_ps(c, d));
      _mm256_storeu_ps(g + j, y);
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(y)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(y, 1));
      acc[2 * h] = _mm256_add_pd(_mm256_mul_pd(lo, lo), acc[2 * h]);
      acc[2 * h + 1] = _mm256_add_pd(_mm256_mul_pd(hi, hi), acc[2 * h + 1]);
    }
  }
  lanes::store_lanes(acc, s);
  return m;
}

// AVX-512: a 16-float vector is one 16-lane block, its lanes 0-7 summed in acc[0] and 8-15 in acc[1] (the
// association of the loops above); the pull is compiled without contraction (MMK_TARGET_AVX512). No software
// prefetch (see group_grad_lanes.h). Zen 4, 1 thread, interleaved runs, 2x ResNet-18 w96 both pulled: 25.0-27.5
// ms against the AVX2 loops' 26.3-29.7; at w64 (audio pulled) no difference beyond the noise.
MMK_TARGET_AVX512 int64_t sum_squares_avx512(const float* g, int64_t n, double* s) {
  __m512d acc[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};
  const int64_t m = n - n % lanes::kLanes;
  for (int64_t i = 0; i < m; i += lanes::kLanes) {
    const __m512d lo = _mm512_cvtps_pd(_mm256_loadu_ps(g + i)), hi = _mm512_cvtps_pd(_mm256_loadu_ps(g + i + 8));
    acc[0] = _mm512_add_pd(_mm512_mul_pd(lo, lo), acc[0]);
    acc[1] = _mm512_add_pd(_mm512_mul_pd(hi, hi), acc[1]);
  }
  lanes::store_lanes(acc, s);
  return m;
}

MMK_TARGET_AVX512 int64_t pull_sum_squares_avx512(float* g, const float* p, const float* p0, int64_t n, float beta,
                                                 double* s) {
  const __m512 c = _mm512_set1_ps(beta);
  __m512d acc[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};
  const int64_t m = n - n % lanes::kLanes;
  for (int64_t i = 0; i < m; i += lanes::kLanes) {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(p + i), _mm512_loadu_ps(p0 + i));
    const __m512 y = _mm512_add_ps(_mm512_loadu_ps(g + i), _mm512_mul_ps(c, d));
    _mm512_storeu_ps(g + i, y);
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(y));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(y), 1)));
    acc[0] = _mm512_add_pd(_mm512_mul_pd(lo, lo), acc[0]);
    acc[1] = _mm512_add_pd(_mm512_mul_pd(hi, hi), acc[1]);
  }
  lanes::store_lanes(acc, s);
  return m;
}

template <typename T>
double chunk_term(T* g, const T* p, const T* p0, int64_t n, bool pull, double beta) {
  double s[lanes::kLanes] = {0};
  int64_t done = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (isa::avx512())
      done = pull ? pull_sum_squares_avx512(g, p, p0, n, static_cast<float>(beta), s) : sum_squares_avx512(g, n, s);
    else if (isa::avx2_fma())
      done = pull ? pull_sum_squares_avx2(g, p, p0, n, static_cast<float>(beta), s) : sum_squares_avx2(g, n, s);
  }
  if (pull)
    pull_sum_squares_portable(g, p, p0, done, n, beta, s);
  else
    sum_squares_portable(g, done, n, s);
  return lanes::reduce(s);
}

at::Tensor proximal_fisher_cpu(at::TensorList grads, at::TensorList params, at::TensorList anchors,
                               const at::Tensor& beta, const at::Tensor& weights, at::IntArrayRef group) {
  check_proximal_fisher_inputs(grads, params, anchors, beta, weights, group, c10::DeviceType::CPU);
  const double* b = beta.const_data_ptr<double>();
  const double* w = weights.const_data_ptr<double>();
  const int64_t num_groups = beta.numel();
  std::vector<int64_t> numel(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) numel[i] = grads[i].numel();
  const cpu::ChunkList list(numel, 16384);
  std::vector<double> part(list.size(), 0.0);
  cpu::for_each_chunk(list, [&](const cpu::Chunk& ch, int64_t k) {
    const double bg = b[group[ch.tensor]];
    const bool pull = bg != 0.0 && std::isfinite(bg);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[ch.tensor].scalar_type(), "proximal_fisher_", [&] {
      const scalar_t* p = pull ? params[ch.tensor].const_data_ptr<scalar_t>() + ch.begin : nullptr;
      const scalar_t* p0 = pull ? anchors[ch.tensor].const_data_ptr<scalar_t>() + ch.begin : nullptr;
      part[k] = w[ch.tensor] *
                chunk_term(grads[ch.tensor].data_ptr<scalar_t>() + ch.begin, p, p0, ch.end - ch.begin, pull, bg);
    });
  });
  auto out = at::zeros({num_groups}, beta.options());
  double* o = out.data_ptr<double>();
  for (int64_t k = 0; k < list.size(); ++k) o[group[list[k].tensor]] += part[k];
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmkernels_C, m) {
  // In place: grads[i] += beta[group[i]] * (params[i] - anchors[i]) (groups whose beta is 0 or NaN/Inf are
  // not written); returns (num_groups,) float64: per group, sum_i weights[i] * sum(grads[i]^2) after the pull.
  m.def("proximal_fisher_(Tensor(a!)[] grads, Tensor[] params, Tensor[] anchors, Tensor beta, Tensor weights, "
        "int[] group) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmkernels_C, CPU, m) { m.impl("proximal_fisher_", &proximal_fisher_cpu); }

}  // namespace mmk
