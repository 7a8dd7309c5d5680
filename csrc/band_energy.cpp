// CPU kernels of band_energy (Python: mmkernels/ops/band_energy/), registered on the dispatcher.
//
// 1-D, few bins (the plan's projection regime): the energies are squared projections of each row onto the
//   plan's weighted cos/sin basis (2K x N), four rows per pass over a basis row so each basis load feeds
//   four multiply-adds. The Parseval total is summed in double from the same loads; the last band is
//   total - sum of the others, clamped at 0.
// 1-D, many bins (the plan's FFT regime), N a power of two: a complex FFT run on 2L rows at once, the lanes of
//   every vector being rows (L real rows in the real parts, L in the imaginary parts), so no butterfly ever
//   shuffles; the two real spectra are separated from the packed one with X_a[k] = (Z[k] + conj Z[N-k])/2,
//   X_b[k] = (Z[k] - conj Z[N-k])/(2i). With AVX2 it is a radix-4 decimation in frequency (natural-order input:
//   the gather writes whole cache lines in sequence; each pass loads and stores the data once per two stages)
//   and the band sums read bin k at its bit-reversed position; the portable loops are a radix-2 decimation in
//   time. Other N use ATen's rfft and the same band reduction.
// 2-D: separable projection per image, stage 1 onto the v-basis (2V x W) along W, stage 2 onto the u-basis
//   (2U x H) along H. With AVX2 (fp32 compute) both stages are register-tiled GEMMs on the image read in
//   place; the portable loops hold the image transposed in L1.
// Every path can write the projections the backward reuses ((M, 2K) or (M, 2, U, V), as the reference
// lays them out). Work is split over rows/images with at::parallel_for; each row's sums are computed by
// one thread in a fixed order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <tuple>
#include <type_traits>
#include <vector>

