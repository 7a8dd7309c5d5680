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


#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"

namespace mmk {
namespace {

struct FrmArgs {
  const void* x;
  int64_t C, H, W, sb, sc, sh, sw;
  int64_t p, q, nph, npw;
};

// The fast path: p = 8, float32 arithmetic (float32, float16 and bfloat16 inputs), AVX2+FMA; eight patches of a
// strip at a time, everything after their one read of x in L1 (frm_strips_p8_avx2).
//
// Every coefficient of the 8-point DCT-II is +-M[m]: M[0] = sqrt(1/8) (row 0), M[m] = cos(m pi / 16) / 2 for
// m = 1..7. Row k's coefficient at column n is cos(t pi / 16) / 2 with t = (2n + 1) k, folded by the symmetries
// of cos onto [0, 8] and a sign, known at compile time. So the kernels hold the 8 magnitudes in registers and
// pick multiply-add or negated multiply-add per term, instead of one broadcast coefficient per product and row.
constexpr int frm_fold(int k, int n) {
  const int t = (2 * n + 1) * k % 32;
  return t > 16 ? 32 - t : t;
}
constexpr int frm_mag(int k, int n) { return frm_fold(k, n) > 8 ? 16 - frm_fold(k, n) : frm_fold(k, n); }
constexpr bool frm_neg(int k, int n) { return frm_fold(k, n) > 8; }

// DCT frequency of row r of R (rows 0..q-1 are D[0..q-1], rows q..2q-1 are D[7], D[6], ...).
template <int Q>
constexpr int frm_freq(int r) {
  return r < Q ? r : 7 - (r - Q);
}

template <int K, int N, int END>
__attribute__((target("avx2,fma"))) static inline __m256 frm_terms(const __m256* M, const __m256* v, __m256 acc) {
  if constexpr (N == END) {
    return acc;
  } else {
    const __m256 c = M[frm_mag(K, N)];
    acc = frm_neg(K, N) ? _mm256_fnmadd_ps(c, v[N], acc) : _mm256_fmadd_ps(c, v[N], acc);
    return frm_terms<K, N + 1, END>(M, v, acc);
  }
}

// sum_n D[k, n] v[n] over 8 vectors, using the symmetry of the DCT rows: D[0, n] is one constant (7 adds and
// one product); for odd k D[k, 7-n] = -D[k, n], so 4 products of dv[n] = v[n] - v[7-n] (precomputed by the
// caller; exact for neighbouring values within a factor 2 of each other); other even k keep the 8 products:
// the matching sums v[n] + v[7-n] are twice the size of v and their rounding, carried into the tiny
// high-frequency denominators, measurably raised the error on image-like inputs. Beyond the saved
// multiply-adds, the adds run on the FP add pipes, which the 8-product form leaves idle. The products run as
// two chains of multiply-adds (first and second half of n) added at the end: one chain of 8 was latency-bound
// (measured ~6% of the whole kernel at 448-pixel rows). The first term of each chain has a positive
// coefficient where it is a plain product (t = k < 8 at n = 0); the second chain's sign is folded in.
template <int K, int N>
__attribute__((target("avx2,fma"))) static inline __m256 frm_first(const __m256* M, const __m256* v) {
  const __m256 p = _mm256_mul_ps(M[frm_mag(K, N)], v[N]);
  return frm_neg(K, N) ? _mm256_sub_ps(_mm256_setzero_ps(), p) : p;
}

template <int K>
__attribute__((target("avx2,fma"))) static inline __m256 frm_dot8(const __m256* M, const __m256* v, const __m256* dv) {
  static_assert(K >= 0 && K < 8 && !frm_neg(K, 0), "8-point DCT row");
  if constexpr (K == 0) {
    const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])),
                                   _mm256_add_ps(_mm256_add_ps(v[4], v[5]), _mm256_add_ps(v[6], v[7])));
    return _mm256_mul_ps(M[0], s);
  } else if constexpr (K % 2 == 1) {
    return _mm256_add_ps(frm_terms<K, 1, 2>(M, dv, frm_first<K, 0>(M, dv)), frm_terms<K, 3, 4>(M, dv, frm_first<K, 2>(M, dv)));
  } else {
    return _mm256_add_ps(frm_terms<K, 1, 4>(M, v, frm_first<K, 0>(M, v)), frm_terms<K, 5, 8>(M, v, frm_first<K, 4>(M, v)));
  }
}

