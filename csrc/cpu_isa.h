// Which vector loops the CPU kernels run, decided once per process from the CPU's features. Every kernel with
// vector loops also has portable ones: MMKERNELS_NO_AVX2 (set to anything) forces those, MMKERNELS_NO_AVX512
// the AVX2 ones where AVX-512 versions exist, so the tests can compare each version's results with the others'
// on one machine.
#pragma once
#include <cstdlib>

namespace mmk {
namespace isa {

inline bool env_set(const char* name) { return std::getenv(name) != nullptr; }

// AVX2 alone: the loops that must round as the portable ones (no FMA contraction), and plain copies/scales.
inline bool avx2() {
#if defined(__x86_64__)
  static const bool on = __builtin_cpu_supports("avx2") && !env_set("MMKERNELS_NO_AVX2");
  return on;
#else
  return false;
#endif
}

// AVX2 with FMA and F16C (every AVX2 CPU has both): the loops that use multiply-adds and half conversions.
inline bool avx2_fma() {
#if defined(__x86_64__)
  static const bool on = avx2() && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return on;
#else
  return false;
#endif
}

// AVX-512 Foundation, 16 floats per vector; the kernels' AVX-512 versions use no other AVX-512 subset.
inline bool avx512() {
#if defined(__x86_64__)
  static const bool on = avx2_fma() && __builtin_cpu_supports("avx512f") && !env_set("MMKERNELS_NO_AVX512");
  return on;
#else
  return false;
#endif
}

}  // namespace isa
}  // namespace mmk

// Compiles a function for AVX-512F. AVX-512 includes FMA, and GCC would then contract a multiply and an add
// of separate statements into one FMA (one rounding instead of two) even in ISO C++ mode; the loops that must
// round as their portable versions therefore also turn contraction off (clang never contracts across
// statements and has no optimize attribute).
#if defined(__clang__)
#define MMK_TARGET_AVX512 __attribute__((target("avx512f")))
#else
#define MMK_TARGET_AVX512 __attribute__((target("avx512f"), optimize("fp-contract=off")))
#endif
