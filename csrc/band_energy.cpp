// CPU kernels of band_energy (Python: mmkernels/ops/band_energy/), registered on the dispatcher.
//
// 1-D, few bins (the plan's projection regime): the energies are squared projections of each row onto the
//   plan's weighted cos/sin basis (2K x N), four rows per pass over a basis row so each basis load feeds
//   four multiply-adds. The Parseval total is summed in double from the same loads; the last band is
//   total - sum of the others, clamped at 0.
// 1-D, many bins (the plan's FFT regime), N a power of two: a complex FFT run on 2L rows at once, the lanes of
//   every vector being rows (L real rows in the real parts, L in the imaginary parts), so no butterfly ever
//   shuffles; the two real spectra are separated from the packed one with X_a[k] = (Z[k] + conj Z[N-k])/2,
//   X_b[k] = (Z[k] - conj Z[N-k])/(2i). With AVX2 (float compute) it is a radix-4 decimation in frequency on
//   natural-order input in an interleaved buffer (a point's real and imaginary lanes share one cache line),
//   three complex multiplies per radix-4 butterfly, the last stage fused with the power spectrum (bins k and
//   N-k come from paired blocks; nothing is stored but the powers of the K bins), and the next group's rows
//   prefetched while this one computes; the portable loops (and double) are a radix-2 decimation in time.
//   Other N use ATen's rfft and the same band reduction.
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

#include "cpu_isa.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

namespace mmk {
namespace {

#define MMK_INLINE static inline __attribute__((always_inline))

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
  const void* tw;        // (N, 2) acc dtype: cos, sin of 2 pi k / N
  const int32_t* rev;    // (N,) bit reversal
  const int32_t* last_b;    // the AVX2 last stage's block pairs, by the 256-point block that completes them
  const int32_t* last_off;  // (N / 256 + 1,) offsets into last_b
  const int64_t* bin_band;
  void* out;
  void* proj;
};

constexpr int64_t kFftBlock = 256;  // points per L1 block of the AVX2 passes (16 KB)

// Writes the energies of rows row0.. of one transform from e[band * 2L + s] (s = row - row0).
template <typename A>
MMK_INLINE void finish_group(const Fft1dArgs& g, int64_t row0, const double* e, const double* sumsq) {
  const int64_t J = g.J;
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
    finish_row<A>(ej, J, sumsq[s] * static_cast<double>(g.N), static_cast<A*>(g.out) + (row0 + s) * (J + 1));
  }
}

// Projections (M, 2K) of the group's rows from the transformed buffer: bin k of the packed spectrum Z at
// re[pos(k) * ps + l], im[pos(k) * ps + l + io]; row a's X_a[k] = (Z[k] + conj Z[N-k])/2, row b's
// X_b[k] = (Z[k] - conj Z[N-k])/(2i), weighted sqrt(2) for bins that stand for their twins.
template <typename A, typename Pos>
MMK_INLINE void write_proj(const Fft1dArgs& g, int64_t row0, const A* z, int64_t ps, int64_t io, Pos pos) {
  const int64_t N = g.N, K = g.K, F = 2 * K;
  A* p = static_cast<A*>(g.proj);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t kk = k == 0 ? 0 : N - k;
    const double sw = (k == 0 || 2 * k == N) ? 1.0 : std::sqrt(2.0);
    const A *zr = z + pos(k) * ps, *zi = zr + io, *vr = z + pos(kk) * ps, *vi = vr + io;
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

// Portable loops (and double precision): a radix-2 decimation in time on bit-reversed input, lanes = rows.
template <typename T, typename A>
MMK_INLINE void fft1d_body(const Fft1dArgs& g, int64_t grp0, int64_t grp1) {
  const int64_t N = g.N, K = g.K, J = g.J;
  const A* tw = static_cast<const A*>(g.tw);
  std::vector<A> re(N * L), im(N * L), tmp(N);
  std::vector<double> e(2 * L * (J + 1));
  for (int64_t grp = grp0; grp < grp1; ++grp) {
    const int64_t row0 = grp * 2 * L;
    double sumsq[2 * L];
    // Lane l of the real parts is row row0+l, of the imaginary parts row row0+L+l, in bit-reversed order.
    for (int s = 0; s < 2 * L; ++s) {
      A* dst = s < L ? re.data() : im.data();
      const int lane = s % L;
      const int64_t row = row0 + s;
      if (row < g.M) {
        load_row<T, A>(static_cast<const T*>(g.x) + row * g.sm, N, g.sn, tmp.data(), &sumsq[s]);
        for (int64_t n = 0; n < N; ++n) dst[g.rev[n] * L + lane] = tmp[n];
      } else {
        sumsq[s] = 0.0;
        for (int64_t n = 0; n < N; ++n) dst[n * L + lane] = A(0);
      }
    }
    // Every butterfly is one vector op per component across the L lanes.
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
      const int64_t io = im.data() - re.data();
      write_proj<A>(g, row0, re.data(), L, io, [](int64_t k) { return k; });
    }
    finish_group<A>(g, row0, e.data(), sumsq);
  }
}

