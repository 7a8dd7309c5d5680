// CPU kernels of decision_fuse (Python: mmkernels/ops/decision_fuse.py), forward and backward:
//   z[i, k]         = sum_m a[i, m] w[m, k] x[m, i, k] / s[m]  /  sum_m a[i, m] w[m, k]
//   dx[m, i, k]     = a[i, m] w[m, k] / s[m] * c[m (, i)] * g[i, k]  /  sum_j a[i, j] w[j, k]
// with a the availability mask (bool, or float as a soft weight; 1 without one). A modality with a[i, m] == 0
// is selected out, never multiplied by 0: its logits are not read (NaN there does not reach z) and its
// gradient is exactly 0. A sample with no modality present gets z = 0/0 = NaN and zero gradients.
//
// One pass over the logits (forward) and one write of dx (backward), sample by sample; w/s and w are
// widened to the accumulation type once per call (M*K values). fp32 math for fp32/fp16/bf16, fp64 for fp64;
// outputs in the logits' (gradient's) dtype. fp32 with unit class stride takes AVX2/FMA paths: with a bool
// mask (or none) the normalised weights of each present-set of modalities are tabulated once per call, so
// rows do no division; a float mask renormalises per row in registers. Everything else runs plain C++ loops
// compiled twice (baseline and AVX2) and picked at run time; MMKERNELS_NO_AVX2=1 forces the baseline.
//
// check_values (the public function's eager checks, done here where the values are read anyway): weights,
// a float mask and grad_coeff finite, scales finite and non-zero; check_mask: every sample has a modality.
// A failure raises ValueError before anything is computed (the Python wrapper then names the offending
// entries with its own checks).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"

namespace mmk {
namespace {

constexpr int64_t kTile = 512;            // classes per tile: num/den tiles stay in L1
constexpr int64_t kParallelWork = 32768;  // (modality, class) entries per thread below which threads cost more

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// A small 1-D/2-D tensor of any float dtype (or bool), any strides, widened into a row-major vector of A;
// `finite` (when asked) becomes false if an entry is NaN/Inf in its own dtype (or zero, for `nonzero`).
template <typename A>
std::vector<A> widen(const at::Tensor& t, int64_t rows, int64_t cols, bool check, bool nonzero, bool* ok) {
  std::vector<A> out(rows * cols);
  const int64_t s0 = t.dim() == 2 ? t.stride(0) : t.stride(0) * cols, s1 = t.dim() == 2 ? t.stride(1) : t.stride(0);
  auto run = [&](auto* p) {
    using S = std::remove_const_t<std::remove_pointer_t<decltype(p)>>;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const S v = p[r * s0 + c * s1];
        if constexpr (!std::is_same_v<S, bool>) {
          if (check) {
            const double d = static_cast<double>(v);
            if (!std::isfinite(d) || (nonzero && d == 0.0)) *ok = false;
          }
        }
        out[r * cols + c] = static_cast<A>(v);
      }
  };
  switch (t.scalar_type()) {
    case at::kFloat: run(t.const_data_ptr<float>()); break;
    case at::kDouble: run(t.const_data_ptr<double>()); break;
    case at::kHalf: run(t.const_data_ptr<c10::Half>()); break;
    case at::kBFloat16: run(t.const_data_ptr<c10::BFloat16>()); break;
    case at::kBool: run(t.const_data_ptr<bool>()); break;
    default: TORCH_CHECK_TYPE(false, "decision_fuse: unsupported dtype ", t.scalar_type());
  }
  return out;
}

// Row (m, i) of x as contiguous A values [k0, k0 + n): the logits themselves when they already are, else
// widened / gathered into buf.
template <typename T, typename A>
inline const A* span(const T* x, int64_t sk, int64_t n, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    if (sk == 1) return x;
  }
  for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<A>(x[k * sk]);
  return buf;
}

// ------------------------------------------------------------------------------------------------ forward
struct FwdArgs {
  const void* x;
  int64_t sxm, sxb, sxk;
  void* z;  // contiguous (B, K)
  int64_t M, B, K;
  const void* wp;    // (M, K) w / s
  const void* w;     // (M, K) w
  const void* a;     // (B, M) mask values, or null
};