namespace mmk {
namespace {

#define MMK_INLINE static inline __attribute__((always_inline))

bool cpu_has_avx2_fma() {
  // MMKERNELS_NO_AVX2=1 forces the portable loops (tests compare both).
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         std::getenv("MMKERNELS_NO_AVX2") == nullptr;
  return ok;
}

// Last band = S * sum(x^2) - sum of the others, clamped at 0 (rounding on a (nearly) empty band; NaN passes).
template <typename A>
MMK_INLINE void finish_row(double* e, int64_t J, double total, A* out) {
  double others = 0.0;
  for (int64_t j = 0; j < J; ++j) {
    others += e[j];
    out[j] = static_cast<A>(e[j]);
  }
  double last = total - others;
  if (last < 0.0) last = 0.0;
  out[J] = static_cast<A>(last);
}

template <typename T, typename A>
MMK_INLINE void load_row(const T* x, int64_t n, int64_t sn, A* dst, double* sumsq) {
  double s = 0.0;
  if (sn == 1) {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) {
      const A v = static_cast<A>(x[i]);
      dst[i] = v;
      s += static_cast<double>(v) * static_cast<double>(v);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const A v = static_cast<A>(x[i * sn]);
      dst[i] = v;
      s += static_cast<double>(v) * static_cast<double>(v);
    }
  }
  *sumsq = s;
}

// ---------------------------------------------------------------------------------------------------------
// 1-D projection
// ---------------------------------------------------------------------------------------------------------
struct Proj1dArgs {
  const void* x;
  int64_t M, N, sm, sn, K, J;
  const void* basis;  // (2K, N) acc dtype
  const int64_t* bin_band;  // (K,)
  void* out;   // (M, J+1)
  void* proj;  // (M, 2K) or null
};

template <typename T, typename A>
MMK_INLINE void proj1d_body(const Proj1dArgs& g, int64_t r0, int64_t r1) {
  // RB rows at once, transposed so that the rows are the vector lanes: each basis value is broadcast
  // against RB rows, four basis rows in flight (independent accumulator chains), no horizontal sums.
  constexpr int RB = 8;
  const int64_t N = g.N, K = g.K, F = 2 * K, J = g.J;
  const A* B = static_cast<const A*>(g.basis);
  std::vector<A> xt(N * RB), row(N);
  std::vector<double> e(RB * (J + 1));
  for (int64_t r = r0; r < r1; r += RB) {
    const int rb = static_cast<int>(std::min<int64_t>(RB, r1 - r));
    double sumsq[RB];
    for (int i = 0; i < RB; ++i) {
      if (i < rb) {
        load_row<T, A>(static_cast<const T*>(g.x) + (r + i) * g.sm, N, g.sn, row.data(), &sumsq[i]);
        for (int64_t n = 0; n < N; ++n) xt[n * RB + i] = row[n];
      } else {
        sumsq[i] = 0.0;
        for (int64_t n = 0; n < N; ++n) xt[n * RB + i] = A(0);
      }
    }
    std::fill(e.begin(), e.end(), 0.0);
    const A* X = xt.data();
    for (int64_t f = 0; f < F; f += 4) {
      const int fb = static_cast<int>(std::min<int64_t>(4, F - f));
      const A* b0 = B + f * N;
      const A* b1 = B + std::min<int64_t>(f + 1, F - 1) * N;
      const A* b2 = B + std::min<int64_t>(f + 2, F - 1) * N;
      const A* b3 = B + std::min<int64_t>(f + 3, F - 1) * N;
      A a0[RB] = {}, a1[RB] = {}, a2[RB] = {}, a3[RB] = {};
      for (int64_t n = 0; n < N; ++n) {
        const A* xn = X + n * RB;
        const A c0 = b0[n], c1 = b1[n], c2 = b2[n], c3 = b3[n];
#pragma omp simd
        for (int i = 0; i < RB; ++i) {
          a0[i] += c0 * xn[i];
          a1[i] += c1 * xn[i];
          a2[i] += c2 * xn[i];
          a3[i] += c3 * xn[i];
        }
      }
      const A* acc[4] = {a0, a1, a2, a3};
      for (int q = 0; q < fb; ++q) {
        const int64_t ff = f + q;
        const int64_t band = g.bin_band[ff < K ? ff : ff - K];
        for (int i = 0; i < rb; ++i) {
          const A v = acc[q][i];
          e[i * (J + 1) + band] += static_cast<double>(v) * static_cast<double>(v);
          if (g.proj) static_cast<A*>(g.proj)[(r + i) * F + ff] = v;
        }
      }
    }
    for (int i = 0; i < rb; ++i)
      finish_row<A>(e.data() + i * (J + 1), J, sumsq[i] * static_cast<double>(N), static_cast<A*>(g.out) + (r + i) * (J + 1));
  }
}

template <typename T, typename A>
void proj1d_generic(const Proj1dArgs& g, int64_t r0, int64_t r1) { proj1d_body<T, A>(g, r0, r1); }
template <typename T, typename A>
__attribute__((target("avx2,fma"))) void proj1d_avx2(const Proj1dArgs& g, int64_t r0, int64_t r1) {
  proj1d_body<T, A>(g, r0, r1);
}

// ---------------------------------------------------------------------------------------------------------
// 1-D FFT (N a power of two), 2L rows per transform
// ---------------------------------------------------------------------------------------------------------
constexpr int L = 8;

struct Fft1dArgs {
  const void* x;
  int64_t M, N, sm, sn, K, J, logn;
  const void* tw;        // (N/2, 2) acc dtype: cos, sin of 2 pi k / N
  const int32_t* rev;    // (N,) bit reversal
  const int64_t* bin_band;
  void* out;
  void* proj;
};

// Decimation in frequency: natural-order input (the gather stores whole cache lines in sequence), output
// bin k at position rev[k]. Two radix-2 stages (spans 2h and h) in one pass over blocks of 4h points, so every
// point is loaded and stored once per two stages (radix-2 passes are store-bound). With w = (cos, sin) of
// 2 pi k / N every twiddle multiplies by conj(w); the first stage's twiddle for the upper half of the span is
// conj(w) times -i, a swap.
__attribute__((target("avx2,fma"))) MMK_INLINE void cmul_conj_avx2(__m256 wr, __m256 wi, __m256& xr, __m256& xi) {
  const __m256 r = _mm256_fmadd_ps(wr, xr, _mm256_mul_ps(wi, xi));
  xi = _mm256_fmsub_ps(wr, xi, _mm256_mul_ps(wi, xr));
  xr = r;
}

__attribute__((target("avx2,fma"))) static inline void radix4_dif_avx2(float* __restrict re, float* __restrict im,
                                                                    const float* __restrict tw, int64_t lo,
                                                                    int64_t hi, int64_t h, int64_t N) {
  const int64_t s = N / (4 * h), q = h * L;
  for (int64_t start = lo; start < hi; start += 4 * h) {
    float* ar = re + start * L;
    float* ai = im + start * L;
    for (int64_t j = 0; j < h; ++j) {
      const __m256 w1r = _mm256_set1_ps(tw[2 * (j * s)]), w1i = _mm256_set1_ps(tw[2 * (j * s) + 1]);
      const __m256 w2r = _mm256_set1_ps(tw[2 * (2 * j * s)]), w2i = _mm256_set1_ps(tw[2 * (2 * j * s) + 1]);
      float* pr = ar + j * L;
      float* pi = ai + j * L;
      const __m256 xar = _mm256_loadu_ps(pr), xai = _mm256_loadu_ps(pi);
      const __m256 xbr = _mm256_loadu_ps(pr + q), xbi = _mm256_loadu_ps(pi + q);
      const __m256 xcr = _mm256_loadu_ps(pr + 2 * q), xci = _mm256_loadu_ps(pi + 2 * q);
      const __m256 xdr = _mm256_loadu_ps(pr + 3 * q), xdi = _mm256_loadu_ps(pi + 3 * q);
      // span 2h: (a, c) and (b, d); the difference of (b, d) also takes the -i
      const __m256 ar1 = _mm256_add_ps(xar, xcr), ai1 = _mm256_add_ps(xai, xci);
      const __m256 br1 = _mm256_add_ps(xbr, xdr), bi1 = _mm256_add_ps(xbi, xdi);
      __m256 cr1 = _mm256_sub_ps(xar, xcr), ci1 = _mm256_sub_ps(xai, xci);
      __m256 dr1 = _mm256_sub_ps(xbi, xdi), di1 = _mm256_sub_ps(xdr, xbr);  // (b - d) * -i
      cmul_conj_avx2(w1r, w1i, cr1, ci1);
      cmul_conj_avx2(w1r, w1i, dr1, di1);
      // span h: (a, b) and (c, d), twiddle w2
      __m256 br2 = _mm256_sub_ps(ar1, br1), bi2 = _mm256_sub_ps(ai1, bi1);
      __m256 dr2 = _mm256_sub_ps(cr1, dr1), di2 = _mm256_sub_ps(ci1, di1);
      cmul_conj_avx2(w2r, w2i, br2, bi2);
      cmul_conj_avx2(w2r, w2i, dr2, di2);
      _mm256_storeu_ps(pr, _mm256_add_ps(ar1, br1));
      _mm256_storeu_ps(pi, _mm256_add_ps(ai1, bi1));
      _mm256_storeu_ps(pr + q, br2);
      _mm256_storeu_ps(pi + q, bi2);
      _mm256_storeu_ps(pr + 2 * q, _mm256_add_ps(cr1, dr1));
      _mm256_storeu_ps(pi + 2 * q, _mm256_add_ps(ci1, di1));
      _mm256_storeu_ps(pr + 3 * q, dr2);
      _mm256_storeu_ps(pi + 3 * q, di2);
    }
  }
}

// Last radix-2 stage (span 1, twiddle 1) when log2(N) is odd.
__attribute__((target("avx2,fma"))) static inline void radix2_last_avx2(float* __restrict re, float* __restrict im,
                                                                     int64_t lo, int64_t hi) {
  for (int64_t p = lo * L; p < hi * L; p += 2 * L) {
    const __m256 xr = _mm256_loadu_ps(re + p), xi = _mm256_loadu_ps(im + p);
    const __m256 yr = _mm256_loadu_ps(re + p + L), yi = _mm256_loadu_ps(im + p + L);
    _mm256_storeu_ps(re + p, _mm256_add_ps(xr, yr));
    _mm256_storeu_ps(im + p, _mm256_add_ps(xi, yi));
    _mm256_storeu_ps(re + p + L, _mm256_sub_ps(xr, yr));
    _mm256_storeu_ps(im + p + L, _mm256_sub_ps(xi, yi));
  }
}

// The span-(2, 1) pass: every twiddle is 1.
__attribute__((target("avx2,fma"))) static inline void radix4_dif_unit_avx2(float* __restrict re,
                                                                         float* __restrict im, int64_t lo,
                                                                         int64_t hi) {
  for (int64_t p = lo * L; p < hi * L; p += 4 * L) {
    const __m256 xar = _mm256_loadu_ps(re + p), xai = _mm256_loadu_ps(im + p);
    const __m256 xbr = _mm256_loadu_ps(re + p + L), xbi = _mm256_loadu_ps(im + p + L);
    const __m256 xcr = _mm256_loadu_ps(re + p + 2 * L), xci = _mm256_loadu_ps(im + p + 2 * L);
    const __m256 xdr = _mm256_loadu_ps(re + p + 3 * L), xdi = _mm256_loadu_ps(im + p + 3 * L);
    const __m256 ar1 = _mm256_add_ps(xar, xcr), ai1 = _mm256_add_ps(xai, xci);
    const __m256 br1 = _mm256_add_ps(xbr, xdr), bi1 = _mm256_add_ps(xbi, xdi);
    const __m256 cr1 = _mm256_sub_ps(xar, xcr), ci1 = _mm256_sub_ps(xai, xci);
    const __m256 dr1 = _mm256_sub_ps(xbi, xdi), di1 = _mm256_sub_ps(xdr, xbr);
    _mm256_storeu_ps(re + p, _mm256_add_ps(ar1, br1));
    _mm256_storeu_ps(im + p, _mm256_add_ps(ai1, bi1));
    _mm256_storeu_ps(re + p + L, _mm256_sub_ps(ar1, br1));
    _mm256_storeu_ps(im + p + L, _mm256_sub_ps(ai1, bi1));
    _mm256_storeu_ps(re + p + 2 * L, _mm256_add_ps(cr1, dr1));
    _mm256_storeu_ps(im + p + 2 * L, _mm256_add_ps(ci1, di1));
    _mm256_storeu_ps(re + p + 3 * L, _mm256_sub_ps(cr1, dr1));
    _mm256_storeu_ps(im + p + 3 * L, _mm256_sub_ps(ci1, di1));
  }
}

// All stages: radix-4 passes whose span crosses a 256-point block (16 KB of data) over the whole transform,
// then the rest block by block in L1, a radix-2 stage last if log2(N) is odd.
__attribute__((target("avx2,fma"))) void fft_passes_avx2(float* __restrict re, float* __restrict im,
                                                       const float* __restrict tw, int64_t N, int64_t logn) {
  const int64_t blk = std::min<int64_t>(N, 256);
  int64_t h = N / 4;
  for (; h >= 1 && 4 * h > blk; h /= 4) radix4_dif_avx2(re, im, tw, 0, N, h, N);
  for (int64_t b0 = 0; b0 < N; b0 += blk) {
    for (int64_t hh = h; hh > 1; hh /= 4) radix4_dif_avx2(re, im, tw, b0, b0 + blk, hh, N);
    if (logn & 1)
      radix2_last_avx2(re, im, b0, b0 + blk);
    else
      radix4_dif_unit_avx2(re, im, b0, b0 + blk);
  }
}

// 8 contiguous float32 rows into the lanes of dst (natural order) through 8x8 register
// transposes; the rows' sums of squares from the transposed columns (lanes = rows), fp32 over 32 values
// per lane, then double.
__attribute__((target("avx2,fma"))) void gather8_avx2(const float* x, int64_t sm, int64_t N, float* __restrict dst,
                                                    double* sumsq) {
  __m256d s_lo = _mm256_setzero_pd(), s_hi = _mm256_setzero_pd();
  for (int64_t b0 = 0; b0 < N; b0 += 32) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const int64_t b1 = std::min<int64_t>(N, b0 + 32);
    for (int64_t n0 = b0; n0 < b1; n0 += 8) {
      __m256 v[8];
      for (int r = 0; r < 8; ++r) v[r] = _mm256_loadu_ps(x + r * sm + n0);
      __m256 col[8];  // column c of the 8x8 block = the 8 rows' values at n0 + c
      mmkernels::transpose8x8_ps(v, col);
      for (int c = 0; c < 8; c += 2) {
        acc0 = _mm256_fmadd_ps(col[c], col[c], acc0);
        acc1 = _mm256_fmadd_ps(col[c + 1], col[c + 1], acc1);
        _mm256_storeu_ps(dst + (n0 + c) * L, col[c]);
        _mm256_storeu_ps(dst + (n0 + c + 1) * L, col[c + 1]);
      }
    }
    const __m256 a = _mm256_add_ps(acc0, acc1);
    s_lo = _mm256_add_pd(s_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(a)));
    s_hi = _mm256_add_pd(s_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
  }
  _mm256_storeu_pd(sumsq, s_lo);
  _mm256_storeu_pd(sumsq + 4, s_hi);
}