template <int Q, int R0 = 0>
__attribute__((target("avx2,fma"))) static inline void frm_stage1_rows(const __m256* M, const __m256* x,
                                                                      const __m256* d, float* z, int64_t zs) {
  if constexpr (R0 < 2 * Q) {
    const __m256 y = frm_dot8<frm_freq<Q>(R0)>(M, x, d);  // columns 0-3 and 4-7 go 32 floats apart (frm_group_row)
    _mm_storeu_ps(z + R0 * zs, _mm256_castps256_ps128(y));
    _mm_storeu_ps(z + R0 * zs + 32, _mm256_extractf128_ps(y, 1));
    frm_stage1_rows<Q, R0 + 1>(M, x, d, z, zs);
  }
}

// Stage 1, one patch (eight columns): sum_i D[k_r, i] x[i, n] for each row r, row i of the patch at x + i * rs;
// row r's columns 0-3 stored at z + r * zs, its columns 4-7 at z + r * zs + 32.
template <int Q>
__attribute__((target("avx2,fma"))) static inline void frm_stage1_patch(const float* x, int64_t rs, const __m256* M,
                                                                       float* z, int64_t zs) {
  __m256 v[8], d[4];
  for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(x + i * rs);
  for (int i = 0; i < 4; ++i) d[i] = _mm256_sub_ps(v[i], v[7 - i]);
  frm_stage1_rows<Q>(M, v, d, z, zs);
}

// The stage-2 sums of one transposed Z row (lanes = 8 patches): y[d] = sum_n D[k_d, n] t[n] for the q
// frequencies k_d this row pairs with (d for a low row, 7 - d for a high one).
template <int Q, bool HIGH, int D = 0>
__attribute__((target("avx2,fma"))) static inline void frm_row_sums(const __m256* M, const __m256* t,
                                                                   const __m256* td, __m256* y) {
  if constexpr (D < Q) {
    y[D] = frm_dot8<HIGH ? 7 - D : D>(M, t, td);
    frm_row_sums<Q, HIGH, D + 1>(M, t, td, y);
  }
}

// A 4x4 transpose within each 128-bit half: o[n] = (a[0][n], a[1][n], a[2][n], a[3][n]) per half.
__attribute__((target("avx2,fma"))) static inline void frm_transpose4x4_halves(const __m256* a, __m256* o) {
  const __m256 t0 = _mm256_unpacklo_ps(a[0], a[1]), t1 = _mm256_unpackhi_ps(a[0], a[1]);
  const __m256 t2 = _mm256_unpacklo_ps(a[2], a[3]), t3 = _mm256_unpackhi_ps(a[2], a[3]);
  o[0] = _mm256_shuffle_ps(t0, t2, 0x44);
  o[1] = _mm256_shuffle_ps(t0, t2, 0xEE);
  o[2] = _mm256_shuffle_ps(t1, t3, 0x44);
  o[3] = _mm256_shuffle_ps(t1, t3, 0xEE);
}

// One Z row of 8 patches, transposed so the patches are the vector lanes, then its q sums. Stage 1 stored the
// row as eight 8-float vectors: vector j < 4 holds columns 0-3 of patch j then of patch j + 4, vector 4 + j
// their columns 4-7. So two 4x4 transposes within the 128-bit halves give column n of patches 0-3 | 4-7 with
// no cross-half permute: an 8x8 transpose's vperm2f128 is 8 micro-ops on Zen 1 CPUs like the development one
// (measured ~3x the cost of a shuffle), and dropping them made the kernel ~5% faster in L2.
template <int Q, bool HIGH>
__attribute__((target("avx2,fma"))) static inline void frm_group_row(const float* z, const __m256* M, __m256* y) {
  __m256 v[8], t[8], td[4];
  for (int i = 0; i < 8; ++i) v[i] = _mm256_load_ps(z + 8 * i);
  frm_transpose4x4_halves(v, t);
  frm_transpose4x4_halves(v + 4, t + 4);
  for (int i = 0; i < 4; ++i) td[i] = _mm256_sub_ps(t[i], t[7 - i]);
  frm_row_sums<Q, HIGH>(M, t, td, y);
}