template <typename A>
__attribute__((always_inline)) inline void fwd_tile(A* num, A* den, const A* xm, const A* wp, const A* w, A am,
                                                   int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    num[k] += am * wp[k] * xm[k];
    den[k] += am * w[k];
  }
}

template <typename A>
__attribute__((always_inline)) inline void fwd_first(A* num, A* den, const A* xm, const A* wp, const A* w, A am,
                                                    int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    num[k] = am * wp[k] * xm[k];
    den[k] = am * w[k];
  }
}

template <typename T, typename A>
__attribute__((always_inline)) inline void fwd_store(T* z, const A* num, const A* den, int64_t n) {
  for (int64_t k = 0; k < n; ++k) z[k] = static_cast<T>(num[k] / den[k]);
}

template <typename T, typename A>
__attribute__((always_inline)) inline void fwd_rows(const FwdArgs& p, int64_t i0, int64_t i1) {
  const T* x = static_cast<const T*>(p.x);
  T* z = static_cast<T*>(p.z);
  const A* wp = static_cast<const A*>(p.wp);
  const A* w = static_cast<const A*>(p.w);
  const A* a = static_cast<const A*>(p.a);
  alignas(64) A num[kTile], den[kTile], buf[kTile];
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t k0 = 0; k0 < p.K; k0 += kTile) {
      const int64_t n = std::min(kTile, p.K - k0);
      bool first = true;
      for (int64_t m = 0; m < p.M; ++m) {
        const A am = a ? a[i * p.M + m] : A(1);
        if (am == A(0)) continue;  // missing: not read
        const A* xm = span<T, A>(x + m * p.sxm + i * p.sxb + k0 * p.sxk, p.sxk, n, buf);
        if (first) {
          fwd_first(num, den, xm, wp + m * p.K + k0, w + m * p.K + k0, am, n);
          first = false;
        } else {
          fwd_tile(num, den, xm, wp + m * p.K + k0, w + m * p.K + k0, am, n);
        }
      }
      if (first) {  // no modality present: 0/0, as the formula gives
        std::fill(num, num + n, A(0));
        std::fill(den, den + n, A(0));
      }
      fwd_store(z + i * p.K + k0, num, den, n);
    }
  }
}

template <typename T, typename A>
__attribute__((target("avx2"))) void fwd_rows_avx2(const FwdArgs& p, int64_t i0, int64_t i1) {
  fwd_rows<T, A>(p, i0, i1);
}
template <typename T, typename A>
void fwd_rows_generic(const FwdArgs& p, int64_t i0, int64_t i1) {
  fwd_rows<T, A>(p, i0, i1);
}

// fp32 logits with unit class stride: 8 classes at a time with num/den in registers, every present
// modality's logits read once (the compiler left the generic loops above partly scalar).
__attribute__((target("avx2"))) inline __m256i lanes(int64_t n) {  // lanes [0, n) set, 0 <= n <= 8
  alignas(32) static const int32_t table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 8 - n));
}

// the modalities present in sample i and their mask values
inline int64_t present(const float* a, int64_t i, int64_t M, int64_t* ms, float* as) {
  int64_t n = 0;
  for (int64_t m = 0; m < M; ++m) {
    const float am = a ? a[i * M + m] : 1.0f;
    if (am != 0.0f) {
      ms[n] = m;
      as[n++] = am;
    }
  }
  return n;
}