template <typename T, typename A>
void fft1d_generic(const Fft1dArgs& g, int64_t a, int64_t b) { fft1d_body<T, A>(g, a, b); }

// ----- AVX2, float compute -------------------------------------------------------------------------------
// A radix-4 decimation in frequency on natural-order input; the buffer is interleaved: point p of the packed
// transform is 2L floats at buf + 2L p, its real parts (rows row0..row0+7 in the lanes) then its imaginary
// parts (rows row0+8..row0+15), so a butterfly's operand is one cache line. Bin k ends at position rev[k].
// The run is store-bound (16 ymm registers hold one radix-4 butterfly, so each pass loads and stores every
// point once per two stages); the last stage is fused with the power spectrum and stores nothing.
constexpr int P = 2 * L;  // floats per point

// Software prefetch of the next group's rows, one line per butterfly, the 16 rows in turn, so that they
// stream in while this group computes (the hardware streamer stops at every 4 KB page, i.e. every row of
// 1024 floats); into L2 (T1): the transform's own lines fill L1. At 65536x1024, 1 thread, it took about a
// third off the time (prefetching every other butterfly, or with T0, did less).
struct RowPrefetch {
  const char* base = nullptr;
  int64_t stride = 0;  // bytes between rows
  int64_t lines = 0;   // 16 x lines per row; 0: nothing to prefetch
};

