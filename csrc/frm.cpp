// CPU kernel of frm (Python: mmkernels/ops/frm.py): MWAM's Frequency Ratio Metric in one read of x.
// Work item: one strip of p image rows (one patch row) of one channel of one sample. Stage 1 contracts the
// p rows with the 2q DCT rows the metric reads (Z = R·strip, 2q x W, vectorised along W); stage 2 contracts
// each patch's p columns with the same rows, giving the q x q low block Y[a, d] and the flipped high block
// Y[p-1-a, p-1-d]; |low / (high + eps)| is summed in double per strip. Strip partials are combined in strip
// order, so the result does not depend on the thread count. p = 8 with float32 arithmetic (the images the
// metric is used on) has its own AVX2 path (frm_strips_p8_avx2); everything else runs the general body.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "simd.h"

#include <cmath>
#include <cstdlib>
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

// The fast path: p = 8, float32 arithmetic (float32, float16 and bfloat16 inputs), AVX2+FMA; one strip at a time,
// everything after the strip's one read of x runs in L1 (Z is 2q rows of W floats).
//
// Stage 1, eight columns at a time. D[k, 7-n] = -D[k, n] for odd k, so an odd row is 4 multiply-adds on
// d_i = x_i - x_{7-i} (i < 4) instead of 8 on x (and d_i is exact for neighbouring pixels within a factor 2 of
// each other). Even rows keep the 8 products: the matching sums x_i + x_{7-i} are twice the size of x and
// their rounding, carried into the tiny high-frequency denominators, measurably raised the error on
// image-like inputs. The rows of the next strips are prefetched meanwhile: a strip is p rows that each span
// only a few cache lines, too short a stream for the hardware prefetcher to pick up before it ends, which
// left the kernel waiting on DRAM for most lines once x was larger than the caches.
// The 2q rows of R, every coefficient broadcast to a vector once per call: the kernels below read them as
// memory operands of their multiply-adds (one fused load per product, no broadcast in the loops).
template <int Q>
struct FrmCoef8 {
  __m256 c[2 * Q][8];
};

// DCT frequency of row r of R (rows 0..q-1 are D[0..q-1], rows q..2q-1 are D[7], D[6], ...).
template <int Q>
constexpr int frm_freq(int r) {
  return r < Q ? r : 7 - (r - Q);
}

// sum_n D[k, n] v[n] over 8 vectors, using the symmetry of the DCT rows: D[0, n] is one constant (7 adds and
// one product); for odd k D[k, 7-n] = -D[k, n], so 4 products of dv[n] = v[n] - v[7-n] (precomputed by the
// caller; exact for neighbouring values within a factor 2 of each other); other even k keep the 8 products:
// the matching sums v[n] + v[7-n] are twice the size of v and their rounding, carried into the tiny
// high-frequency denominators, measurably raised the error on image-like inputs. Beyond the saved
// multiply-adds, the adds run on the FP add pipes, which the 8-product form leaves idle.
template <int K>
__attribute__((target("avx2,fma"))) static inline __m256 frm_dot8(const __m256* c, const __m256* v, const __m256* dv) {
  if constexpr (K == 0) {
    const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])),
                                   _mm256_add_ps(_mm256_add_ps(v[4], v[5]), _mm256_add_ps(v[6], v[7])));
    return _mm256_mul_ps(c[0], s);
  } else if constexpr (K % 2 == 1) {
    __m256 acc = _mm256_mul_ps(c[0], dv[0]);
    for (int i = 1; i < 4; ++i) acc = _mm256_fmadd_ps(c[i], dv[i], acc);
    return acc;
  } else {
    __m256 acc = _mm256_mul_ps(c[0], v[0]);
    for (int i = 1; i < 8; ++i) acc = _mm256_fmadd_ps(c[i], v[i], acc);
    return acc;
  }
}

template <int Q, int R0 = 0>
__attribute__((target("avx2,fma"))) static inline void frm_stage1_rows(const FrmCoef8<Q>& R, const __m256* x,
                                                                      const __m256* d, float* z, int64_t zs) {
  if constexpr (R0 < 2 * Q) {
    _mm256_storeu_ps(z + R0 * zs, frm_dot8<frm_freq<Q>(R0)>(R.c[R0], x, d));
    frm_stage1_rows<Q, R0 + 1>(R, x, d, z, zs);
  }
}