__attribute__((target("avx2,fma"))) void fwd_rows_f32_avx2(const FwdArgs& p, int64_t i0, int64_t i1) {
  const float* x = static_cast<const float*>(p.x);
  float* z = static_cast<float*>(p.z);
  const float* wp = static_cast<const float*>(p.wp);
  const float* w = static_cast<const float*>(p.w);
  std::vector<int64_t> ms(p.M);
  std::vector<float> as(p.M);
  const int64_t full = p.K & ~int64_t(7);
  const __m256i tail = lanes(p.K - full);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t np = present(static_cast<const float*>(p.a), i, p.M, ms.data(), as.data());
    float* zi = z + i * p.K;
    const float* xi = x + i * p.sxb;
    for (int64_t k = 0; k < p.K; k += 8) {
      const bool part = k == full;
      __m256 num = _mm256_setzero_ps(), den = _mm256_setzero_ps();
      for (int64_t j = 0; j < np; ++j) {
        const int64_t m = ms[j];
        const __m256 am = _mm256_set1_ps(as[j]);
        const float* xm = xi + m * p.sxm + k;
        const __m256 xv = part ? _mm256_maskload_ps(xm, tail) : _mm256_loadu_ps(xm);
        const __m256 wpv = part ? _mm256_maskload_ps(wp + m * p.K + k, tail) : _mm256_loadu_ps(wp + m * p.K + k);
        const __m256 wv = part ? _mm256_maskload_ps(w + m * p.K + k, tail) : _mm256_loadu_ps(w + m * p.K + k);
        num = _mm256_fmadd_ps(_mm256_mul_ps(am, wpv), xv, num);
        den = _mm256_fmadd_ps(am, wv, den);
      }
      const __m256 zv = _mm256_div_ps(num, den);  // no modality present: 0/0 = NaN
      if (part) {
        _mm256_maskstore_ps(zi + k, tail, zv);
      } else {
        _mm256_storeu_ps(zi + k, zv);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ backward
struct BwdArgs {
  const void* g;
  int64_t sgb, sgk;
  void* dx;  // contiguous (M, B, K)
  int64_t M, B, K;
  const void* wp;  // (M, K) w / s
  const void* w;   // (M, K) w
  const void* a;   // (B, M) or null
  const void* c;   // (M, B) (a (M,) coefficient is expanded) or null
};

template <typename T, typename A>
__attribute__((always_inline)) inline void bwd_rows(const BwdArgs& p, int64_t i0, int64_t i1) {
  const T* g = static_cast<const T*>(p.g);
  T* dx = static_cast<T*>(p.dx);
  const A* wp = static_cast<const A*>(p.wp);
  const A* w = static_cast<const A*>(p.w);
  const A* a = static_cast<const A*>(p.a);
  const A* c = static_cast<const A*>(p.c);
  alignas(64) A den[kTile], r[kTile], buf[kTile];
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t k0 = 0; k0 < p.K; k0 += kTile) {
      const int64_t n = std::min(kTile, p.K - k0);
      std::fill(den, den + n, A(0));
      for (int64_t m = 0; m < p.M; ++m) {
        const A am = a ? a[i * p.M + m] : A(1);
        if (am == A(0)) continue;
        const A* wm = w + m * p.K + k0;
        for (int64_t k = 0; k < n; ++k) den[k] += am * wm[k];
      }
      const A* gi = span<T, A>(g + i * p.sgb + k0 * p.sgk, p.sgk, n, buf);
      for (int64_t k = 0; k < n; ++k) r[k] = gi[k] / den[k];
      for (int64_t m = 0; m < p.M; ++m) {
        T* out = dx + (m * p.B + i) * p.K + k0;
        const A am = a ? a[i * p.M + m] : A(1);
        if (am == A(0)) {  // selected out: exactly 0 (also where r is inf/NaN)
          std::fill(out, out + n, static_cast<T>(0));
          continue;
        }
        const A f = am * (c ? c[m * p.B + i] : A(1));
        const A* wpm = wp + m * p.K + k0;
        for (int64_t k = 0; k < n; ++k) out[k] = static_cast<T>(f * wpm[k] * r[k]);
      }
    }
  }
}

template <typename T, typename A>
__attribute__((target("avx2"))) void bwd_rows_avx2(const BwdArgs& p, int64_t i0, int64_t i1) {
  bwd_rows<T, A>(p, i0, i1);
}
template <typename T, typename A>
void bwd_rows_generic(const BwdArgs& p, int64_t i0, int64_t i1) {
  bwd_rows<T, A>(p, i0, i1);
}

// fp32 gradient with unit class stride: per 8 classes the renormaliser and g/den in registers, then the M
// output rows written straight from them
__attribute__((target("avx2,fma"))) void bwd_rows_f32_avx2(const BwdArgs& p, int64_t i0, int64_t i1) {
  const float* g = static_cast<const float*>(p.g);
  float* dx = static_cast<float*>(p.dx);
  const float* wp = static_cast<const float*>(p.wp);
  const float* w = static_cast<const float*>(p.w);
  const float* a = static_cast<const float*>(p.a);
  const float* c = static_cast<const float*>(p.c);
  std::vector<int64_t> ms(p.M);
  std::vector<float> as(p.M), fs(p.M);
  const int64_t full = p.K & ~int64_t(7);
  const __m256i tail = lanes(p.K - full);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t np = present(a, i, p.M, ms.data(), as.data());
    for (int64_t j = 0; j < np; ++j) fs[j] = as[j] * (c ? c[ms[j] * p.B + i] : 1.0f);
    for (int64_t m = 0; m < p.M; ++m) {  // selected out: exactly 0 (also where g/den is inf or NaN)
      if (a && a[i * p.M + m] == 0.0f) std::fill(dx + (m * p.B + i) * p.K, dx + (m * p.B + i + 1) * p.K, 0.0f);
    }
    const float* gi = g + i * p.sgb;
    for (int64_t k = 0; k < p.K; k += 8) {
      const bool part = k == full;
      __m256 den = _mm256_setzero_ps();
      for (int64_t j = 0; j < np; ++j) {
        const float* wm = w + ms[j] * p.K + k;
        den = _mm256_fmadd_ps(_mm256_set1_ps(as[j]), part ? _mm256_maskload_ps(wm, tail) : _mm256_loadu_ps(wm), den);
      }
      const __m256 r = _mm256_div_ps(part ? _mm256_maskload_ps(gi + k, tail) : _mm256_loadu_ps(gi + k), den);
      for (int64_t j = 0; j < np; ++j) {
        const int64_t m = ms[j];
        const float* wpm = wp + m * p.K + k;
        const __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(fs[j]), part ? _mm256_maskload_ps(wpm, tail)
                                                                                : _mm256_loadu_ps(wpm)), r);
        float* out = dx + (m * p.B + i) * p.K + k;
        if (part) {
          _mm256_maskstore_ps(out, tail, v);
        } else {
          _mm256_storeu_ps(out, v);
        }
      }
    }
  }
}