// Two radix-2 DIF stages (spans 2h and h) over the blocks of 4h points in [lo, hi), as one radix-4 step: with
// a, b, c, d the points j, j+h, j+2h, j+3h of a block and w = W^j (W = e^{-2 pi i s/N}, s = N/(4h)) the
// outputs at j, j+h, j+2h, j+3h are (a+c)+(b+d), ((a+c)-(b+d)) w^2, ((a-c)-i(b-d)) w, ((a-c)+i(b-d)) w^3:
// the values, and places, of the two radix-2 stages for three complex multiplies instead of four.
// tw holds (cos, sin) of 2 pi k / N, k < N; multiplying by w is multiplying by conj(cos, sin).
__attribute__((target("avx2,fma"))) static void radix4_pass_avx2(float* __restrict buf, const float* __restrict tw,
                                                                int64_t lo, int64_t hi, int64_t h, int64_t N,
                                                                const RowPrefetch& pf, int64_t& it_ref) {
  const int64_t s = N / (4 * h), q = h * P;
  int64_t it = it_ref;
  const char* const pbase = pf.base;
  const int64_t pstride = pf.stride, plines = pf.lines;
  for (int64_t start = lo; start < hi; start += 4 * h) {
    const float *t1 = tw, *t2 = tw, *t3 = tw;
    float* p = buf + start * P;
    for (int64_t j = 0; j < h; ++j, p += P, t1 += 2 * s, t2 += 4 * s, t3 += 6 * s, ++it) {
      if (it < plines) _mm_prefetch(pbase + (it % (2 * L)) * pstride + (it / (2 * L)) * 64, _MM_HINT_T1);
      // Real parts, then imaginary parts, each output stored once known: few live registers, no spills.
      const __m256 ar = _mm256_load_ps(p), cr = _mm256_load_ps(p + 2 * q);
      const __m256 s1r = _mm256_add_ps(ar, cr), d1r = _mm256_sub_ps(ar, cr);
      const __m256 br = _mm256_load_ps(p + q), dr = _mm256_load_ps(p + 3 * q);
      const __m256 s2r = _mm256_add_ps(br, dr), d2r = _mm256_sub_ps(br, dr);
      _mm256_store_ps(p, _mm256_add_ps(s1r, s2r));
      const __m256 y2r = _mm256_sub_ps(s1r, s2r);
      const __m256 ai = _mm256_load_ps(p + L), ci = _mm256_load_ps(p + 2 * q + L);
      const __m256 s1i = _mm256_add_ps(ai, ci), d1i = _mm256_sub_ps(ai, ci);
      const __m256 bi = _mm256_load_ps(p + q + L), di = _mm256_load_ps(p + 3 * q + L);
      const __m256 s2i = _mm256_add_ps(bi, di), d2i = _mm256_sub_ps(bi, di);
      _mm256_store_ps(p + L, _mm256_add_ps(s1i, s2i));
      const __m256 y2i = _mm256_sub_ps(s1i, s2i);
      {
        const __m256 wr = _mm256_broadcast_ss(t2), wi = _mm256_broadcast_ss(t2 + 1);
        _mm256_store_ps(p + q, _mm256_fmadd_ps(wr, y2r, _mm256_mul_ps(wi, y2i)));
        _mm256_store_ps(p + q + L, _mm256_fmsub_ps(wr, y2i, _mm256_mul_ps(wi, y2r)));
      }
      {
        const __m256 yr = _mm256_add_ps(d1r, d2i), yi = _mm256_sub_ps(d1i, d2r);  // (a-c) - i(b-d)
        const __m256 wr = _mm256_broadcast_ss(t1), wi = _mm256_broadcast_ss(t1 + 1);
        _mm256_store_ps(p + 2 * q, _mm256_fmadd_ps(wr, yr, _mm256_mul_ps(wi, yi)));
        _mm256_store_ps(p + 2 * q + L, _mm256_fmsub_ps(wr, yi, _mm256_mul_ps(wi, yr)));
      }
      {
        const __m256 yr = _mm256_sub_ps(d1r, d2i), yi = _mm256_add_ps(d1i, d2r);  // (a-c) + i(b-d)
        const __m256 wr = _mm256_broadcast_ss(t3), wi = _mm256_broadcast_ss(t3 + 1);
        _mm256_store_ps(p + 3 * q, _mm256_fmadd_ps(wr, yr, _mm256_mul_ps(wi, yi)));
        _mm256_store_ps(p + 3 * q + L, _mm256_fmsub_ps(wr, yi, _mm256_mul_ps(wi, yr)));
      }
    }
  }
  it_ref = it;
}

// 16 contiguous float32 rows into the lanes of buf (natural order). Each 8-row x 4-sample block is one 4x4
// in-lane transpose of vectors whose halves come from rows r and r+4 (a 128-bit load and an insert each, no
// cross-lane permutes). The rows' sums of squares from the transposed columns (lanes = rows), fp32 over 32
// values per lane, then double.
__attribute__((target("avx2,fma"))) static void gather16_f32_avx2(const float* x, int64_t sm, int64_t N,
                                                                 float* __restrict buf, double* sumsq) {
  for (int half = 0; half < 2; ++half) {
    const float* xh = x + half * L * sm;
    float* dst = buf + half * L;
    __m256d s_lo = _mm256_setzero_pd(), s_hi = _mm256_setzero_pd();
    for (int64_t b0 = 0; b0 < N; b0 += 32) {
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      const int64_t b1 = std::min<int64_t>(N, b0 + 32);
      for (int64_t n0 = b0; n0 < b1; n0 += 4) {
        __m256 v[4];  // (row r, samples n0..n0+3 | row r+4, the same samples)
        for (int r = 0; r < 4; ++r)
          v[r] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(xh + r * sm + n0)),
                                      _mm_loadu_ps(xh + (r + 4) * sm + n0), 1);
        const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
        const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
        const __m256 c0 = _mm256_shuffle_ps(t0, t2, 0x44), c1 = _mm256_shuffle_ps(t0, t2, 0xEE);
        const __m256 c2 = _mm256_shuffle_ps(t1, t3, 0x44), c3 = _mm256_shuffle_ps(t1, t3, 0xEE);
        acc0 = _mm256_fmadd_ps(c0, c0, acc0);
        acc1 = _mm256_fmadd_ps(c1, c1, acc1);
        acc0 = _mm256_fmadd_ps(c2, c2, acc0);
        acc1 = _mm256_fmadd_ps(c3, c3, acc1);
        _mm256_store_ps(dst + n0 * P, c0);  // c: the 8 rows at sample n0 + c
        _mm256_store_ps(dst + (n0 + 1) * P, c1);
        _mm256_store_ps(dst + (n0 + 2) * P, c2);
        _mm256_store_ps(dst + (n0 + 3) * P, c3);
      }
      const __m256 a = _mm256_add_ps(acc0, acc1);
      s_lo = _mm256_add_pd(s_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(a)));
      s_hi = _mm256_add_pd(s_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
    }
    _mm256_storeu_pd(sumsq + half * L, s_lo);
    _mm256_storeu_pd(sumsq + half * L + 4, s_hi);
  }
}