// e[0..L) += pa, e[L..2L) += pb, in double.
__attribute__((target("avx2,fma"))) static inline void add_band_avx2(double* e, __m256 pa, __m256 pb) {
  _mm256_storeu_pd(e, _mm256_add_pd(_mm256_loadu_pd(e), _mm256_cvtps_pd(_mm256_castps256_ps128(pa))));
  _mm256_storeu_pd(e + 4, _mm256_add_pd(_mm256_loadu_pd(e + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(pa, 1))));
  _mm256_storeu_pd(e + L, _mm256_add_pd(_mm256_loadu_pd(e + L), _mm256_cvtps_pd(_mm256_castps256_ps128(pb))));
  _mm256_storeu_pd(e + L + 4,
                   _mm256_add_pd(_mm256_loadu_pd(e + L + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(pb, 1))));
}

// Band sums of the 2L rows of one transform, e[band * 2L + s], from the packed spectrum Z: row a's power
// |X_a[k]|^2 = |Z[k] + conj Z[N-k]|^2 / 4 and row b's |Z[k] - conj Z[N-k]|^2 / 4, weighted 2 for bins that
// stand for their conjugate twins; bin k is at position rev[k]. fp32 within runs of at most 32 bins of one band, then double.
__attribute__((target("avx2,fma"))) void band_sums_avx2(const float* __restrict re, const float* __restrict im,
                                                      int64_t N, int64_t K, const int64_t* __restrict bin_band,
                                                      const int32_t* __restrict rev, double* __restrict e) {
  __m256 pa = _mm256_setzero_ps(), pb = _mm256_setzero_ps();
  int64_t cur = K ? bin_band[0] : 0, run = 0;
  for (int64_t k = 0; k < K; ++k) {
    if (bin_band[k] != cur || run == 32) {
      add_band_avx2(e + cur * 2 * L, pa, pb);
      pa = pb = _mm256_setzero_ps();
      run = 0;
      cur = bin_band[k];
    }
    const int64_t kk = k == 0 ? 0 : N - k;
    const __m256 wk = _mm256_set1_ps((k == 0 || 2 * k == N) ? 0.25f : 0.5f);
    const int64_t pk = rev[k] * L, pkk = rev[kk] * L;
    const __m256 zr = _mm256_loadu_ps(re + pk), zi = _mm256_loadu_ps(im + pk);
    const __m256 vr = _mm256_loadu_ps(re + pkk), vi = _mm256_loadu_ps(im + pkk);
    const __m256 sr = _mm256_add_ps(zr, vr), di = _mm256_sub_ps(zi, vi);
    const __m256 si = _mm256_add_ps(zi, vi), dr = _mm256_sub_ps(zr, vr);
    pa = _mm256_fmadd_ps(wk, _mm256_fmadd_ps(sr, sr, _mm256_mul_ps(di, di)), pa);
    pb = _mm256_fmadd_ps(wk, _mm256_fmadd_ps(si, si, _mm256_mul_ps(dr, dr)), pb);
    ++run;
  }
  if (K) add_band_avx2(e + cur * 2 * L, pa, pb);
}