// Stage 1, eight columns at a time: Z[r, w] = sum_i D[k_r, i] x[i, w].
template <int Q>
__attribute__((target("avx2,fma"))) static inline void frm_stage1_cols8(const float* const* src, int64_t w,
                                                                       const FrmCoef8<Q>& R, float* Z, int64_t zs) {
  __m256 x[8], d[4];
  for (int i = 0; i < 8; ++i) x[i] = _mm256_loadu_ps(src[i] + w);
  for (int i = 0; i < 4; ++i) d[i] = _mm256_sub_ps(x[i], x[7 - i]);
  frm_stage1_rows<Q>(R, x, d, Z + w, zs);
}

// The rows of a later strip are prefetched meanwhile: a strip is p rows read side by side, each only a few
// cache lines long, too short a stream for the hardware prefetcher to pick up before it ends.
template <int Q>
__attribute__((target("avx2,fma"))) static inline void frm_stage1_p8(const float* const* src, int64_t W,
                                                                    const FrmCoef8<Q>& R, float* Z, int64_t zs,
                                                                    const char* const* next) {
  int64_t w = 0;
  for (; w + 16 <= W; w += 16) {  // one prefetch per row per 64 bytes
    if (next)
      for (int i = 0; i < 8; ++i) _mm_prefetch(next[i] + w * 4, _MM_HINT_T0);
    frm_stage1_cols8<Q>(src, w, R, Z, zs);
    frm_stage1_cols8<Q>(src, w + 8, R, Z, zs);
  }
  if (w < W) frm_stage1_cols8<Q>(src, w, R, Z, zs);
  if (next)  // the line holding each row's last element (rows need not start on a line boundary)
    for (int i = 0; i < 8; ++i) _mm_prefetch(next[i] + (W - 1) * 4, _MM_HINT_T0);
}

// |Y[a, d] / (Y[7-a, 7-d] + eps)| summed over d, from the transposed low row a and high row q + a of Z.
template <int Q, int D = 0>
__attribute__((target("avx2,fma"))) static inline __m256 frm_ratios(const FrmCoef8<Q>& R, const __m256* lo,
                                                                   const __m256* lod, const __m256* hi,
                                                                   const __m256* hid, __m256 veps, __m256 sum) {
  if constexpr (D < Q) {
    const __m256 yl = frm_dot8<D>(R.c[D], lo, lod);
    const __m256 yh = frm_dot8<7 - D>(R.c[Q + D], hi, hid);
    const __m256 r = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_div_ps(yl, _mm256_add_ps(yh, veps)));
    return frm_ratios<Q, D + 1>(R, lo, lod, hi, hid, veps, _mm256_add_ps(sum, r));
  } else {
    return sum;
  }
}

// Stage 2, eight patches at a time: an 8x8 register transpose of a Z row turns the patches into vector lanes,
// so every coefficient is a lane-wise multiply-add and so is the ratio. One low row a and its high partner
// q + a at a time.
template <int Q>
__attribute__((target("avx2,fma"))) static inline __m256 frm_group_p8(const float* Z, int64_t zs, const FrmCoef8<Q>& R,
                                                                     __m256 veps) {
  __m256 sum = _mm256_setzero_ps();
  for (int a = 0; a < Q; ++a) {
    __m256 lo[8], hi[8], v[8], lod[4], hid[4];  // lo[n], hi[n]: column n of the 8 patches' Z rows a and q + a
    for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(Z + a * zs + 8 * i);
    mmkernels::transpose8x8_ps(v, lo);
    for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(Z + (Q + a) * zs + 8 * i);
    mmkernels::transpose8x8_ps(v, hi);
    for (int i = 0; i < 4; ++i) {
      lod[i] = _mm256_sub_ps(lo[i], lo[7 - i]);
      hid[i] = _mm256_sub_ps(hi[i], hi[7 - i]);
    }
    sum = frm_ratios<Q>(R, lo, lod, hi, hid, veps, sum);
  }
  return sum;
}

__attribute__((target("avx2,fma"))) static inline __m256d frm_widen_add(__m256d acc, __m256 s) {
  return _mm256_add_pd(acc, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(s)),
                                          _mm256_cvtps_pd(_mm256_extractf128_ps(s, 1))));
}

