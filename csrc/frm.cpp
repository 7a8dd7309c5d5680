// CPU kernel of frm (Python: mmkernels/ops/frm.py): MWAM's Frequency Ratio Metric in one read of x.
// Work item: one strip of p image rows (one patch row) of one channel of one sample. Stage 1 contracts the
// p rows with the 2q DCT rows the metric reads (Z = R·strip, 2q x W, vectorised along W); stage 2 contracts
// each patch's p columns with the same rows, giving the q x q low block Y[a, d] and the flipped high block
// Y[p-1-a, p-1-d]; |low / (high + eps)| is summed in double per strip. Strip partials are combined in strip
// order, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "simd.h"

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace mmk {
namespace {

struct FrmArgs {
  const void* x;
  int64_t C, H, W, sb, sc, sh, sw;
  int64_t p, q, nph, npw;
};

// The body, inlined into a portable and an AVX2+FMA copy (the extension is built without -mavx2; the
// wider copy is picked at run time).
// Stage 1 for p = 8, float32: eight columns at a time, the eight image rows loaded once and all 2q outputs
// kept in registers (no read-modify-write of Z per row). Returns the columns done (a multiple of 8).
template <int Q2>
__attribute__((target("avx2,fma"))) int64_t frm_stage1_p8_q(const float* const* src, int64_t W, const float* R,
                                                           float* Z) {
  const int64_t done = W / 8 * 8;
  __m256 c[Q2][8];
  for (int r = 0; r < Q2; ++r)
    for (int i = 0; i < 8; ++i) c[r][i] = _mm256_set1_ps(R[r * 8 + i]);
  for (int64_t w = 0; w < done; w += 8) {
    __m256 x[8];
    for (int i = 0; i < 8; ++i) x[i] = _mm256_loadu_ps(src[i] + w);
    for (int r = 0; r < Q2; ++r) {
      __m256 acc = _mm256_mul_ps(c[r][0], x[0]);
      for (int i = 1; i < 8; ++i) acc = _mm256_fmadd_ps(c[r][i], x[i], acc);
      _mm256_storeu_ps(Z + r * W + w, acc);
    }
  }
  return done;
}

__attribute__((target("avx2,fma"))) int64_t frm_stage1_p8_avx2(const float* const* src, int64_t W, int64_t q,
                                                             const float* R, float* Z) {
  switch (q) {
    case 1: return frm_stage1_p8_q<2>(src, W, R, Z);
    case 2: return frm_stage1_p8_q<4>(src, W, R, Z);
    case 3: return frm_stage1_p8_q<6>(src, W, R, Z);
    case 4: return frm_stage1_p8_q<8>(src, W, R, Z);
    default: return 0;
  }
}

// Stage 2 for p = 8, float32, eight patches at a time: an 8x8 register transpose of each Z row turns the
// patches into vector lanes, so every coefficient is 8 broadcast multiply-adds and the ratio is computed
// lane-wise. A last partial group runs on a zero-padded copy with its padding lanes masked out. Returns
// the number of patches done (all of them); their |ratio| sum is added to *tot.
__attribute__((target("avx2,fma"))) static inline __m256 frm_group_p8(const float* Z, int64_t W, int64_t q,
                                                                     const float* R, __m256 veps) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 zt[8][8];  // [row r < 2q <= 8][column n]: lanes = 8 patches
  for (int64_t r = 0; r < 2 * q; ++r) {
    const float* z = Z + r * W;
    __m256 v[8];
    for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(z + 8 * i);
    mmkernels::transpose8x8_ps(v, zt[r]);
  }
  __m256 sum = _mm256_setzero_ps();
  for (int64_t a = 0; a < q; ++a) {
    for (int64_t d = 0; d < q; ++d) {
      const float* rl = R + d * 8;
      const float* rh = R + (q + d) * 8;
      __m256 yl = _mm256_mul_ps(_mm256_set1_ps(rl[0]), zt[a][0]);
      __m256 yh = _mm256_mul_ps(_mm256_set1_ps(rh[0]), zt[q + a][0]);
      for (int n = 1; n < 8; ++n) {
        yl = _mm256_fmadd_ps(_mm256_set1_ps(rl[n]), zt[a][n], yl);
        yh = _mm256_fmadd_ps(_mm256_set1_ps(rh[n]), zt[q + a][n], yh);
      }
      sum = _mm256_add_ps(sum, _mm256_andnot_ps(sign, _mm256_div_ps(yl, _mm256_add_ps(yh, veps))));
    }
  }
  return sum;
}

__attribute__((target("avx2,fma"))) static inline __m256d frm_widen_add(__m256d acc, __m256 s) {
  return _mm256_add_pd(acc, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(s)),
                                          _mm256_cvtps_pd(_mm256_extractf128_ps(s, 1))));
}