template <typename T, typename A, bool Wide>
MMK_INLINE void fft1d_body(const Fft1dArgs& g, int64_t grp0, int64_t grp1) {
  const int64_t N = g.N, K = g.K, J = g.J, F = 2 * K;
  const A* tw = static_cast<const A*>(g.tw);
  std::vector<A> re(N * L), im(N * L), tmp(N);
  std::vector<double> e(2 * L * (J + 1));
  constexpr bool dif = Wide && std::is_same<A, float>::value;
  // Position of bin k in the transformed buffers.
  auto pos = [&](int64_t k) { return dif ? static_cast<int64_t>(g.rev[k]) : k; };
  for (int64_t grp = grp0; grp < grp1; ++grp) {
    const int64_t row0 = grp * 2 * L;
    double sumsq[2 * L];
    // Gather: lane l of the real parts is row row0+l, of the imaginary parts row row0+L+l; bit-reversed for
    // the portable radix-2 DIT, natural order for the AVX2 DIF (which leaves bin k at position rev[k]).
    const bool fast_gather = Wide && std::is_same<T, float>::value && g.sn == 1 && row0 + 2 * L <= g.M;
    if (fast_gather) {
      const float* xr = reinterpret_cast<const float*>(static_cast<const T*>(g.x) + row0 * g.sm);
      gather8_avx2(xr, g.sm, N, reinterpret_cast<float*>(re.data()), sumsq);
      gather8_avx2(xr + L * g.sm, g.sm, N, reinterpret_cast<float*>(im.data()), sumsq + L);
    } else
    for (int s = 0; s < 2 * L; ++s) {
      A* dst = s < L ? re.data() : im.data();
      const int lane = s % L;
      const int64_t row = row0 + s;
      if (row < g.M) {
        load_row<T, A>(static_cast<const T*>(g.x) + row * g.sm, N, g.sn, tmp.data(), &sumsq[s]);
        for (int64_t n = 0; n < N; ++n) dst[(dif ? n : g.rev[n]) * L + lane] = tmp[n];
      } else {
        sumsq[s] = 0.0;
        for (int64_t n = 0; n < N; ++n) dst[n * L + lane] = A(0);
      }
    }
    // Every butterfly is one vector op per component across the L lanes.
    if (dif) {
      fft_passes_avx2(reinterpret_cast<float*>(re.data()), reinterpret_cast<float*>(im.data()),
                      reinterpret_cast<const float*>(tw), N, g.logn);
    } else
    for (int64_t half = 1, step = N / 2; half < N; half *= 2, step /= 2) {
      for (int64_t start = 0; start < N; start += 2 * half) {
        for (int64_t j = 0; j < half; ++j) {
          const A wr = tw[2 * (j * step)], wi = -tw[2 * (j * step) + 1];
          A* ar = re.data() + (start + j) * L;
          A* ai = im.data() + (start + j) * L;
          A* br = ar + half * L;
          A* bi = ai + half * L;
#pragma omp simd
          for (int l = 0; l < L; ++l) {
            const A tr = wr * br[l] - wi * bi[l];
            const A ti = wr * bi[l] + wi * br[l];
            br[l] = ar[l] - tr;
            bi[l] = ai[l] - ti;
            ar[l] += tr;
            ai[l] += ti;
          }
        }
      }
    }
    // e[band * 2L + s]: band sums of row row0 + s, lanes vectorised (the proj copy is a separate loop).
    std::fill(e.begin(), e.end(), 0.0);
    if (dif) {
      band_sums_avx2(reinterpret_cast<const float*>(re.data()), reinterpret_cast<const float*>(im.data()), N, K,
                     g.bin_band, g.rev, e.data());
    } else
    for (int64_t k = 0; k < K; ++k) {
      const int64_t kk = k == 0 ? 0 : N - k;
      const double wk = (k == 0 || 2 * k == N) ? 1.0 : 2.0;
      double* ek = e.data() + g.bin_band[k] * 2 * L;
      const A *zr = re.data() + k * L, *zi = im.data() + k * L, *vr = re.data() + kk * L, *vi = im.data() + kk * L;
#pragma omp simd
      for (int l = 0; l < L; ++l) {
        // 2 X_a = (zr+vr, zi-vi), 2 X_b = (zi+vi, -(zr-vr))
        const double sr = static_cast<double>(zr[l]) + vr[l], di = static_cast<double>(zi[l]) - vi[l];
        const double si = static_cast<double>(zi[l]) + vi[l], dr = static_cast<double>(zr[l]) - vr[l];
        ek[l] += 0.25 * wk * (sr * sr + di * di);
        ek[L + l] += 0.25 * wk * (si * si + dr * dr);
      }
    }
    if (g.proj) {
      A* p = static_cast<A*>(g.proj);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t kk = k == 0 ? 0 : N - k;
        const double sw = (k == 0 || 2 * k == N) ? 1.0 : std::sqrt(2.0);
        const int64_t pk = pos(k) * L, pkk = pos(kk) * L;
        const A *zr = re.data() + pk, *zi = im.data() + pk, *vr = re.data() + pkk, *vi = im.data() + pkk;
        for (int l = 0; l < L; ++l) {
          const double ar = 0.5 * (static_cast<double>(zr[l]) + vr[l]), ai = 0.5 * (static_cast<double>(zi[l]) - vi[l]);
          const double br = 0.5 * (static_cast<double>(zi[l]) + vi[l]), bi = -0.5 * (static_cast<double>(zr[l]) - vr[l]);
          if (row0 + l < g.M) {
            p[(row0 + l) * F + k] = static_cast<A>(sw * ar);
            p[(row0 + l) * F + K + k] = static_cast<A>(-sw * ai);
          }
          if (row0 + L + l < g.M) {
            p[(row0 + L + l) * F + k] = static_cast<A>(sw * br);
            p[(row0 + L + l) * F + K + k] = static_cast<A>(-sw * bi);
          }
        }
      }
    }
    for (int s = 0; s < 2 * L; ++s) {
      if (row0 + s >= g.M) break;
      double es[64];
      double* ej = J + 1 <= 64 ? es : nullptr;
      std::vector<double> big;
      if (!ej) {
        big.resize(J + 1);
        ej = big.data();
      }
      for (int64_t j = 0; j < J; ++j) ej[j] = e[j * 2 * L + s];
      finish_row<A>(ej, J, sumsq[s] * static_cast<double>(N), static_cast<A*>(g.out) + (row0 + s) * (J + 1));
    }
  }
}