// The |ratio| sum of one strip's npw patches. Z's rows are zs >= 8 * 8 * ceil(npw / 8) floats, zero past W, so a
// last partial group reads zeros; its padding lanes (0 / (0 + eps), NaN when eps == 0) are masked out.
template <int Q>
__attribute__((target("avx2,fma"))) static inline double frm_stage2_p8(const float* Z, int64_t zs, int64_t npw,
                                                                      const FrmCoef8<Q>& R, __m256 veps, __m256 tail) {
  const int64_t full = npw / 8 * 8;
  // float32 within a group of 8 patches x q*q terms, double across groups (the strip total)
  __m256d acc = _mm256_setzero_pd();
  for (int64_t pw = 0; pw < full; pw += 8) acc = frm_widen_add(acc, frm_group_p8<Q>(Z + pw * 8, zs, R, veps));
  if (full < npw) acc = frm_widen_add(acc, _mm256_and_ps(frm_group_p8<Q>(Z + full * 8, zs, R, veps), tail));
  alignas(32) double t[4];
  _mm256_store_pd(t, acc);
  return (t[0] + t[1]) + (t[2] + t[3]);
}

template <typename T, int Q>
__attribute__((target("avx2,fma"))) void frm_strips_p8_avx2(const FrmArgs& g, const float* R, float eps, int64_t s0,
                                                            int64_t s1, double* part) {
  const int64_t W = g.W, zs = (W + 63) / 64 * 64;
  const bool direct = std::is_same<T, float>::value && g.sw == 1;
  std::vector<float> rowbuf(direct ? 0 : 8 * W), zbuf(2 * Q * zs, 0.0f);
  const float* src[8];
  const char* next[8];
  const __m256 veps = _mm256_set1_ps(eps);
  FrmCoef8<Q> coef;
  for (int r = 0; r < 2 * Q; ++r)
    for (int i = 0; i < 8; ++i) coef.c[r][i] = _mm256_set1_ps(R[r * 8 + i]);
  alignas(32) int32_t keep[8];
  for (int l = 0; l < 8; ++l) keep[l] = l < g.npw % 8 ? -1 : 0;
  const __m256 tail = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(keep)));
  // How far ahead to prefetch: at least one strip, about 16 KB (measured at 112- and 448-pixel rows, 1 thread:
  // no prefetch 25-30% slower on inputs past the caches; 8-128 KB within noise of each other).
  const int64_t ahead = std::max<int64_t>(1, 16384 / (8 * W * static_cast<int64_t>(sizeof(float))));
  auto strip_base = [&](int64_t s) {
    const int64_t ph = s % g.nph, bc = s / g.nph, c = bc % g.C, b = bc / g.C;
    return static_cast<const T*>(g.x) + b * g.sb + c * g.sc + ph * 8 * g.sh;
  };
  for (int64_t s = s0; s < s1; ++s) {
    const T* base = strip_base(s);
    for (int64_t i = 0; i < 8; ++i) {
      const T* row = base + i * g.sh;
      if (direct) {
        src[i] = reinterpret_cast<const float*>(row);
      } else {
        float* dst = rowbuf.data() + i * W;
        for (int64_t w = 0; w < W; ++w) dst[w] = static_cast<float>(row[w * g.sw]);
        src[i] = dst;
      }
    }
    const bool fetch = direct && s + ahead < s1;
    if (fetch) {
      const T* nb = strip_base(s + ahead);
      for (int64_t i = 0; i < 8; ++i) next[i] = reinterpret_cast<const char*>(nb + i * g.sh);
    }
    frm_stage1_p8<Q>(src, W, coef, zbuf.data(), zs, fetch ? next : nullptr);
    part[s] = frm_stage2_p8<Q>(zbuf.data(), zs, g.npw, coef, veps, tail);
  }
}

// The general body (any p; float64; CPUs without AVX2), inlined into a portable and an AVX2+FMA copy (the
// extension is built without -mavx2; the wider copy is picked at run time).
template <typename T, typename A, int PP>
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
    for (int64_t pw = 0; pw < g.npw; ++pw) {
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
  frm_strips_body<T, A, PP>(g, R, eps, s0, s1, part);
}

template <typename T, typename A, int PP>
__attribute__((target("avx2,fma"))) void frm_strips_avx2(const FrmArgs& g, const A* R, A eps, int64_t s0,
                                                          int64_t s1, double* part) {
  frm_strips_body<T, A, PP>(g, R, eps, s0, s1, part);
}

bool cpu_has_avx2_fma() {  // MMKERNELS_NO_AVX2=1 forces the portable loops (tested on AVX2 machines too)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         std::getenv("MMKERNELS_NO_AVX2") == nullptr;
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
  if constexpr (std::is_same<A, float>::value) {
    if (wide && g.p == 8) {
      static constexpr Fn fast[4] = {&frm_strips_p8_avx2<T, 1>, &frm_strips_p8_avx2<T, 2>, &frm_strips_p8_avx2<T, 3>,
                                     &frm_strips_p8_avx2<T, 4>};
      fn = fast[g.q - 1];  // 1 <= q <= p / 2
    }
  }
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