// The last stage -- the radix-4 step with unit twiddles (log2 N even) or one radix-2 stage (odd) -- fused
// with the power spectrum. The last-stage block of R points at position rev[b] (b < Q = N/R) holds bins
// b + Q t, t = 0..R-1 (DFT index t at slot rev_R(t)); bin N-k, which separates the two rows packed in bin k,
// is in the partner block Q - b (itself for b = 0 and b = Q/2), so blocks are taken in pairs and only the
// powers pw[2L k + lane] of bins k < K are written: |Z[k] + conj Z[N-k]|^2 / 4 for the rows of the real
// parts, |Z[k] - conj Z[N-k]|^2 / 4 for the others, doubled for bins that stand for their twins. With keep
// the outputs are also written back in place (the projections are read from them).
template <int R>
__attribute__((target("avx2,fma"))) MMK_INLINE void last_block_avx2(const float* p, __m256 zr[R], __m256 zi[R]) {
  if constexpr (R == 4) {
    const __m256 ar = _mm256_load_ps(p), ai = _mm256_load_ps(p + L);
    const __m256 br = _mm256_load_ps(p + P), bi = _mm256_load_ps(p + P + L);
    const __m256 cr = _mm256_load_ps(p + 2 * P), ci = _mm256_load_ps(p + 2 * P + L);
    const __m256 dr = _mm256_load_ps(p + 3 * P), di = _mm256_load_ps(p + 3 * P + L);
    const __m256 s1r = _mm256_add_ps(ar, cr), s1i = _mm256_add_ps(ai, ci);
    const __m256 s2r = _mm256_add_ps(br, dr), s2i = _mm256_add_ps(bi, di);
    const __m256 d1r = _mm256_sub_ps(ar, cr), d1i = _mm256_sub_ps(ai, ci);
    const __m256 d2r = _mm256_sub_ps(br, dr), d2i = _mm256_sub_ps(bi, di);
    zr[0] = _mm256_add_ps(s1r, s2r), zi[0] = _mm256_add_ps(s1i, s2i);
    zr[1] = _mm256_add_ps(d1r, d2i), zi[1] = _mm256_sub_ps(d1i, d2r);
    zr[2] = _mm256_sub_ps(s1r, s2r), zi[2] = _mm256_sub_ps(s1i, s2i);
    zr[3] = _mm256_sub_ps(d1r, d2i), zi[3] = _mm256_add_ps(d1i, d2r);
  } else {
    const __m256 ar = _mm256_load_ps(p), ai = _mm256_load_ps(p + L);
    const __m256 br = _mm256_load_ps(p + P), bi = _mm256_load_ps(p + P + L);
    zr[0] = _mm256_add_ps(ar, br), zi[0] = _mm256_add_ps(ai, bi);
    zr[1] = _mm256_sub_ps(ar, br), zi[1] = _mm256_sub_ps(ai, bi);
  }
}

template <int R>
constexpr int last_slot(int t) { return R == 4 ? ((t & 1) << 1) | (t >> 1) : t; }

template <int R>
__attribute__((target("avx2,fma"))) MMK_INLINE void last_store_avx2(float* p, const __m256 zr[R], const __m256 zi[R]) {
  for (int t = 0; t < R; ++t) {
    _mm256_store_ps(p + last_slot<R>(t) * P, zr[t]);
    _mm256_store_ps(p + last_slot<R>(t) * P + L, zi[t]);
  }
}