template <typename T, typename A>
void fft1d_generic(const Fft1dArgs& g, int64_t a, int64_t b) { fft1d_body<T, A, false>(g, a, b); }
template <typename T, typename A>
__attribute__((target("avx2,fma"))) void fft1d_avx2(const Fft1dArgs& g, int64_t a, int64_t b) {
  fft1d_body<T, A, true>(g, a, b);
}

// Band reduction of ATen's rfft (N not a power of two, many bins).
template <typename A>
void rfft_bands(const at::Tensor& xc, int64_t K, int64_t J, const int64_t* bin_band, A* out, A* proj) {
  const int64_t M = xc.size(0), N = xc.size(1), F = 2 * K;
  auto spec = at::fft_rfft(xc, c10::nullopt, -1, c10::nullopt).contiguous();
  const auto sumsq = xc.square().sum(-1, false, at::kDouble).contiguous();
  const A* s = reinterpret_cast<const A*>(spec.const_data_ptr());
  const double* ss = sumsq.const_data_ptr<double>();
  const int64_t nb = N / 2 + 1;
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    std::vector<double> e(J + 1);
    for (int64_t r = r0; r < r1; ++r) {
      std::fill(e.begin(), e.end(), 0.0);
      for (int64_t k = 0; k < K; ++k) {
        const A re = s[2 * (r * nb + k)], imv = s[2 * (r * nb + k) + 1];
        const double wk = (k == 0 || 2 * k == N) ? 1.0 : 2.0;
        e[bin_band[k]] += wk * (static_cast<double>(re) * re + static_cast<double>(imv) * imv);
        if (proj) {
          const double sw = std::sqrt(wk);
          proj[r * F + k] = static_cast<A>(sw * re);
          proj[r * F + K + k] = static_cast<A>(-sw * imv);
        }
      }
      finish_row<A>(e.data(), J, ss[r] * static_cast<double>(N), out + r * (J + 1));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> band_energy_1d_cpu(const at::Tensor& x, const at::Tensor& basis,
                                                      const at::Tensor& bin_band, int64_t num_cut, bool use_fft,
                                                      bool save_proj) {
  TORCH_CHECK(x.dim() == 2, "band_energy_1d: x must be (M, N), got ", x.sizes());
  const auto st = x.scalar_type();
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t M = x.size(0), N = x.size(1), K = bin_band.numel(), J = num_cut;
  TORCH_CHECK(bin_band.scalar_type() == at::kLong && bin_band.is_contiguous(), "band_energy_1d: bin_band must be int64");
  TORCH_CHECK(use_fft || (basis.scalar_type() == acc && basis.is_contiguous() && basis.dim() == 2 &&
                          basis.size(0) == 2 * K && basis.size(1) == N),
              "band_energy_1d: basis must be a contiguous (2K, N) tensor of the compute dtype");
  auto opts = x.options().dtype(acc);
  auto out = at::empty({M, J + 1}, opts);
  auto proj = save_proj ? at::empty({M, 2 * K}, opts) : at::empty({0}, opts);
  if (M == 0) return {out, proj};
  const int64_t* bb = bin_band.const_data_ptr<int64_t>();
  const bool wide = cpu_has_avx2_fma();
  const bool pow2 = N >= 2 * L && (N & (N - 1)) == 0;
  if (use_fft && !pow2) {
    AT_DISPATCH_FLOATING_TYPES(acc, "band_energy_1d_rfft", [&] {
      rfft_bands<scalar_t>(x.to(acc), K, J, bb, out.data_ptr<scalar_t>(),
                           save_proj ? proj.data_ptr<scalar_t>() : nullptr);
    });
    return {out, proj};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "band_energy_1d", [&] {
    using A = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    if (use_fft) {
      int64_t logn = 0;
      while ((int64_t(1) << logn) < N) ++logn;
      std::vector<A> tw(N);
      for (int64_t k = 0; k < N / 2; ++k) {
        const double ang = 2.0 * std::acos(-1.0) * static_cast<double>(k) / static_cast<double>(N);
        tw[2 * k] = static_cast<A>(std::cos(ang));
        tw[2 * k + 1] = static_cast<A>(std::sin(ang));
      }
      std::vector<int32_t> rev(N);
      for (int64_t n = 0; n < N; ++n) {
        int64_t r = 0;
        for (int64_t b = 0; b < logn; ++b) r |= ((n >> b) & 1) << (logn - 1 - b);
        rev[n] = static_cast<int32_t>(r);
      }
      Fft1dArgs g{x.const_data_ptr(), M, N, x.stride(0), x.stride(1), K, J, logn, tw.data(), rev.data(), bb,
                  out.data_ptr(), save_proj ? proj.data_ptr() : nullptr};
      auto fn = wide ? &fft1d_avx2<scalar_t, A> : &fft1d_generic<scalar_t, A>;
      const int64_t groups = (M + 2 * L - 1) / (2 * L);
      at::parallel_for(0, groups, 1, [&](int64_t a, int64_t b) { fn(g, a, b); });
    } else {
      Proj1dArgs g{x.const_data_ptr(), M, N, x.stride(0), x.stride(1), K, J, basis.const_data_ptr(), bb,
                   out.data_ptr(), save_proj ? proj.data_ptr() : nullptr};
      auto fn = wide ? &proj1d_avx2<scalar_t, A> : &proj1d_generic<scalar_t, A>;
      // Rows per task from the work per row (2K dot products of length N): small inputs stay on one thread.
      const int64_t work = std::max<int64_t>(1, 2 * K * N);
      const int64_t grain = std::max<int64_t>(8, ((int64_t(1) << 18) / work + 7) / 8 * 8);
      at::parallel_for(0, M, grain, [&](int64_t a, int64_t b) { fn(g, a, b); });
    }
  });
  return {out, proj};
}

// ---------------------------------------------------------------------------------------------------------
// 2-D separable projection
// ---------------------------------------------------------------------------------------------------------
struct Proj2dArgs {
  const void* x;
  int64_t M, H, W, sm, sh, sw, U, V, J;
  const void* csv;  // (2V, W) acc
  const void* csu;  // (2U, H) acc
  const int64_t* band;  // (U*V,), -1 = last band
  void* out;   // (M, J+1)
  void* proj;  // (M, 2, U, V) or null
};

template <typename T, typename A>
MMK_INLINE void proj2d_body(const Proj2dArgs& g, int64_t m0, int64_t m1) {
  const int64_t H = g.H, W = g.W, U = g.U, V = g.V, J = g.J, C2 = 2 * V, R2 = 2 * U;
  const A* csv = static_cast<const A*>(g.csv);
  const A* csu = static_cast<const A*>(g.csu);
  std::vector<A> xt(W * H), yt(C2 * H), row(W), z(R2 * C2);
  std::vector<double> e(J + 1);
  for (int64_t m = m0; m < m1; ++m) {
    const T* xm = static_cast<const T*>(g.x) + m * g.sm;
    double sumsq = 0.0;
    for (int64_t h = 0; h < H; ++h) {
      double s;
      load_row<T, A>(xm + h * g.sh, W, g.sw, row.data(), &s);
      sumsq += s;
      for (int64_t w = 0; w < W; ++w) xt[w * H + h] = row[w];
    }
    // Stage 1 along W: yt[c, h] = sum_w csv[c, w] x[h, w]
    for (int64_t c = 0; c < C2; ++c) {
      A* y = yt.data() + c * H;
      const A* b = csv + c * W;
      {
        const A b0 = b[0];
        const A* x0 = xt.data();
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) y[h] = b0 * x0[h];
      }
      for (int64_t w = 1; w < W; ++w) {
        const A bw = b[w];
        const A* xw = xt.data() + w * H;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) y[h] += bw * xw[h];
      }
    }
    // Stage 2 along H: z[r, c] = sum_h csu[r, h] yt[c, h]
    for (int64_t r = 0; r < R2; ++r) {
      const A* a = csu + r * H;
      for (int64_t c = 0; c < C2; ++c) {
        const A* y = yt.data() + c * H;
        A acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t h = 0; h < H; ++h) acc += a[h] * y[h];
        z[r * C2 + c] = acc;
      }
    }
    std::fill(e.begin(), e.end(), 0.0);
    A* p = g.proj ? static_cast<A*>(g.proj) + m * 2 * U * V : nullptr;
    for (int64_t u = 0; u < U; ++u) {
      for (int64_t v = 0; v < V; ++v) {
        // Re = Cu Yc - Su Ys, Im' = Su Yc + Cu Ys (Im' = -Im X; only |X|^2 matters)
        const A re = z[u * C2 + v] - z[(U + u) * C2 + V + v];
        const A im = z[(U + u) * C2 + v] + z[u * C2 + V + v];
        const int64_t band = g.band[u * V + v];
        if (band >= 0) e[band] += static_cast<double>(re) * re + static_cast<double>(im) * im;
        if (p) {
          p[u * V + v] = re;
          p[U * V + u * V + v] = im;
        }
      }
    }
    finish_row<A>(e.data(), J, sumsq * static_cast<double>(H * W), static_cast<A*>(g.out) + m * (J + 1));
  }
}

