// Float64 sums over the gradient lists of group_grad_stats.cpp and proximal_fisher.cpp, with one fixed
// association whatever the CPU: element i of a chunk adds into lane i % 16 and the 16 lanes are reduced by
// a fixed tree. The AVX2 loops (four 4-wide fp64 accumulators = the 16 lanes), the AVX-512 loops (two 8-wide
// ones) and the portable loops therefore give the same bits, and so does any thread count (chunks are
// combined in chunk order by the callers). Float inputs: a product of two floats is exact in fp64, so an FMA
// of it rounds as mul + add does. Float arithmetic that the portable loops round once per operation (the pull
// of proximal_fisher_, the combination of group_grad_combine_) runs in functions compiled without
// contraction (AVX2 without FMA, or MMK_TARGET_AVX512): the compiler would otherwise fuse a vector multiply
// and add into one FMA (one rounding instead of two).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "cpu_isa.h"

namespace mmk {
namespace lanes {

constexpr int64_t kLanes = 16;

// The read-only sums (group_grad_stats, proximal_fisher_'s sums of groups it does not pull) prefetch each
// stream this far ahead, one line per 64 bytes read: on one thread the hardware prefetcher alone leaves DRAM
// bandwidth unused (it stops at every 4 KB page). Measured, 1 thread, 2x ResNet-18 gradients: group_grad_stats
// w96 (402 MB read) 48.5 -> 40.4 ms and w64 20.4 -> 17.9 ms; 1, 2 and 4 KB ahead within 3% of each other. The
// read-modify-write loops have none: there it cost time (update_scale_ w96 38.0 -> 41.4 ms, group_grad_combine_
// 34.2 -> 41.9 ms, proximal_fisher_'s pull no better). The machine's speed varied by 2x that day: these are
// medians of interleaved runs in one process, with and without the prefetch. On a Zen 4 core (2026-12-03) the
// prefetch cost time instead (group_grad_stats w96 0.90-0.97x the compiled formula without it, 0.84x with
// it); the AVX2 loops keep it for the older CPUs it was measured on, the AVX-512 loops have none.
constexpr int kAheadBytes = 2048;

inline void prefetch_ahead(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + kAheadBytes, _MM_HINT_T0);  // a prefetch past the end cannot fault
}

inline double reduce(const double* l) {
  double t[8];
  for (int j = 0; j < 8; ++j) t[j] = l[j] + l[j + 8];
  for (int j = 0; j < 4; ++j) t[j] += t[j + 4];
  for (int j = 0; j < 2; ++j) t[j] += t[j + 2];
  return t[0] + t[1];
}

// Lanes 4k..4k+3 of a 16-lane accumulator held in acc[k].
__attribute__((target("avx2"))) inline void store_lanes(const __m256d acc[4], double* l) {
  for (int k = 0; k < 4; ++k) _mm256_storeu_pd(l + 4 * k, _mm256_add_pd(_mm256_loadu_pd(l + 4 * k), acc[k]));
}

// 16 floats as four fp64 vectors: elements 4k..4k+3 in out[k].
__attribute__((target("avx2"))) inline void widen16(const float* x, __m256d out[4]) {
  const __m256 lo = _mm256_loadu_ps(x), hi = _mm256_loadu_ps(x + 8);
  out[0] = _mm256_cvtps_pd(_mm256_castps256_ps128(lo));
  out[1] = _mm256_cvtps_pd(_mm256_extractf128_ps(lo, 1));
  out[2] = _mm256_cvtps_pd(_mm256_castps256_ps128(hi));
  out[3] = _mm256_cvtps_pd(_mm256_extractf128_ps(hi, 1));
}

// The AVX-512 loops' 16-lane accumulator: lanes 0-7 in acc[0], 8-15 in acc[1].
MMK_TARGET_AVX512 inline void store_lanes(const __m512d acc[2], double* l) {
  for (int k = 0; k < 2; ++k) _mm512_storeu_pd(l + 8 * k, _mm512_add_pd(_mm512_loadu_pd(l + 8 * k), acc[k]));
}

}  // namespace lanes
}  // namespace mmk