__attribute__((target("avx2,fma"))) int64_t frm_stage2_p8_avx2(const float* Z, int64_t W, int64_t npw, int64_t q,
                                                             const float* R, float eps, double* tot) {
  const int64_t full = npw / 8 * 8;
  const __m256 veps = _mm256_set1_ps(eps);
  // float32 within a group of 8 patches x q*q terms, double across groups (the strip total)
  __m256d acc = _mm256_setzero_pd();
  for (int64_t pw = 0; pw < full; pw += 8) acc = frm_widen_add(acc, frm_group_p8(Z + pw * 8, W, q, R, veps));
  if (full < npw) {
    const int64_t rest = npw - full;
    alignas(32) float pad[8 * 64] = {};
    for (int64_t r = 0; r < 2 * q; ++r)
      for (int64_t i = 0; i < rest * 8; ++i) pad[r * 64 + i] = Z[r * W + full * 8 + i];
    alignas(32) int32_t keep[8];
    for (int l = 0; l < 8; ++l) keep[l] = l < rest ? -1 : 0;
    // padding lanes are 0 / (0 + eps): dropped explicitly (NaN when eps == 0)
    acc = frm_widen_add(acc, _mm256_and_ps(frm_group_p8(pad, 64, q, R, veps),
                                           _mm256_castsi256_ps(_mm256_load_si256((const __m256i*)keep))));
  }
  alignas(32) double t[4];
  _mm256_store_pd(t, acc);
  *tot += (t[0] + t[1]) + (t[2] + t[3]);
  return npw;
}

template <typename T, typename A, int PP, bool Wide>
static inline __attribute__((always_inline)) void frm_strips_body(const FrmArgs& g, const A* R, A eps, int64_t s0,
                                                                  int64_t s1, double* part) {
  const int64_t p = PP ? PP : g.p, q = g.q, W = g.W;
  const bool direct = std::is_same<T, A>::value && g.sw == 1;
  std::vector<A> rowbuf(direct ? 0 : p * W), zbuf(2 * q * W);
  std::vector<const A*> src(p);
  A* Z = zbuf.data();
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t ph = s % g.nph, bc = s / g.nph, c = bc % g.C, b = bc / g.C;
    const T* base = static_cast<const T*>(g.x) + b * g.sb + c * g.sc + ph * p * g.sh;
    for (int64_t i = 0; i < p; ++i) {
      const T* row = base + i * g.sh;
      if (direct) {
        src[i] = reinterpret_cast<const A*>(row);
      } else {
        A* dst = rowbuf.data() + i * W;
        for (int64_t w = 0; w < W; ++w) dst[w] = static_cast<A>(row[w * g.sw]);
        src[i] = dst;
      }
    }
    // Stage 1: Z[r, w] = sum_i R[r, i] x[i, w]
    int64_t w_done = 0;
    if constexpr (Wide && PP == 8 && std::is_same<A, float>::value) w_done = frm_stage1_p8_avx2(src.data(), W, q, R, Z);
    if (w_done < W)
    for (int64_t r = 0; r < 2 * q; ++r) {
      A* z = Z + r * W;
      const A c0 = R[r * p];
      const A* x0 = src[0];
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) z[w] = c0 * x0[w];
      for (int64_t i = 1; i < p; ++i) {
        const A ci = R[r * p + i];
        const A* xi = src[i];
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) z[w] += ci * xi[w];
      }
    }
    // Stage 2, per patch: low Y[a, d] and its flipped-high partner
    double tot = 0.0;
    int64_t pw0 = 0;
    if constexpr (Wide && PP == 8 && std::is_same<A, float>::value) pw0 = frm_stage2_p8_avx2(Z, W, g.npw, q, R, eps, &tot);
    for (int64_t pw = pw0; pw < g.npw; ++pw) {
      for (int64_t a = 0; a < q; ++a) {
        const A* zl = Z + a * W + pw * p;
        const A* zh = Z + (q + a) * W + pw * p;
        for (int64_t d = 0; d < q; ++d) {
          const A* rl = R + d * p;
          const A* rh = R + (q + d) * p;
          A yl = 0, yh = 0;
#pragma omp simd reduction(+ : yl, yh)
          for (int64_t n = 0; n < p; ++n) {
            yl += zl[n] * rl[n];
            yh += zh[n] * rh[n];
          }
          tot += static_cast<double>(std::abs(yl / (yh + eps)));
        }
      }
    }
    part[s] = tot;
  }
}