template <typename T, typename A>
void proj2d_generic(const Proj2dArgs& g, int64_t a, int64_t b) { proj2d_body<T, A>(g, a, b); }

// 2-D, float compute with AVX2: both stages as register-tiled GEMMs C = A B (A row-major, B's rows padded
// to a multiple of 8 columns): a tile of MR rows of A times 8*NV columns of B lives in MR*NV accumulators,
// each B row load feeds MR multiply-adds and each broadcast of A feeds NV. Stage 1 is image (H x W) times
// csv^T (W x 2V), stage 2 csu (2U x H) times that (H x 2V); the tables and the stage-1 result stay in L1.
template <int MR, int NV>
__attribute__((target("avx2,fma"))) MMK_INLINE void gemm_tile_avx2(const float* __restrict a, int64_t lda,
                                                                  const float* __restrict b, int64_t ldb,
                                                                  int64_t K, float* __restrict c, int64_t ldc) {
  __m256 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = _mm256_loadu_ps(b + k * ldb + 8 * j);
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i * lda + k);
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) _mm256_storeu_ps(c + i * ldc + 8 * j, acc[i][j]);
}

template <int NV>
__attribute__((target("avx2,fma"))) MMK_INLINE void gemm_rows_avx2(const float* a, int64_t lda, const float* b,
                                                                  int64_t ldb, int64_t M, int64_t K, float* c,
                                                                  int64_t ldc) {
  constexpr int MR = 6;  // 6 x 2 accumulators + 2 B rows + 1 broadcast: 15 of the 16 ymm registers
  int64_t i = 0;
  for (; i + MR <= M; i += MR) gemm_tile_avx2<MR, NV>(a + i * lda, lda, b, ldb, K, c + i * ldc, ldc);
  switch (M - i) {
    case 5: gemm_tile_avx2<5, NV>(a + i * lda, lda, b, ldb, K, c + i * ldc, ldc); break;
    case 4: gemm_tile_avx2<4, NV>(a + i * lda, lda, b, ldb, K, c + i * ldc, ldc); break;
    case 3: gemm_tile_avx2<3, NV>(a + i * lda, lda, b, ldb, K, c + i * ldc, ldc); break;
    case 2: gemm_tile_avx2<2, NV>(a + i * lda, lda, b, ldb, K, c + i * ldc, ldc); break;
    case 1: gemm_tile_avx2<1, NV>(a + i * lda, lda, b, ldb, K, c + i * ldc, ldc); break;
    default: break;
  }
}