// fp32, bool mask or none: a row's normalised weights depend only on which modalities it has, so
// q_P[m, k] = w[m, k] / s[m] / sum_{j in P} w[j, k] is built once per present-set P that occurs (at most
// 2^M, M <= kMaxPatternM) and the rows need neither the renormaliser nor a division:
// z = sum_{m in P} q_P[m] x[m], dx[m] = c[m] q_P[m] g.
constexpr int64_t kMaxPatternM = 6;

struct Patterns {
  std::vector<uint8_t> of_row;  // B present-set bit masks
  std::vector<int32_t> slot;    // 2^M: index into q, or -1
  std::vector<float> q;         // (used sets, M, K)
};

__attribute__((target("avx2,fma"))) Patterns build_patterns(const float* a, const float* wp, const float* w,
                                                            int64_t M, int64_t B, int64_t K) {
  Patterns t;
  t.of_row.resize(B);
  t.slot.assign(int64_t(1) << M, -1);
  int32_t used = 0;
  for (int64_t i = 0; i < B; ++i) {
    uint8_t bits = 0;
    for (int64_t m = 0; m < M; ++m)
      if (!a || a[i * M + m] != 0.0f) bits |= uint8_t(1u << m);
    t.of_row[i] = bits;
    if (t.slot[bits] < 0) t.slot[bits] = used++;
  }
  t.q.resize(used * M * K);
  std::vector<float> den(K);
  for (int64_t bits = 0; bits < (int64_t(1) << M); ++bits) {
    if (t.slot[bits] < 0) continue;
    std::fill(den.begin(), den.end(), 0.0f);
    for (int64_t m = 0; m < M; ++m)
      if (bits >> m & 1)
        for (int64_t k = 0; k < K; ++k) den[k] += w[m * K + k];
    float* q = t.q.data() + t.slot[bits] * M * K;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) q[m * K + k] = (bits >> m & 1) ? wp[m * K + k] / den[k] : 0.0f;
  }
  return t;
}