// Stage 2, eight patches at a time: a register transpose of a Z row turns the patches into vector lanes,
// so every coefficient is a lane-wise multiply-add and so is the ratio. One low row a and its high partner
// q + a at a time, each transposed and reduced to its q sums before the next (what stays live fits the 16
// vector registers).
template <int Q>
__attribute__((target("avx2,fma"))) static inline __m256 frm_group_p8(const float* Z, int64_t zs, const __m256* M,
                                                                     __m256 veps) {
  __m256 sum = _mm256_setzero_ps();
  for (int a = 0; a < Q; ++a) {
    __m256 yl[Q], yh[Q];
    frm_group_row<Q, false>(Z + a * zs, M, yl);
    frm_group_row<Q, true>(Z + (Q + a) * zs, M, yh);
    for (int d = 0; d < Q; ++d)
      sum = _mm256_add_ps(sum, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_div_ps(yl[d], _mm256_add_ps(yh[d], veps))));
  }
  return sum;
}

__attribute__((target("avx2,fma"))) static inline __m256d frm_widen_add(__m256d acc, __m256 s) {
  return _mm256_add_pd(acc, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(s)),
                                          _mm256_cvtps_pd(_mm256_extractf128_ps(s, 1))));
}

// One strip, eight patches (64 columns) at a time: stage 1 of the group into Zg (2q rows of 64 floats, 1 KB at
// q = 2), then stage 2 on it while it is in L1, so the reads of x (and the prefetches below) are spread evenly
// over the work. A strip is 8 rows read side by side, each only a few cache lines long: too short a stream for
// the hardware prefetcher, which left the kernel waiting on DRAM for most lines once x outgrew the caches. In
// cache the kernel runs at about the machine's read bandwidth, so from DRAM it only gets there if the loads
// overlap the arithmetic. Contiguous x (the strips follow each other) is prefetched in memory order kFrmAhead
// bytes ahead into L2, one line per 64 bytes read (into L1, lines that far ahead evict the current group's: a
// strip of 448-pixel rows is 14 KB). Measured at 1 thread on a Zen 4 EPYC, DRAM-sized inputs (294-616 MB, rows
// of 112-1024 pixels), % of the x.sum() read bandwidth: into L1 at 16 KB (the previous setting) 37-58%; into L2
// at 12 KB 65-82%, 16 KB 65-81%, 24 KB 73-84%; inputs that fit in the caches ran as before. Other layouts
// (rows farther apart than their width) get the same columns of the rows of the strip(s) that far ahead, into L1.
constexpr int64_t kFrmAhead = 24576;  // bytes