__attribute__((target("avx2,fma"))) MMK_INLINE void bin_power_avx2(float* pw, int64_t k, int64_t N, __m256 zr,
                                                                  __m256 zi, __m256 vr, __m256 vi) {
  const __m256 wk = _mm256_set1_ps((k == 0 || 2 * k == N) ? 0.25f : 0.5f);
  const __m256 sr = _mm256_add_ps(zr, vr), di = _mm256_sub_ps(zi, vi);
  const __m256 si = _mm256_add_ps(zi, vi), dr = _mm256_sub_ps(zr, vr);
  _mm256_store_ps(pw + k * P, _mm256_mul_ps(wk, _mm256_fmadd_ps(sr, sr, _mm256_mul_ps(di, di))));
  _mm256_store_ps(pw + k * P + L, _mm256_mul_ps(wk, _mm256_fmadd_ps(si, si, _mm256_mul_ps(dr, dr))));
}

template <int R>
__attribute__((target("avx2,fma"))) static void last_stage_power_avx2(float* __restrict buf, int64_t N, int64_t K,
                                                                     const int32_t* __restrict rev,
                                                                     const int32_t* bs, int64_t nbs,
                                                                     float* __restrict pw, bool keep) {
  const int64_t Q = N / R;
  for (int64_t i = 0; i < nbs; ++i) {
    const int64_t b = bs[i];
    if (b == 0 || 2 * b == Q) {  // the self-partnered blocks
      float* pb = buf + static_cast<int64_t>(rev[b]) * P;
      __m256 zr[R], zi[R];
      last_block_avx2<R>(pb, zr, zi);
      for (int t = 0; t < R; ++t) {
        const int u = b == 0 ? (R - t) % R : R - 1 - t;
        if (b + Q * t < K) bin_power_avx2(pw, b + Q * t, N, zr[t], zi[t], zr[u], zi[u]);
      }
      if (keep) last_store_avx2<R>(pb, zr, zi);
      continue;
    }
    const int64_t c = Q - b;
    if (!keep && b >= K && c >= K) continue;
    float* pb = buf + static_cast<int64_t>(rev[b]) * P;
    float* pc = buf + static_cast<int64_t>(rev[c]) * P;
    __m256 zr[R], zi[R], vr[R], vi[R];
    last_block_avx2<R>(pb, zr, zi);
    last_block_avx2<R>(pc, vr, vi);
    if (K <= Q && !keep) {  // bins below Q only: t = 0 and its partner t = R-1
      if (b < K) bin_power_avx2(pw, b, N, zr[0], zi[0], vr[R - 1], vi[R - 1]);
      if (c < K) bin_power_avx2(pw, c, N, vr[0], vi[0], zr[R - 1], zi[R - 1]);
      continue;
    }
    for (int t = 0; t < R; ++t) {
      if (b + Q * t < K) bin_power_avx2(pw, b + Q * t, N, zr[t], zi[t], vr[R - 1 - t], vi[R - 1 - t]);
      if (c + Q * t < K) bin_power_avx2(pw, c + Q * t, N, vr[t], vi[t], zr[R - 1 - t], zi[R - 1 - t]);
    }
    if (keep) {
      last_store_avx2<R>(pb, zr, zi);
      last_store_avx2<R>(pc, vr, vi);
    }
  }
}

// d[0..8) += pa, d[8..16) += pb, in double.
__attribute__((target("avx2,fma"))) MMK_INLINE void add_run16_avx2(double* d, __m256 pa, __m256 pb) {
  _mm256_storeu_pd(d, _mm256_add_pd(_mm256_loadu_pd(d), _mm256_cvtps_pd(_mm256_castps256_ps128(pa))));
  _mm256_storeu_pd(d + 4, _mm256_add_pd(_mm256_loadu_pd(d + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(pa, 1))));
  _mm256_storeu_pd(d + 8, _mm256_add_pd(_mm256_loadu_pd(d + 8), _mm256_cvtps_pd(_mm256_castps256_ps128(pb))));
  _mm256_storeu_pd(d + 12, _mm256_add_pd(_mm256_loadu_pd(d + 12), _mm256_cvtps_pd(_mm256_extractf128_ps(pb, 1))));
}

