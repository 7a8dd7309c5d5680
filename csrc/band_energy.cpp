// CPU kernels of band_energy (Python: mmkernels/ops/band_energy/), registered on the dispatcher.
//
// 1-D, few bins (the plan's projection regime): the energies are squared projections of each row onto the
//   plan's weighted cos/sin basis (2K x N), four rows per pass over a basis row so each basis load feeds
//   four multiply-adds. The Parseval total is summed in double from the same loads; the last band is
//   total - sum of the others, clamped at 0.
// 1-D, many bins (the plan's FFT regime), N a power of two: a radix-2 FFT run on 2L rows at once, the lanes
//   of every vector being rows (L real rows in the real parts, L in the imaginary parts), so no butterfly
//   ever shuffles; the two real spectra are separated from the packed one with X_a[k] = (Z[k] + conj Z[N-k])/2,
//   X_b[k] = (Z[k] - conj Z[N-k])/(2i). Other N use ATen's rfft and the same band reduction.
// 2-D: separable projection per image, stage 1 onto the v-basis (2V x W) along W, stage 2 onto the u-basis
//   (2U x H) along H, on the image held in L1 (transposed once while it is converted to the compute type).
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
#include <tuple>
#include <type_traits>
#include <vector>

namespace mmk {
namespace {

#define MMK_INLINE static inline __attribute__((always_inline))

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
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

__attribute__((target("avx2,fma"))) static inline void butterflies_avx2(float* __restrict re, float* __restrict im,
                                                                     const float* __restrict tw, int64_t lo,
                                                                     int64_t hi, int64_t half, int64_t step) {
  for (int64_t start = lo; start < hi; start += 2 * half) {
    float* ar = re + start * L;
    float* ai = im + start * L;
    for (int64_t j = 0; j < half; ++j) {
      const __m256 wr = _mm256_set1_ps(tw[2 * (j * step)]), wi = _mm256_set1_ps(tw[2 * (j * step) + 1]);
      float* pr = ar + j * L;
      float* pi = ai + j * L;
      const __m256 xr = _mm256_loadu_ps(pr), xi = _mm256_loadu_ps(pi);
      const __m256 yr = _mm256_loadu_ps(pr + half * L), yi = _mm256_loadu_ps(pi + half * L);
      // t = conj(w) * y with w = (cos, sin): (wr yr + wi yi, wr yi - wi yr)
      const __m256 tr = _mm256_fmadd_ps(wr, yr, _mm256_mul_ps(wi, yi));
      const __m256 ti = _mm256_fmsub_ps(wr, yi, _mm256_mul_ps(wi, yr));
      _mm256_storeu_ps(pr, _mm256_add_ps(xr, tr));
      _mm256_storeu_ps(pi, _mm256_add_ps(xi, ti));
      _mm256_storeu_ps(pr + half * L, _mm256_sub_ps(xr, tr));
      _mm256_storeu_ps(pi + half * L, _mm256_sub_ps(xi, ti));
    }
  }
}

// All stages; the early ones (butterfly span within a 256-point block, 16 KB of data) block by block so
// they run in L1, then the remaining stages over the whole transform.
__attribute__((target("avx2,fma"))) void fft_passes_avx2(float* __restrict re, float* __restrict im,
                                                       const float* __restrict tw, int64_t N) {
  const int64_t blk = std::min<int64_t>(N, 256);
  for (int64_t b0 = 0; b0 < N; b0 += blk)
    for (int64_t half = 1, step = N / 2; half < blk; half *= 2, step /= 2)
      butterflies_avx2(re, im, tw, b0, b0 + blk, half, step);
  for (int64_t half = blk, step = N / (2 * blk); half < N; half *= 2, step /= 2)
    butterflies_avx2(re, im, tw, 0, N, half, step);
}

// 8 contiguous float32 rows into the lanes of dst (bit-reversed positions) through 8x8 register
// transposes; sums of squares in double.
__attribute__((target("avx2,fma"))) void gather8_avx2(const float* x, int64_t sm, int64_t N,
                                                    const int32_t* __restrict rev, float* __restrict dst,
                                                    double* sumsq) {
  __m256d s_lo[8], s_hi[8];
  for (int r = 0; r < 8; ++r) s_lo[r] = s_hi[r] = _mm256_setzero_pd();
  for (int64_t n0 = 0; n0 < N; n0 += 8) {
    __m256 v[8];
    for (int r = 0; r < 8; ++r) {
      v[r] = _mm256_loadu_ps(x + r * sm + n0);
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v[r]));
      const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v[r], 1));
      s_lo[r] = _mm256_fmadd_pd(lo, lo, s_lo[r]);
      s_hi[r] = _mm256_fmadd_pd(hi, hi, s_hi[r]);
    }
    __m256 col[8];  // column c of the 8x8 block = the 8 rows' values at n0 + c
    mmkernels::transpose8x8_ps(v, col);
    for (int c = 0; c < 8; ++c) _mm256_storeu_ps(dst + rev[n0 + c] * L, col[c]);
  }
  for (int r = 0; r < 8; ++r) {
    alignas(32) double t[4];
    _mm256_store_pd(t, _mm256_add_pd(s_lo[r], s_hi[r]));
    sumsq[r] = (t[0] + t[1]) + (t[2] + t[3]);
  }
}

template <typename T, typename A, bool Wide>
MMK_INLINE void fft1d_body(const Fft1dArgs& g, int64_t grp0, int64_t grp1) {
  const int64_t N = g.N, K = g.K, J = g.J, F = 2 * K;
  const A* tw = static_cast<const A*>(g.tw);
  std::vector<A> re(N * L), im(N * L), tmp(N);
  std::vector<double> e(2 * L * (J + 1));
  for (int64_t grp = grp0; grp < grp1; ++grp) {
    const int64_t row0 = grp * 2 * L;
    double sumsq[2 * L];
    // Gather: lane l of the real parts is row row0+l, of the imaginary parts row row0+L+l, bit-reversed.
    const bool fast_gather = Wide && std::is_same<T, float>::value && g.sn == 1 && row0 + 2 * L <= g.M;
    if (fast_gather) {
      const float* xr = reinterpret_cast<const float*>(static_cast<const T*>(g.x) + row0 * g.sm);
      gather8_avx2(xr, g.sm, N, g.rev, reinterpret_cast<float*>(re.data()), sumsq);
      gather8_avx2(xr + L * g.sm, g.sm, N, g.rev, reinterpret_cast<float*>(im.data()), sumsq + L);
    } else
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
    // Radix-2 decimation in time; every butterfly is one vector op per component across the L lanes.
    if (Wide && std::is_same<A, float>::value) {
      fft_passes_avx2(reinterpret_cast<float*>(re.data()), reinterpret_cast<float*>(im.data()),
                      reinterpret_cast<const float*>(tw), N);
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
        const A *zr = re.data() + k * L, *zi = im.data() + k * L, *vr = re.data() + kk * L, *vi = im.data() + kk * L;
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
template <typename T, typename A>
__attribute__((target("avx2,fma"))) void proj2d_avx2(const Proj2dArgs& g, int64_t a, int64_t b) {
  proj2d_body<T, A>(g, a, b);
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
    auto fn = cpu_has_avx2_fma() ? &proj2d_avx2<scalar_t, A> : &proj2d_generic<scalar_t, A>;
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