__attribute__((target("avx2,fma"))) void fwd_rows_pattern(const FwdArgs& p, const Patterns& t, int64_t i0,
                                                          int64_t i1) {
  const float* x = static_cast<const float*>(p.x);
  float* z = static_cast<float*>(p.z);
  const int64_t full = p.K & ~int64_t(7);
  const __m256i tail = lanes(p.K - full);
  int64_t ms[kMaxPatternM];
  for (int64_t i = i0; i < i1; ++i) {
    const uint8_t bits = t.of_row[i];
    float* zi = z + i * p.K;
    if (bits == 0) {  // no modality present: 0/0
      std::fill(zi, zi + p.K, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    int64_t np = 0;
    for (int64_t m = 0; m < p.M; ++m)
      if (bits >> m & 1) ms[np++] = m;
    const float* q = t.q.data() + t.slot[bits] * p.M * p.K;
    const float* xi = x + i * p.sxb;
    for (int64_t k = 0; k < p.K; k += 8) {
      const bool part = k == full;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t j = 0; j < np; ++j) {
        const float* xm = xi + ms[j] * p.sxm + k;
        const float* qm = q + ms[j] * p.K + k;
        acc = _mm256_fmadd_ps(part ? _mm256_maskload_ps(qm, tail) : _mm256_loadu_ps(qm),
                              part ? _mm256_maskload_ps(xm, tail) : _mm256_loadu_ps(xm), acc);
      }
      if (part) {
        _mm256_maskstore_ps(zi + k, tail, acc);
      } else {
        _mm256_storeu_ps(zi + k, acc);
      }
    }
  }
}

__attribute__((target("avx2,fma"))) void bwd_rows_pattern(const BwdArgs& p, const Patterns& t, int64_t i0,
                                                          int64_t i1) {
  const float* g = static_cast<const float*>(p.g);
  float* dx = static_cast<float*>(p.dx);
  const float* c = static_cast<const float*>(p.c);
  const int64_t full = p.K & ~int64_t(7);
  const __m256i tail = lanes(p.K - full);
  int64_t ms[kMaxPatternM];
  float fs[kMaxPatternM];
  for (int64_t i = i0; i < i1; ++i) {
    const uint8_t bits = t.of_row[i];
    int64_t np = 0;
    for (int64_t m = 0; m < p.M; ++m) {
      if (bits >> m & 1) {
        fs[np] = c ? c[m * p.B + i] : 1.0f;
        ms[np++] = m;
      } else {  // selected out: exactly 0
        std::fill(dx + (m * p.B + i) * p.K, dx + (m * p.B + i + 1) * p.K, 0.0f);
      }
    }
    if (np == 0) continue;
    const float* q = t.q.data() + t.slot[bits] * p.M * p.K;
    const float* gi = g + i * p.sgb;
    for (int64_t k = 0; k < p.K; k += 8) {
      const bool part = k == full;
      const __m256 gv = part ? _mm256_maskload_ps(gi + k, tail) : _mm256_loadu_ps(gi + k);
      for (int64_t j = 0; j < np; ++j) {
        const float* qm = q + ms[j] * p.K + k;
        const __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(fs[j]), gv),
                                       part ? _mm256_maskload_ps(qm, tail) : _mm256_loadu_ps(qm));
        float* out = dx + (ms[j] * p.B + i) * p.K + k;
        if (part) {
          _mm256_maskstore_ps(out, tail, v);
        } else {
          _mm256_storeu_ps(out, v);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ glue
template <typename A>
struct Small {  // the per-call constants, widened to A
  std::vector<A> wp, w, a, c;
};

// w, w/s, the mask and (when given) the coefficients as A; with check_values, ValueError on a bad value
template <typename A>
Small<A> small_inputs(const at::Tensor& weights, const at::Tensor& scales, const std::optional<at::Tensor>& mask,
                      const std::optional<at::Tensor>& coeff, int64_t M, int64_t B, int64_t K, bool check_values,
                      bool check_mask, bool want_coeff) {
  Small<A> s;
  bool ok_w = true, ok_s = true, ok_a = true, ok_c = true;
  s.w = widen<A>(weights, M, K, check_values, false, &ok_w);
  const std::vector<A> sc = widen<A>(scales, 1, M, check_values, true, &ok_s);
  TORCH_CHECK_VALUE(ok_w, "decision_fuse: weights must be finite");
  TORCH_CHECK_VALUE(ok_s, "decision_fuse: scales must be non-zero and finite");
  if (mask.has_value()) {
    s.a = widen<A>(*mask, B, M, check_values && mask->scalar_type() != at::kBool, false, &ok_a);
    if (check_mask) {
      for (int64_t i = 0; i < B; ++i) {
        bool any = false;
        for (int64_t m = 0; m < M; ++m) any |= s.a[i * M + m] != A(0);
        TORCH_CHECK_VALUE(any, "decision_fuse: sample ", i, " has every modality missing in mask");
      }
    }
  }
  if (coeff.has_value() && (want_coeff || check_values)) {
    const bool per_sample = coeff->dim() == 2;
    std::vector<A> cv = widen<A>(*coeff, per_sample ? M : 1, per_sample ? B : M, check_values, false, &ok_c);
    if (want_coeff) {
      if (per_sample) {
        s.c = std::move(cv);
      } else {
        s.c.resize(M * B);
        for (int64_t m = 0; m < M; ++m) std::fill(s.c.begin() + m * B, s.c.begin() + (m + 1) * B, cv[m]);
      }
    }
  }
  TORCH_CHECK_VALUE(ok_a, "decision_fuse: mask must be finite");
  TORCH_CHECK_VALUE(ok_c, "decision_fuse: grad_coeff must be finite");
  s.wp.resize(M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) s.wp[m * K + k] = s.w[m * K + k] / sc[m];
  return s;
}

void check_shapes(const at::Tensor& weights, const at::Tensor& scales, const std::optional<at::Tensor>& mask,
                  const std::optional<at::Tensor>& coeff, int64_t M, int64_t B, int64_t K) {
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == M && weights.size(1) == K, "decision_fuse: weights must be (M, K)");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == M, "decision_fuse: scales must be (M,)");
  TORCH_CHECK(!mask.has_value() || (mask->dim() == 2 && mask->size(0) == B && mask->size(1) == M),
              "decision_fuse: mask must be (B, M)");
  TORCH_CHECK(!coeff.has_value() || (coeff->dim() == 1 && coeff->size(0) == M) ||
                  (coeff->dim() == 2 && coeff->size(0) == M && coeff->size(1) == B),
              "decision_fuse: grad_coeff must be (M,) or (M, B)");
}

int64_t grain_rows(int64_t M, int64_t K) { return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, M * K)); }