// e[band * 2L + s] += the group's powers over each band's bins: fp32 within runs of at most 32 bins, then double.
__attribute__((target("avx2,fma"))) static void band_sums_avx2(const float* __restrict pw, int64_t K,
                                                              const int64_t* __restrict bin_band,
                                                              double* __restrict e) {
  __m256 pa = _mm256_setzero_ps(), pb = _mm256_setzero_ps();
  int64_t cur = K ? bin_band[0] : 0, run = 0;
  for (int64_t k = 0; k < K; ++k) {
    if (bin_band[k] != cur || run == 32) {
      add_run16_avx2(e + cur * P, pa, pb);
      pa = pb = _mm256_setzero_ps();
      run = 0;
      cur = bin_band[k];
    }
    pa = _mm256_add_ps(pa, _mm256_load_ps(pw + k * P));
    pb = _mm256_add_ps(pb, _mm256_load_ps(pw + k * P + L));
    ++run;
  }
  if (K) add_run16_avx2(e + cur * P, pa, pb);
}

// All stages of one transform: radix-4 passes whose blocks exceed kFftBlock points (16 KB) over the whole
// buffer, the others block by block in L1, each block followed by the last stage of the block pairs it
// completes (last_b[last_off[i] .. last_off[i+1]) for block i), so that stage too reads L1.
__attribute__((target("avx2,fma"))) static void fft_group_avx2(float* __restrict buf, const Fft1dArgs& g,
                                                              float* __restrict pw, bool keep, const RowPrefetch& pf) {
  const int64_t N = g.N;
  const float* tw = static_cast<const float*>(g.tw);
  const int64_t hmin = (g.logn & 1) ? 2 : 4;  // the last radix-4 pass before the last stage
  const int64_t blk = std::min<int64_t>(N, kFftBlock);
  auto last = [&](int64_t i0, int64_t i1) {
    const int32_t* bs = g.last_b + g.last_off[i0];
    const int64_t n = g.last_off[i1] - g.last_off[i0];
    if (g.logn & 1)
      last_stage_power_avx2<2>(buf, N, g.K, g.rev, bs, n, pw, keep);
    else
      last_stage_power_avx2<4>(buf, N, g.K, g.rev, bs, n, pw, keep);
  };
  int64_t h = N / 4, it = 0;
  for (; h >= hmin && 4 * h > blk; h /= 4) radix4_pass_avx2(buf, tw, 0, N, h, N, pf, it);
  if (h < hmin) {
    last(0, N / blk);
    return;
  }
  for (int64_t b0 = 0; b0 < N; b0 += blk) {
    for (int64_t hh = h; hh >= hmin; hh /= 4) radix4_pass_avx2(buf, tw, b0, b0 + blk, hh, N, pf, it);
    last(b0 / blk, b0 / blk + 1);
  }
}

template <typename T>
__attribute__((target("avx2,fma"))) void fft1d_f32_avx2(const Fft1dArgs& g, int64_t grp0, int64_t grp1) {
  const int64_t N = g.N, K = g.K, J = g.J;
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  // 64-byte aligned: a point of the transform is one cache line (sizes are multiples of 64 bytes).
  std::unique_ptr<float, Free> buf_own(static_cast<float*>(std::aligned_alloc(64, N * P * sizeof(float))));
  std::unique_ptr<float, Free> pw_own(
      static_cast<float*>(std::aligned_alloc(64, std::max<int64_t>(K, 1) * P * sizeof(float))));
  TORCH_CHECK(buf_own && pw_own, "band_energy_1d: out of memory for the transform's scratch");
  float* buf = buf_own.get();
  float* pw = pw_own.get();
  std::vector<float> tmp(N);
  std::vector<double> e(2 * L * (J + 1));
  const int64_t row_bytes = N * static_cast<int64_t>(sizeof(T));
  for (int64_t grp = grp0; grp < grp1; ++grp) {
    const int64_t row0 = grp * 2 * L;
    double sumsq[2 * L];
    if (std::is_same<T, float>::value && g.sn == 1 && row0 + 2 * L <= g.M) {
      gather16_f32_avx2(reinterpret_cast<const float*>(static_cast<const T*>(g.x) + row0 * g.sm), g.sm, N, buf, sumsq);
    } else {
      for (int s = 0; s < 2 * L; ++s) {  // lane slot s: row row0 + s
        const int64_t row = row0 + s;
        if (row < g.M) {
          load_row<T, float>(static_cast<const T*>(g.x) + row * g.sm, N, g.sn, tmp.data(), &sumsq[s]);
          for (int64_t n = 0; n < N; ++n) buf[n * P + s] = tmp[n];
        } else {
          sumsq[s] = 0.0;
          for (int64_t n = 0; n < N; ++n) buf[n * P + s] = 0.0f;
        }
      }
    }
    RowPrefetch pf;
    if (g.sn == 1 && row0 + 4 * L <= g.M) {
      pf.base = reinterpret_cast<const char*>(static_cast<const T*>(g.x) + (row0 + 2 * L) * g.sm);
      pf.stride = g.sm * static_cast<int64_t>(sizeof(T));
      pf.lines = 2 * L * ((row_bytes + 63) / 64);
    }
    fft_group_avx2(buf, g, pw, g.proj != nullptr, pf);
    std::fill(e.begin(), e.end(), 0.0);
    band_sums_avx2(pw, K, g.bin_band, e.data());
    if (g.proj) write_proj<float>(g, row0, buf, P, L, [&](int64_t k) { return static_cast<int64_t>(g.rev[k]); });
    finish_group<float>(g, row0, e.data(), sumsq);
  }
}