template <typename T, int Q>
__attribute__((target("avx2,fma"))) void frm_strips_p8_avx2(const FrmArgs& g, float eps, int64_t s0, int64_t s1,
                                                            double* part) {
  const int64_t W = g.W, npw = g.npw;
  const bool direct = std::is_same<T, float>::value && g.sw == 1;
  std::vector<float> rowbuf(direct ? 0 : 8 * W);
  alignas(32) float Zg[2 * Q * 64] = {};  // a last partial group's padding columns stay zero
  const __m256 veps = _mm256_set1_ps(eps);
  __m256 M[8];
  M[0] = _mm256_set1_ps(static_cast<float>(std::sqrt(0.125)));
  for (int m = 1; m < 8; ++m) M[m] = _mm256_set1_ps(static_cast<float>(0.5 * std::cos(std::acos(-1.0) * m / 16)));
  alignas(32) int32_t keep[8];
  for (int l = 0; l < 8; ++l) keep[l] = l < npw % 8 ? -1 : 0;
  const __m256 tail = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(keep)));
  const int64_t strip_bytes = 8 * W * static_cast<int64_t>(sizeof(float));
  const int64_t rsb = g.sh * static_cast<int64_t>(sizeof(float));  // bytes between the rows of a strip
  const bool linear = direct && g.sh == W && g.sc == g.H * W && g.sb == g.C * g.sc;
  const int64_t ahead = std::max<int64_t>(1, kFrmAhead / strip_bytes);  // strips, for the row-wise prefetch
  auto strip_base = [&](int64_t s) {
    const int64_t ph = s % g.nph, bc = s / g.nph, c = bc % g.C, b = bc / g.C;
    return static_cast<const T*>(g.x) + b * g.sb + c * g.sc + ph * 8 * g.sh;
  };
  const char* lin0 = reinterpret_cast<const char*>(strip_base(s0));
  const char* lin_end = lin0 + (s1 - s0) * strip_bytes;
  for (int64_t s = s0; s < s1; ++s) {
    const T* base = strip_base(s);
    const float* src;
    int64_t rs;
    if (direct) {
      src = reinterpret_cast<const float*>(base);
      rs = g.sh;
    } else {
      for (int64_t i = 0; i < 8; ++i) {
        const T* row = base + i * g.sh;
        float* dst = rowbuf.data() + i * W;
        for (int64_t w = 0; w < W; ++w) dst[w] = static_cast<float>(row[w * g.sw]);
      }
      src = rowbuf.data();
      rs = W;
    }
    const char* lin = linear ? lin0 + (s - s0) * strip_bytes + kFrmAhead : nullptr;
    const char* next = direct && !linear && s + ahead < s1 ? reinterpret_cast<const char*>(strip_base(s + ahead)) : nullptr;
    if (next)  // the line holding each row's last element (rows need not start on a line boundary)
      for (int i = 0; i < 8; ++i) _mm_prefetch(next + i * rsb + (W - 1) * 4, _MM_HINT_T0);
    __m256d acc = _mm256_setzero_pd();
    for (int64_t pw = 0; pw < npw; pw += 8) {
      const int64_t n = std::min<int64_t>(8, npw - pw), w0 = pw * 8;
      if (lin) {  // the 64 columns of 8 rows read below are 2 KB: 32 lines
        for (int k = 0; k < 4 * static_cast<int>(n); k += 2) {
          const char* p = lin + w0 * 32 + k * 64;
          if (p < lin_end) _mm_prefetch(p, _MM_HINT_T1);
          if (p + 64 < lin_end) _mm_prefetch(p + 64, _MM_HINT_T1);
        }
      } else if (next) {
        for (int64_t w = w0; w < w0 + 8 * n; w += 16)
          for (int i = 0; i < 8; ++i) _mm_prefetch(next + i * rsb + w * 4, _MM_HINT_T0);
      }
      for (int64_t j = 0; j < n; ++j) frm_stage1_patch<Q>(src + w0 + 8 * j, rs, M, Zg + 8 * (j % 4) + 4 * (j / 4), 64);
      // float32 within a group of 8 patches x q*q terms, double across groups (the strip total); the padding
      // lanes of a partial group (0 / (0 + eps), NaN when eps == 0) are masked out
      const __m256 r = frm_group_p8<Q>(Zg, 64, M, veps);
      acc = frm_widen_add(acc, n < 8 ? _mm256_and_ps(r, tail) : r);
    }
    alignas(32) double t[4];
    _mm256_store_pd(t, acc);
    part[s] = (t[0] + t[1]) + (t[2] + t[3]);
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
  const bool wide = isa::avx2_fma();
  Fn fn = g.p == 8 ? (wide ? &frm_strips_avx2<T, A, 8> : &frm_strips_generic<T, A, 8>)
                   : (wide ? &frm_strips_avx2<T, A, 0> : &frm_strips_generic<T, A, 0>);
  using Fast = void (*)(const FrmArgs&, float, int64_t, int64_t, double*);
  Fast fast = nullptr;
  if constexpr (std::is_same<A, float>::value) {
    static constexpr Fast p8[4] = {&frm_strips_p8_avx2<T, 1>, &frm_strips_p8_avx2<T, 2>, &frm_strips_p8_avx2<T, 3>,
                                   &frm_strips_p8_avx2<T, 4>};
    if (wide && g.p == 8) fast = p8[g.q - 1];  // 1 <= q <= p / 2
  }
  // ~32K elements per task: small inputs stay on one thread (no fork/join cost).
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.p * g.W));
  const A* Rp = R.data();
  at::parallel_for(0, strips, grain, [&](int64_t s0, int64_t s1) {
    if (fast)
      fast(g, static_cast<float>(eps_a), s0, s1, part);
    else
      fn(g, Rp, eps_a, s0, s1, part);
  });
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
