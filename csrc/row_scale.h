// out[r, :] = x[r, :] * f[r] over the rows of a contiguous (rows, cols) block, one pass, shared by the CPU
// kernels of grad_scale (the backward's gradient times the coefficient) and modality_drop (features and
// gradients times the per-sample factor, a zero factor writing exact zeros: selection, so a dropped
// modality's NaN/Inf stays out). Arithmetic in float (double for double data or a double factor), rounded
// once to the data's dtype: what PyTorch's `x * f` then `.to(x.dtype)` computes.
//
// Why streaming stores: an output larger than the last-level cache is written to memory anyway, and a plain
// store first reads each destination line (a third memory stream beside the input read and the write
// back). Non-temporal stores skip that read; below the cache size they would push out data the next op of
// the backward is about to read, so they are used only above it.
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu_isa.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace mmk {
namespace rowscale {

// Output bytes from which the stores bypass the cache: the last-level cache size (32 MiB when unknown).
inline int64_t streaming_bytes() {
  static const int64_t bytes = [] {
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return l3 > 0 ? (int64_t)l3 : int64_t(32) << 20;
  }();
  return bytes;
}

constexpr int64_t kGrain = 1 << 16;  // elements per thread task: below it a thread costs more than it saves

template <typename T, typename A>
inline void scale_span_scalar(const T* x, T* out, int64_t n, A f, bool select) {
  if (select && f == A(0)) {
    std::memset(out, 0, n * sizeof(T));
    return;
  }
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(static_cast<A>(x[i]) * f);
}

#if defined(__x86_64__)
// fp32 with AVX2 (no FMA: one product, one rounding); `stream`: non-temporal stores from the first 32-byte
// aligned element on
__attribute__((target("avx2"))) inline void scale_span_f32_avx2(const float* x, float* out, int64_t n, float f,
                                                                 bool select, bool stream) {
  const __m256 vf = _mm256_set1_ps(f);
  const bool zero = select && f == 0.0f;
  int64_t i = 0;
  if (stream) {
    for (; i < n && (reinterpret_cast<uintptr_t>(out + i) & 31); ++i) out[i] = zero ? 0.0f : x[i] * f;
    const __m256 z = _mm256_setzero_ps();
    for (; i + 32 <= n; i += 32) {
      __m256 a = zero ? z : _mm256_mul_ps(_mm256_loadu_ps(x + i), vf);
      __m256 b = zero ? z : _mm256_mul_ps(_mm256_loadu_ps(x + i + 8), vf);
      __m256 c = zero ? z : _mm256_mul_ps(_mm256_loadu_ps(x + i + 16), vf);
      __m256 d = zero ? z : _mm256_mul_ps(_mm256_loadu_ps(x + i + 24), vf);
      _mm256_stream_ps(out + i, a);
      _mm256_stream_ps(out + i + 8, b);
      _mm256_stream_ps(out + i + 16, c);
      _mm256_stream_ps(out + i + 24, d);
    }
    for (; i + 8 <= n; i += 8) _mm256_stream_ps(out + i, zero ? z : _mm256_mul_ps(_mm256_loadu_ps(x + i), vf));
  } else if (zero) {
    std::memset(out, 0, n * sizeof(float));
    return;
  } else {
    for (; i + 32 <= n; i += 32) {
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), vf));
      _mm256_storeu_ps(out + i + 8, _mm256_mul_ps(_mm256_loadu_ps(x + i + 8), vf));
      _mm256_storeu_ps(out + i + 16, _mm256_mul_ps(_mm256_loadu_ps(x + i + 16), vf));
      _mm256_storeu_ps(out + i + 24, _mm256_mul_ps(_mm256_loadu_ps(x + i + 24), vf));
    }
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), vf));
  }
  for (; i < n; ++i) out[i] = zero ? 0.0f : x[i] * f;
}
#endif

template <typename T, typename A>
inline void scale_span(const T* x, T* out, int64_t n, A f, bool select, bool stream) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
    if (isa::avx2()) return scale_span_f32_avx2(x, out, n, f, select, stream);
  }
#endif
  scale_span_scalar(x, out, n, f, select);
}

// out[r * cols + c] = x[r * cols + c] * f(r) for r < rows; `f(r)` returns the row's factor in A. The
// element range is cut into tasks of about kGrain elements at row-segment boundaries, so rows of any
// width spread over the threads and the result does not depend on their number.
template <typename T, typename A, typename F>
void scale_rows(const T* x, T* out, int64_t rows, int64_t cols, const F& f, bool select) {
  const int64_t n = rows * cols;
  if (n == 0) return;
  const bool stream = n * (int64_t)sizeof(T) >= streaming_bytes();
  at::parallel_for(0, (n + kGrain - 1) / kGrain, 1, [&](int64_t t0, int64_t t1) {
    int64_t e = t0 * kGrain;
    const int64_t end = std::min(n, t1 * kGrain);
    while (e < end) {
      const int64_t r = e / cols;
      const int64_t stop = std::min(end, (r + 1) * cols);
      scale_span<T, A>(x + e, out + e, stop - e, f(r), select, stream);
      e = stop;
    }
#if defined(__x86_64__)
    if (stream) _mm_sfence();
#endif
  });
}

}  // namespace rowscale
}  // namespace mmk