template <typename T, typename A>
__attribute__((target("avx2,fma"))) void fft1d_avx2(const Fft1dArgs& g, int64_t a, int64_t b) {
  if constexpr (std::is_same<A, float>::value)
    fft1d_f32_avx2<T>(g, a, b);
  else
    fft1d_body<T, A>(g, a, b);
}

// Twiddles (cos, sin of 2 pi k / N, k < N) and the bit reversal of length N, built once per (N, dtype): their
// 2N sines and cosines cost about as much as the transform of a few dozen rows.
template <typename A>
struct FftTables {
  int64_t logn = 0;
  std::vector<A> tw;
  std::vector<int32_t> rev, last_b, last_off;
};

template <typename A>
std::shared_ptr<const FftTables<A>> fft_tables(int64_t N) {
  static std::mutex mu;
  static std::map<int64_t, std::shared_ptr<const FftTables<A>>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto hit = cache.find(N);
  if (hit != cache.end()) return hit->second;
  auto t = std::make_shared<FftTables<A>>();
  while ((int64_t(1) << t->logn) < N) ++t->logn;
  t->tw.resize(2 * N);
  for (int64_t k = 0; k < N; ++k) {
    const double ang = 2.0 * std::acos(-1.0) * static_cast<double>(k) / static_cast<double>(N);
    t->tw[2 * k] = static_cast<A>(std::cos(ang));
    t->tw[2 * k + 1] = static_cast<A>(std::sin(ang));
  }
  t->rev.resize(N);
  for (int64_t n = 0; n < N; ++n) {
    int64_t r = 0;
    for (int64_t b = 0; b < t->logn; ++b) r |= ((n >> b) & 1) << (t->logn - 1 - b);
    t->rev[n] = static_cast<int32_t>(r);
  }
  // The AVX2 last stage's pairs (b, Q - b), b <= Q/2, Q = N / R: the block at position rev[b] holds bins
  // b + Q t; a pair is done after the later of its two 256-point blocks.
  const int64_t R = (t->logn & 1) ? 2 : 4, Q = N / R, blk = std::min<int64_t>(N, kFftBlock), nb = N / blk;
  std::vector<std::vector<int32_t>> by_block(nb);
  for (int64_t b = 0; b <= Q / 2; ++b) {
    const int64_t c = b == 0 ? 0 : Q - b;
    by_block[std::max(t->rev[b], t->rev[c]) / blk].push_back(static_cast<int32_t>(b));
  }
  t->last_off.push_back(0);
  for (const auto& v : by_block) {
    t->last_b.insert(t->last_b.end(), v.begin(), v.end());
    t->last_off.push_back(static_cast<int32_t>(t->last_b.size()));
  }
  if (cache.size() >= 16) cache.clear();  // a handful of row lengths in practice
  cache.emplace(N, t);
  return t;
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
  const bool wide = isa::avx2_fma();
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
      const auto t = fft_tables<A>(N);
      Fft1dArgs g{x.const_data_ptr(), M, N, x.stride(0), x.stride(1), K, J, t->logn, t->tw.data(), t->rev.data(),
                  t->last_b.data(), t->last_off.data(), bb, out.data_ptr(), save_proj ? proj.data_ptr() : nullptr};
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
      if (isa::avx2_fma()) fn = &proj2d_tiled_avx2<scalar_t>;
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