// C (M x Np) = A (M x K) B (K x Np), Np a multiple of 8.
__attribute__((target("avx2,fma"))) void gemm_avx2(const float* a, int64_t lda, const float* b, int64_t ldb,
                                                 int64_t M, int64_t K, int64_t Np, float* c, int64_t ldc) {
  int64_t n = 0;
  for (; n + 16 <= Np; n += 16) gemm_rows_avx2<2>(a, lda, b + n, ldb, M, K, c + n, ldc);
  if (n < Np) gemm_rows_avx2<1>(a, lda, b + n, ldb, M, K, c + n, ldc);
}

// Sum of squares of an H x W float block (row stride ld): fp32 partial sums over at most 64 values per row
// chunk (8 per lane), accumulated in double.
__attribute__((target("avx2,fma"))) double sumsq_rows_avx2(const float* x, int64_t ld, int64_t H, int64_t W) {
  alignas(32) static const int32_t ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  const __m256i tail = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ones + 8 - (W % 8)));
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  for (int64_t h = 0; h < H; ++h) {
    const float* r = x + h * ld;
    for (int64_t w0 = 0; w0 < W; w0 += 64) {
      const int64_t w1 = std::min<int64_t>(W, w0 + 64);
      __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
      int64_t w = w0;
      for (; w + 16 <= w1; w += 16) {
        const __m256 v0 = _mm256_loadu_ps(r + w), v1 = _mm256_loadu_ps(r + w + 8);
        a = _mm256_fmadd_ps(v0, v0, a);
        b = _mm256_fmadd_ps(v1, v1, b);
      }
      if (w + 8 <= w1) {
        const __m256 v = _mm256_loadu_ps(r + w);
        a = _mm256_fmadd_ps(v, v, a);
        w += 8;
      }
      if (w < w1) {
        const __m256 v = _mm256_maskload_ps(r + w, tail);
        b = _mm256_fmadd_ps(v, v, b);
      }
      a = _mm256_add_ps(a, b);
      s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(a)));
      s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
    }
  }
  alignas(32) double t[4];
  _mm256_store_pd(t, _mm256_add_pd(s0, s1));
  return (t[0] + t[1]) + (t[2] + t[3]);
}