at::Tensor decision_fuse_fwd_cpu(const at::Tensor& logits, const at::Tensor& weights, const at::Tensor& scales,
                                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& grad_coeff,
                                 bool check_mask, bool check_values) {
  TORCH_CHECK(logits.dim() == 3, "decision_fuse: logits must be (M, B, K)");
  const int64_t M = logits.size(0), B = logits.size(1), K = logits.size(2);
  check_shapes(weights, scales, mask, grad_coeff, M, B, K);
  at::Tensor z = at::empty({B, K}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "decision_fuse_fwd", [&] {
    using A = acc_t<scalar_t>;
    const Small<A> s = small_inputs<A>(weights, scales, mask, grad_coeff, M, B, K, check_values, check_mask, false);
    if (B == 0 || K == 0) return;
    const FwdArgs p{logits.const_data_ptr(), logits.stride(0), logits.stride(1), logits.stride(2), z.data_ptr(),
                    M, B, K, s.wp.data(), s.w.data(), mask.has_value() ? s.a.data() : nullptr};
    const bool avx2 = isa::avx2_fma();
    const bool fast = avx2 && std::is_same_v<scalar_t, float> && logits.stride(2) == 1;
    const bool by_pattern = fast && M <= kMaxPatternM && (!mask.has_value() || mask->scalar_type() == at::kBool);
    Patterns t;
    if (by_pattern) {
      t = build_patterns(static_cast<const float*>(p.a), static_cast<const float*>(p.wp),
                         static_cast<const float*>(p.w), M, B, K);
    }
    at::parallel_for(0, B, grain_rows(M, K), [&](int64_t i0, int64_t i1) {
      if (by_pattern) {
        fwd_rows_pattern(p, t, i0, i1);
      } else if (fast) {
        fwd_rows_f32_avx2(p, i0, i1);
      } else if (avx2) {
        fwd_rows_avx2<scalar_t, A>(p, i0, i1);
      } else {
        fwd_rows_generic<scalar_t, A>(p, i0, i1);
      }
    });
  });
  return z;
}