template <typename T, typename A, int PP>
void frm_strips_generic(const FrmArgs& g, const A* R, A eps, int64_t s0, int64_t s1, double* part) {
  frm_strips_body<T, A, PP, false>(g, R, eps, s0, s1, part);
}

template <typename T, typename A, int PP>
__attribute__((target("avx2,fma"))) void frm_strips_avx2(const FrmArgs& g, const A* R, A eps, int64_t s0,
                                                          int64_t s1, double* part) {
  frm_strips_body<T, A, PP, true>(g, R, eps, s0, s1, part);
}

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

template <typename T, typename A>
void frm_run(const FrmArgs& g, double eps, int64_t strips, double* part) {
  // Rows D[0..q-1] then D[p-1], ..., D[p-q] of the orthonormal DCT-II, built in double, rounded once.
  std::vector<A> R(2 * g.q * g.p);
  const double pi = std::acos(-1.0);
  for (int64_t r = 0; r < 2 * g.q; ++r) {
    const int64_t k = r < g.q ? r : g.p - 1 - (r - g.q);
    const double sk = k == 0 ? std::sqrt(1.0 / g.p) : std::sqrt(2.0 / g.p);
    for (int64_t n = 0; n < g.p; ++n) R[r * g.p + n] = static_cast<A>(sk * std::cos(pi * (2 * n + 1) * k / (2.0 * g.p)));
  }
  const A eps_a = static_cast<A>(eps);
  using Fn = void (*)(const FrmArgs&, const A*, A, int64_t, int64_t, double*);
  const bool wide = cpu_has_avx2_fma();
  Fn fn = g.p == 8 ? (wide ? &frm_strips_avx2<T, A, 8> : &frm_strips_generic<T, A, 8>)
                   : (wide ? &frm_strips_avx2<T, A, 0> : &frm_strips_generic<T, A, 0>);
  // ~32K elements per task: small inputs stay on one thread (no fork/join cost).
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.p * g.W));
  const A* Rp = R.data();
  at::parallel_for(0, strips, grain, [&](int64_t s0, int64_t s1) { fn(g, Rp, eps_a, s0, s1, part); });
}

at::Tensor frm_cpu(const at::Tensor& x, int64_t patch_size, int64_t window, double eps, bool sum) {
  TORCH_CHECK(x.dim() == 4, "frm: x must be (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(patch_size >= 2 && window >= 1 && window <= patch_size / 2, "frm: bad patch_size/window ", patch_size,
              "/", window);
  TORCH_CHECK(x.size(2) % patch_size == 0 && x.size(3) % patch_size == 0, "frm: H and W must be multiples of ",
              patch_size, ", got ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "frm: x must be float32/float64/float16/bfloat16, got ", st);
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = x.size(0);
  FrmArgs g{x.const_data_ptr(), x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            patch_size, window, x.size(2) / patch_size, x.size(3) / patch_size};
  const int64_t per_b = g.C * g.nph, strips = B * per_b;
  std::vector<double> part(std::max<int64_t>(strips, 1), 0.0);
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "frm", [&] {
      using A = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
      frm_run<scalar_t, A>(g, eps, strips, part.data());
    });
  }
  std::vector<double> per(B, 0.0);
  for (int64_t b = 0; b < B && x.numel() > 0; ++b) {
    double t = 0.0;
    for (int64_t s = b * per_b; s < (b + 1) * per_b; ++s) t += part[s];
    per[b] = t;
  }
  auto opts = at::TensorOptions().dtype(acc);
  if (sum) {
    double t = 0.0;
    for (int64_t b = 0; b < B; ++b) t += per[b];
    return at::scalar_tensor(t, opts);
  }
  auto out = at::empty({B}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "frm_out", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) o[b] = static_cast<scalar_t>(per[b]);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmkernels_C, m) {
  // Per-sample (B,) MWAM frequency ratio metric of x (B, C, H, W), or their sum (sum=true); float32
  // (float64 for float64 x). Argument ranges are checked by the Python op.
  m.def("frm(Tensor x, int patch_size, int window, float eps, bool sum) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmkernels_C, CPU, m) { m.impl("frm", &frm_cpu); }

}  // namespace mmk