template <typename T>
__attribute__((target("avx2,fma"))) void proj2d_tiled_avx2(const Proj2dArgs& g, int64_t m0, int64_t m1) {
  const int64_t H = g.H, W = g.W, U = g.U, V = g.V, J = g.J, C2 = 2 * V, R2 = 2 * U;
  const int64_t Cp = (C2 + 7) / 8 * 8;  // padded row length of csv^T and of the stage results
  const float* csv = static_cast<const float*>(g.csv);
  const float* csu = static_cast<const float*>(g.csu);
  // Images of float32 with unit column stride are read in place; others are converted into one buffer first.
  const bool direct = std::is_same<T, float>::value && g.sw == 1;
  std::vector<float> bt(W * Cp, 0.0f), y(H * Cp), z(R2 * Cp), xb(direct ? 0 : H * W);
  for (int64_t c = 0; c < C2; ++c)
    for (int64_t w = 0; w < W; ++w) bt[w * Cp + c] = csv[c * W + w];
  std::vector<double> e(J + 1);
  for (int64_t m = m0; m < m1; ++m) {
    const T* xm = static_cast<const T*>(g.x) + m * g.sm;
    const float* img;
    int64_t ld;
    if (direct) {
      img = reinterpret_cast<const float*>(xm);
      ld = g.sh;
    } else {
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) xb[h * W + w] = static_cast<float>(xm[h * g.sh + w * g.sw]);
      img = xb.data();
      ld = W;
    }
    const double sumsq = sumsq_rows_avx2(img, ld, H, W);
    gemm_avx2(img, ld, bt.data(), Cp, H, W, Cp, y.data(), Cp);  // stage 1: y (H x 2V)
    gemm_avx2(csu, H, y.data(), Cp, R2, H, Cp, z.data(), Cp);   // stage 2: z (2U x 2V)
    std::fill(e.begin(), e.end(), 0.0);
    float* p = g.proj ? static_cast<float*>(g.proj) + m * 2 * U * V : nullptr;
    for (int64_t u = 0; u < U; ++u) {
      const float *zc = z.data() + u * Cp, *zs = z.data() + (U + u) * Cp;
      for (int64_t v = 0; v < V; ++v) {
        // Re = Cu Yc - Su Ys, Im' = Su Yc + Cu Ys (Im' = -Im X; only |X|^2 matters)
        const float re = zc[v] - zs[V + v];
        const float im = zs[v] + zc[V + v];
        const int64_t band = g.band[u * V + v];
        if (band >= 0) e[band] += static_cast<double>(re) * re + static_cast<double>(im) * im;
        if (p) {
          p[u * V + v] = re;
          p[U * V + u * V + v] = im;
        }
      }
    }
    finish_row<float>(e.data(), J, sumsq * static_cast<double>(H * W), static_cast<float*>(g.out) + m * (J + 1));
  }
}

std::tuple<at::Tensor, at::Tensor> band_energy_2d_cpu(const at::Tensor& x, const at::Tensor& csv, const at::Tensor& csu,
                                                      const at::Tensor& band, int64_t num_cut, bool save_proj) {
  TORCH_CHECK(x.dim() == 3, "band_energy_2d: x must be (M, H, W), got ", x.sizes());
  const auto st = x.scalar_type();
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t M = x.size(0), H = x.size(1), W = x.size(2);
  TORCH_CHECK(csv.dim() == 2 && csu.dim() == 2 && csv.size(1) == W && csu.size(1) == H && csv.size(0) % 2 == 0 &&
                  csu.size(0) % 2 == 0 && csv.scalar_type() == acc && csu.scalar_type() == acc &&
                  csv.is_contiguous() && csu.is_contiguous(),
              "band_energy_2d: csv (2V, W) and csu (2U, H) must be contiguous tensors of the compute dtype");
  const int64_t V = csv.size(0) / 2, U = csu.size(0) / 2;
  TORCH_CHECK(band.scalar_type() == at::kLong && band.is_contiguous() && band.numel() == U * V,
              "band_energy_2d: band must be an int64 (U*V,) tensor");
  auto opts = x.options().dtype(acc);
  auto out = at::empty({M, num_cut + 1}, opts);
  auto proj = save_proj ? at::empty({M, 2, U, V}, opts) : at::empty({0}, opts);
  if (M == 0) return {out, proj};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "band_energy_2d", [&] {
    using A = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    Proj2dArgs g{x.const_data_ptr(), M, H, W, x.stride(0), x.stride(1), x.stride(2), U, V, num_cut,
                 csv.const_data_ptr(), csu.const_data_ptr(), band.const_data_ptr<int64_t>(), out.data_ptr(),
                 save_proj ? proj.data_ptr() : nullptr};
    auto fn = &proj2d_generic<scalar_t, A>;
    if constexpr (std::is_same<A, float>::value) {
      if (cpu_has_avx2_fma()) fn = &proj2d_tiled_avx2<scalar_t>;
    }
    const int64_t work = std::max<int64_t>(1, H * W * (2 * V + 1));
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / work);
    at::parallel_for(0, M, grain, [&](int64_t a, int64_t b) { fn(g, a, b); });
  });
  return {out, proj};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmkernels_C, m) {
  // (energies (M, J+1), projections (M, 2K) or empty) of the rows of x (M, N): bins 0..K-1 with band ids
  // bin_band, basis (2K, N) = sqrt(w_k)[cos; sin] (read only when use_fft is false).
  m.def("band_energy_1d(Tensor x, Tensor basis, Tensor bin_band, int num_cut, bool use_fft, bool save_proj) -> "
        "(Tensor, Tensor)");
  // (energies (M, J+1), projections (M, 2, U, V) or empty) of the images of x (M, H, W): csv (2V, W) the
  // weighted [cos; sin] v-basis, csu (2U, H) the [cos; sin] u-basis, band (U*V,) ids (-1 = last band).
  m.def("band_energy_2d(Tensor x, Tensor csv, Tensor csu, Tensor band, int num_cut, bool save_proj) -> "
        "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmkernels_C, CPU, m) {
  m.impl("band_energy_1d", &band_energy_1d_cpu);
  m.impl("band_energy_2d", &band_energy_2d_cpu);
}

}  // namespace mmk