at::Tensor decision_fuse_bwd_cpu(const at::Tensor& grad, const at::Tensor& weights, const at::Tensor& scales,
                                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& grad_coeff) {
  TORCH_CHECK(grad.dim() == 2, "decision_fuse: the gradient must be (B, K)");
  const int64_t B = grad.size(0), K = grad.size(1), M = weights.size(0);
  check_shapes(weights, scales, mask, grad_coeff, M, B, K);
  at::Tensor dx = at::empty({M, B, K}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "decision_fuse_bwd", [&] {
    using A = acc_t<scalar_t>;
    const Small<A> s = small_inputs<A>(weights, scales, mask, grad_coeff, M, B, K, false, false, true);
    if (B == 0 || K == 0) return;
    const BwdArgs p{grad.const_data_ptr(), grad.stride(0), grad.stride(1), dx.data_ptr(), M, B, K,
                    s.wp.data(), s.w.data(), mask.has_value() ? s.a.data() : nullptr,
                    grad_coeff.has_value() ? s.c.data() : nullptr};
    const bool avx2 = isa::avx2_fma();
    const bool fast = avx2 && std::is_same_v<scalar_t, float> && grad.stride(1) == 1;
    const bool by_pattern = fast && M <= kMaxPatternM && (!mask.has_value() || mask->scalar_type() == at::kBool);
    Patterns t;
    if (by_pattern) {
      t = build_patterns(static_cast<const float*>(p.a), static_cast<const float*>(p.wp),
                         static_cast<const float*>(p.w), M, B, K);
    }
    at::parallel_for(0, B, grain_rows(M, K), [&](int64_t i0, int64_t i1) {
      if (by_pattern) {
        bwd_rows_pattern(p, t, i0, i1);
      } else if (fast) {
        bwd_rows_f32_avx2(p, i0, i1);
      } else if (avx2) {
        bwd_rows_avx2<scalar_t, A>(p, i0, i1);
      } else {
        bwd_rows_generic<scalar_t, A>(p, i0, i1);
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmkernels_C, m) {
  // z (B, K) in the logits' dtype. grad_coeff is only checked here (check_values); check_mask: every sample
  // needs a modality present. Both checks raise ValueError.
  m.def("decision_fuse_fwd(Tensor logits, Tensor weights, Tensor scales, Tensor? mask, Tensor? grad_coeff, "
        "bool check_mask, bool check_values) -> Tensor");
  // dlogits (M, B, K), contiguous, in the gradient's dtype
  m.def("decision_fuse_bwd(Tensor grad, Tensor weights, Tensor scales, Tensor? mask, Tensor? grad_coeff) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmkernels_C, CPU, m) {
  m.impl("decision_fuse_fwd", &decision_fuse_fwd_cpu);
  m.impl("decision_fuse_bwd", &decision_fuse_bwd_cpu);
}

// The Python autograd.Function / registered autograd of mmkernels::decision_fuse differentiates these two;
// autograd itself skips them (no fallback kernel on every call).
TORCH_LIBRARY_IMPL(mmkernels_C, Autograd, m) {
  m.impl("decision_fuse_fwd", torch::CppFunction::makeFallthrough());
  m.impl("decision_fuse_bwd", torch::CppFunction::makeFallthrough());
}

}  // namespace mmk
