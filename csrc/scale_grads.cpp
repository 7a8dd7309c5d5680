// CPU kernels of scale_grads_ and of its noise stream, registered on the dispatcher (the schemas are in
// csrc/module.cpp), as functors on the multi-tensor apply of csrc/multi_tensor_apply.h:
//   noise=None: one read-modify-write pass, g*coeff per element, which also ORs the exponent bits of what
//     it reads to flag the tensors that held NaN/Inf (they are scaled like the others, as `g *= k` does).
//   noise="ge": pass 1 sums (x - x0) and (x - x0)^2 in double per chunk; the chunk partials of a tensor
//     are combined in chunk order (a std that does not depend on the thread count, hence reproducible
//     noise), then pass 2 writes g*coeff + std*z with z from csrc/noise.h.
// With noise a tensor holding NaN/Inf is left unchanged (its std is undefined) and flagged; a non-finite
// coeff leaves every tensor unchanged and flags all of them (the contract: mmkernels/ops/scale_grads.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu_isa.h"
#include "multi_tensor_apply.h"
#include "noise.h"
#include "scale_grads.h"

namespace mmk {
namespace {

constexpr int64_t kChunk = 16384;  // elements per work item; a multiple of the 256-normal tile
constexpr int kTile = 256;         // normals generated per inner batch (vectorised)

// Box-Muller over the four Philox words of 64 groups (struct-of-arrays), writing z[4g .. 4g+3].
#define MMK_BOX_MULLER_LOOP                                     \
  _Pragma("omp simd") for (int g = 0; g < kTile / 4; ++g) {     \
    float a, b, c, d;                                           \
    box_muller(X[g], Y[g], &a, &b);                             \
    box_muller(Z[g], W[g], &c, &d);                             \
    z[4 * g] = a;                                               \
    z[4 * g + 1] = b;                                           \
    z[4 * g + 2] = c;                                           \
    z[4 * g + 3] = d;                                           \
  }

// 256 normals for element groups g0 .. g0+63 of list entry `tensor`: portable version.
void normals_tile_generic(uint64_t seed, uint32_t tensor, uint64_t g0, float* z) {
  alignas(32) uint32_t X[kTile / 4], Y[kTile / 4], Z[kTile / 4], W[kTile / 4];
  const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (int g = 0; g < kTile / 4; ++g) {
    const uint64_t gg = g0 + (uint64_t)g;
    const U4 o = philox4x32_10(U4{(uint32_t)gg, (uint32_t)(gg >> 32), tensor, 0x5ca1e5u}, k0, k1);
    X[g] = o.x, Y[g] = o.y, Z[g] = o.z, W[g] = o.w;
  }
  MMK_BOX_MULLER_LOOP
}

// AVX2 version: Philox on 8 groups per vector with 32x32->64 multiplies (vpmuludq) on even and odd lanes;
// the Box-Muller loop is the same source, vectorised by the compiler. No FMA is enabled here, so the floats
// round exactly as in the portable version and the CUDA kernel (checked by the tests).
__attribute__((target("avx2"))) static inline void mulhilo8(__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  const __m256i pe = _mm256_mul_epu32(a, m);                         // lanes 0,2,4,6 (64-bit products)
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1,3,5,7
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  *lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
}

__attribute__((target("avx2"))) void normals_tile_avx2(uint64_t seed, uint32_t tensor, uint64_t g0, float* z) {
  alignas(32) uint32_t X[kTile / 4], Y[kTile / 4], Z[kTile / 4], W[kTile / 4];
  const __m256i M0 = _mm256_set1_epi32((int)0xD2511F53u), M1 = _mm256_set1_epi32((int)0xCD9E8D57u);
  // Each round of a block of 8 groups waits on the last (multiply, shift, blend, xor: about 9 cycles), so
  // kBlocks independent blocks go through the rounds together to keep the vector units busy.
  constexpr int kBlocks = 4;
  for (int g = 0; g < kTile / 4; g += 8 * kBlocks) {
    __m256i c0[kBlocks], c1[kBlocks], c2[kBlocks], c3[kBlocks];
    for (int b = 0; b < kBlocks; ++b) {
      alignas(32) uint32_t lo[8], hi[8];
      for (int l = 0; l < 8; ++l) {
        const uint64_t gg = g0 + (uint64_t)(g + 8 * b + l);
        lo[l] = (uint32_t)gg;
        hi[l] = (uint32_t)(gg >> 32);
      }
      c0[b] = _mm256_load_si256((const __m256i*)lo);
      c1[b] = _mm256_load_si256((const __m256i*)hi);
      c2[b] = _mm256_set1_epi32((int)tensor);
      c3[b] = _mm256_set1_epi32(0x5ca1e5);
    }
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      const __m256i vk0 = _mm256_set1_epi32((int)k0), vk1 = _mm256_set1_epi32((int)k1);
      for (int b = 0; b < kBlocks; ++b) {
        __m256i hi0, lo0, hi1, lo1;
        mulhilo8(c0[b], M0, &hi0, &lo0);
        mulhilo8(c2[b], M1, &hi1, &lo1);
        c0[b] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[b]), vk0);
        c2[b] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[b]), vk1);
        c1[b] = lo1;
        c3[b] = lo0;
      }
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    for (int b = 0; b < kBlocks; ++b) {
      _mm256_store_si256((__m256i*)(X + g + 8 * b), c0[b]);
      _mm256_store_si256((__m256i*)(Y + g + 8 * b), c1[b]);
      _mm256_store_si256((__m256i*)(Z + g + 8 * b), c2[b]);
      _mm256_store_si256((__m256i*)(W + g + 8 * b), c3[b]);
    }
  }
  MMK_BOX_MULLER_LOOP
}

// AVX-512 version: 16 groups per vector. The high and low halves of the even- and odd-lane products are
// interleaved back by one two-source permute each (instead of a shift and a blend), and each round's pair of
// XORs is one three-input vpternlogd; the Box-Muller loop is the same source again, compiled 16 wide without
// contraction. About 1.6-1.8x the AVX2 tile's throughput on a Zen 4 core (0.94-1.17 against 1.47-2.12 ns per
// normal, the two measured side by side; the VM's clock varied between runs), bit-identical to it.
MMK_TARGET_AVX512 static inline void mulhilo16(__m512i a, __m512i m, __m512i* hi, __m512i* lo) {
  const __m512i pe = _mm512_mul_epu32(a, m);                         // 64-bit products of lanes 0,2,..,14
  const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // lanes 1,3,..,15
  const __m512i odd_hi = _mm512_setr_epi32(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  const __m512i even_lo = _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
  *hi = _mm512_permutex2var_epi32(pe, odd_hi, po);
  *lo = _mm512_permutex2var_epi32(pe, even_lo, po);
}

MMK_TARGET_AVX512 void normals_tile_avx512(uint64_t seed, uint32_t tensor, uint64_t g0, float* z) {
  alignas(64) uint32_t X[kTile / 4], Y[kTile / 4], Z[kTile / 4], W[kTile / 4];
  const __m512i M0 = _mm512_set1_epi32((int)0xD2511F53u), M1 = _mm512_set1_epi32((int)0xCD9E8D57u);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  constexpr int kBlocks = 4;  // independent blocks through the rounds together, as in the AVX2 tile
  for (int g = 0; g < kTile / 4; g += 16 * kBlocks) {
    __m512i c0[kBlocks], c1[kBlocks], c2[kBlocks], c3[kBlocks];
    for (int b = 0; b < kBlocks; ++b) {
      const uint64_t base = g0 + (uint64_t)(g + 16 * b);
      const __m512i lo = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)base), lane);
      const __m512i hi = _mm512_set1_epi32((int)(uint32_t)(base >> 32));
      // the group counter's high word, plus one in the lanes where the low word wrapped past 2^32
      const __mmask16 wrapped = _mm512_cmplt_epu32_mask(lo, _mm512_set1_epi32((int)(uint32_t)base));
      c0[b] = lo;
      c1[b] = _mm512_mask_add_epi32(hi, wrapped, hi, _mm512_set1_epi32(1));
      c2[b] = _mm512_set1_epi32((int)tensor);
      c3[b] = _mm512_set1_epi32(0x5ca1e5);
    }
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      const __m512i vk0 = _mm512_set1_epi32((int)k0), vk1 = _mm512_set1_epi32((int)k1);
      for (int b = 0; b < kBlocks; ++b) {
        __m512i hi0, lo0, hi1, lo1;
        mulhilo16(c0[b], M0, &hi0, &lo0);
        mulhilo16(c2[b], M1, &hi1, &lo1);
        c0[b] = _mm512_ternarylogic_epi32(hi1, c1[b], vk0, 0x96);  // 0x96: a ^ b ^ c
        c2[b] = _mm512_ternarylogic_epi32(hi0, c3[b], vk1, 0x96);
        c1[b] = lo1;
        c3[b] = lo0;
      }
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    for (int b = 0; b < kBlocks; ++b) {
      _mm512_store_si512(X + g + 16 * b, c0[b]);
      _mm512_store_si512(Y + g + 16 * b, c1[b]);
      _mm512_store_si512(Z + g + 16 * b, c2[b]);
      _mm512_store_si512(W + g + 16 * b, c3[b]);
    }
  }
  MMK_BOX_MULLER_LOOP
}

void normals_tile(uint64_t seed, uint32_t tensor, uint64_t g0, float* z) {
  if (isa::avx512()) {
    normals_tile_avx512(seed, tensor, g0, z);
  } else if (isa::avx2()) {
    normals_tile_avx2(seed, tensor, g0, z);
  } else {
    normals_tile_generic(seed, tensor, g0, z);
  }
}

// fp32 arithmetic for fp16/bf16/fp32 tensors, fp64 for fp64 tensors
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Stores v rounded to nearest in T, saturated to T's finite range: a finite gradient times a finite coeff
// (plus noise) stays finite (fp16 tops out at 65504).
template <typename T>
inline T store_sat(acc_t<T> v) {
  const acc_t<T> m = static_cast<acc_t<T>>(static_cast<double>(std::numeric_limits<T>::max()));
  v = v > m ? m : (v < -m ? -m : v);
  return static_cast<T>(v);
}

// Exponent field and its lowest bit per dtype (all ones in the field: Inf or NaN).
template <typename T> struct Bits;
template <> struct Bits<float> { using U = uint32_t; static constexpr U exp = 0x7f800000u, low = 0x00800000u; };
template <> struct Bits<double> {
  using U = uint64_t;
  static constexpr U exp = 0x7ff0000000000000ull, low = 0x0010000000000000ull;
};
template <> struct Bits<c10::Half> { using U = uint16_t; static constexpr U exp = 0x7c00u, low = 0x0400u; };
template <> struct Bits<c10::BFloat16> { using U = uint16_t; static constexpr U exp = 0x7f80u, low = 0x0080u; };

// Raw bits of one element: (bits & exp) + lowest exponent bit reaches the sign bit exactly when the exponent
// is all ones (Inf or NaN), which adds and ORs find without a compare-and-branch, so the loop vectorises.
template <typename T>
__attribute__((always_inline)) inline typename Bits<T>::U nonfinite_bits(const T* p) {
  using U = typename Bits<T>::U;
  U b;
  std::memcpy(&b, p, sizeof(U));
  return (U)((b & Bits<T>::exp) + Bits<T>::low);
}

// noise=None in one pass: p <- p*coeff, saturated for finite inputs (a finite gradient stays finite), the
// plain product for NaN/Inf inputs (what `g *= k` gives); returns whether the range held NaN/Inf. With
// |coeff| <= 1 a finite product cannot exceed its input, so the saturation is compiled out (Saturate=false):
// the loop is then a load, an OR, a multiply and a store per element, as `g *= k`.
template <bool Saturate, typename T>
__attribute__((always_inline)) inline bool scale_flag_body(T* p, int64_t n, double coeff) {
  using U = typename Bits<T>::U;
  using A = acc_t<T>;
  constexpr U sign = (U)(Bits<T>::exp + Bits<T>::low);
  const A c = static_cast<A>(coeff);
  const A m = static_cast<A>(static_cast<double>(std::numeric_limits<T>::max()));
  U any = 0;
  for (int64_t i = 0; i < n; ++i) {
    const U e = nonfinite_bits(p + i);
    any |= e;
    const A v = static_cast<A>(p[i]) * c;
    if constexpr (Saturate) {
      const A s = v > m ? m : (v < -m ? -m : v);
      p[i] = static_cast<T>((e & sign) ? v : s);
    } else {
      p[i] = static_cast<T>(v);
    }
  }
  return (any & sign) != 0;
}

// The same loop compiled for AVX2, picked at run time as for the noise tiles; there is no FMA in it, so
// both versions round alike.
template <bool Saturate, typename T>
__attribute__((target("avx2"))) bool scale_flag_avx2(T* p, int64_t n, double coeff) {
  return scale_flag_body<Saturate>(p, n, coeff);
}
template <bool Saturate, typename T>
bool scale_flag_generic(T* p, int64_t n, double coeff) { return scale_flag_body<Saturate>(p, n, coeff); }

// fp32, the common case, written out: four vectors per iteration with the exponent test on the loaded
// registers. The compiler's version of scale_flag_body (one vector per iteration, each element loaded twice)
// ran about 25% behind torch._foreach_mul_ at 2x ResNet-18 (22M fp32, 1 thread). Same rounding (one
// multiply, no FMA) and the same saturation rule as scale_flag_body.
template <bool Saturate>
__attribute__((target("avx2"), always_inline)) inline void scale_flag8(float* q, __m256 vc, __m256i& any) {
  const __m256 x = _mm256_loadu_ps(q);
  // sign bit set exactly where the exponent is all ones (NaN/Inf), as nonfinite_bits
  const __m256i e = _mm256_add_epi32(_mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7f800000)),
                                     _mm256_set1_epi32(0x00800000));
  any = _mm256_or_si256(any, e);
  __m256 v = _mm256_mul_ps(x, vc);
  if constexpr (Saturate) {
    const __m256 m = _mm256_set1_ps(std::numeric_limits<float>::max());
    const __m256 s = _mm256_min_ps(_mm256_max_ps(v, _mm256_sub_ps(_mm256_setzero_ps(), m)), m);
    v = _mm256_blendv_ps(s, v, _mm256_castsi256_ps(e));  // NaN/Inf inputs: the plain product
  }
  _mm256_storeu_ps(q, v);
}

template <bool Saturate>
__attribute__((target("avx2"))) bool scale_flag_avx2_f32(float* p, int64_t n, double coeff) {
  const __m256 vc = _mm256_set1_ps(static_cast<float>(coeff));
  __m256i any = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    // 1 KB ahead: measured to help a little at 1 thread; a prefetch past the tensor's end cannot fault
    _mm_prefetch(reinterpret_cast<const char*>(p + i) + 1024, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + i) + 1088, _MM_HINT_T0);
    scale_flag8<Saturate>(p + i, vc, any);
    scale_flag8<Saturate>(p + i + 8, vc, any);
    scale_flag8<Saturate>(p + i + 16, vc, any);
    scale_flag8<Saturate>(p + i + 24, vc, any);
  }
  for (; i + 8 <= n; i += 8) scale_flag8<Saturate>(p + i, vc, any);
  const bool bad = _mm256_movemask_ps(_mm256_castsi256_ps(any)) != 0;
  return (i < n && scale_flag_body<Saturate>(p + i, n - i, coeff)) || bad;
}

// AVX-512: sixteen floats per vector, four vectors per iteration; NaN/Inf is an all-ones exponent, found as
// the unsigned maximum of the exponent fields reaching 0x7f800000 (two operations per vector), and the tail
// is one masked load and store instead of a scalar loop. No software prefetch: at 2x ResNet-18 w64 (22M fp32,
// 1 thread, Zen 4) the AVX2 loop's 1 KB-ahead prefetch made this loop 0.74-0.82x torch._foreach_mul_, without
// it 0.89-1.03x (the AVX2 loop: 0.77-0.89x), interleaved runs.
template <bool Saturate>
MMK_TARGET_AVX512 inline void scale_flag16(float* q, __m512 vc, __m512i& top, __mmask16 m = 0xffff) {
  __m512 x = _mm512_maskz_loadu_ps(m, q);
  // Keeps x in a register: GCC otherwise folds the load into both the AND and the multiply (two loads per
  // vector), which ran 10% behind a plain load-multiply-store loop even on L1-resident data (Zen 4).
  __asm__("" : "+v"(x));
  const __m512i e = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7f800000));
  top = _mm512_max_epu32(top, e);
  __m512 v = _mm512_mul_ps(x, vc);
  if constexpr (Saturate) {
    const __m512 big = _mm512_set1_ps(std::numeric_limits<float>::max());
    const __m512 s = _mm512_min_ps(_mm512_max_ps(v, _mm512_sub_ps(_mm512_setzero_ps(), big)), big);
    const __mmask16 finite = _mm512_cmpneq_epi32_mask(e, _mm512_set1_epi32(0x7f800000));
    v = _mm512_mask_blend_ps(finite, v, s);  // NaN/Inf inputs: the plain product
  }
  _mm512_mask_storeu_ps(q, m, v);
}

template <bool Saturate>
MMK_TARGET_AVX512 bool scale_flag_avx512_f32(float* p, int64_t n, double coeff) {
  const __m512 vc = _mm512_set1_ps(static_cast<float>(coeff));
  __m512i top = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    scale_flag16<Saturate>(p + i, vc, top);
    scale_flag16<Saturate>(p + i + 16, vc, top);
    scale_flag16<Saturate>(p + i + 32, vc, top);
    scale_flag16<Saturate>(p + i + 48, vc, top);
  }
  for (; i + 16 <= n; i += 16) scale_flag16<Saturate>(p + i, vc, top);
  if (i < n) scale_flag16<Saturate>(p + i, vc, top, (__mmask16)((1u << (n - i)) - 1));
  return _mm512_reduce_max_epu32(top) == 0x7f800000u;
}

template <typename T>
bool scale_flag(T* p, int64_t n, double coeff) {
  if constexpr (std::is_same_v<T, float>) {
    if (isa::avx512())
      return std::fabs(coeff) <= 1.0 ? scale_flag_avx512_f32<false>(p, n, coeff)
                                     : scale_flag_avx512_f32<true>(p, n, coeff);
    if (isa::avx2())
      return std::fabs(coeff) <= 1.0 ? scale_flag_avx2_f32<false>(p, n, coeff) : scale_flag_avx2_f32<true>(p, n, coeff);
  }
  if (std::fabs(coeff) <= 1.0)
    return isa::avx2() ? scale_flag_avx2<false>(p, n, coeff) : scale_flag_generic<false>(p, n, coeff);
  return isa::avx2() ? scale_flag_avx2<true>(p, n, coeff) : scale_flag_generic<true>(p, n, coeff);
}

struct Partial {
  double s1 = 0, s2 = 0, chk = 0;
};

template <typename T>
__attribute__((always_inline)) inline Partial shifted_sums_body(const T* p, int64_t n, double shift) {
  // 8 independent lanes: the adds vectorise without reassociating anything.
  double s1[8] = {0}, s2[8] = {0}, chk[8] = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) {
      const double d = static_cast<double>(static_cast<acc_t<T>>(p[i + l])) - shift;
      s1[l] += d;
      s2[l] += d * d;
      chk[l] += d * 0.0;  // NaN iff some element is NaN or +-Inf
    }
  }
  for (; i < n; ++i) {
    const double d = static_cast<double>(static_cast<acc_t<T>>(p[i])) - shift;
    s1[0] += d;
    s2[0] += d * d;
    chk[0] += d * 0.0;
  }
  Partial r;
  for (int l = 0; l < 8; ++l) {
    r.s1 += s1[l];
    r.s2 += s2[l];
    r.chk += chk[l];
  }
  return r;
}

template <typename T>
Partial shifted_sums_generic(const T* p, int64_t n, double shift) { return shifted_sums_body(p, n, shift); }
template <typename T>
__attribute__((target("avx2"))) Partial shifted_sums_avx2(const T* p, int64_t n, double shift) {
  return shifted_sums_body(p, n, shift);
}

// fp32 written out: the same eight lanes in the same order as shifted_sums_body (lanes 0-3 in `lo`, 4-7 in
// `hi`), so the sums are bit-identical to the portable loop's; NaN/Inf come from the exponent bits (as in
// scale_flag8) instead of a third sum. The compiler's SSE2 version of the loop above ran at 4.4 GB/s, a
// third of the 1-thread read bandwidth, and this pass reads every gradient once before the noise pass.
__attribute__((target("avx2"))) Partial shifted_sums_avx2_f32(const float* p, int64_t n, double shift) {
  const __m256d sh = _mm256_set1_pd(shift);
  __m256d s1lo = _mm256_setzero_pd(), s1hi = _mm256_setzero_pd(), s2lo = _mm256_setzero_pd(),
          s2hi = _mm256_setzero_pd();
  __m256i any = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(p + i);
    any = _mm256_or_si256(any, _mm256_add_epi32(_mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7f800000)),
                                                _mm256_set1_epi32(0x00800000)));
    const __m256d dlo = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)), sh);
    const __m256d dhi = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)), sh);
    s1lo = _mm256_add_pd(s1lo, dlo);
    s1hi = _mm256_add_pd(s1hi, dhi);
    s2lo = _mm256_add_pd(s2lo, _mm256_mul_pd(dlo, dlo));  // no FMA: the portable loop's rounding
    s2hi = _mm256_add_pd(s2hi, _mm256_mul_pd(dhi, dhi));
  }
  alignas(32) double s1[8], s2[8];
  _mm256_store_pd(s1, s1lo);
  _mm256_store_pd(s1 + 4, s1hi);
  _mm256_store_pd(s2, s2lo);
  _mm256_store_pd(s2 + 4, s2hi);
  double chk0 = _mm256_movemask_ps(_mm256_castsi256_ps(any)) != 0 ? std::numeric_limits<double>::quiet_NaN() : 0.0;
  for (; i < n; ++i) {
    const double d = static_cast<double>(p[i]) - shift;
    s1[0] += d;
    s2[0] += d * d;
    chk0 += d * 0.0;
  }
  Partial r;
  for (int l = 0; l < 8; ++l) {
    r.s1 += s1[l];
    r.s2 += s2[l];
  }
  r.chk = chk0;
  return r;
}

template <typename T>
Partial shifted_sums(const T* p, int64_t n, double shift) {
  if (!isa::avx2()) return shifted_sums_generic(p, n, shift);
  if constexpr (std::is_same_v<T, float>) return shifted_sums_avx2_f32(p, n, shift);
  return shifted_sums_avx2(p, n, shift);
}

// g*coeff + sd*z on elements [begin, end) of list entry `tensor`; z[k] is the normal of element begin+k.
template <typename T>
__attribute__((always_inline)) inline void scale_add_noise_body(T* p, int64_t begin, int64_t end, double coeff, float sd, uint64_t seed, uint32_t tensor) {
  using A = acc_t<T>;
  const A c = static_cast<A>(coeff);
  alignas(64) float z[kTile];
  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    const int n = (int)std::min<int64_t>(kTile, end - t0);
    normals_tile(seed, tensor, (uint64_t)(t0 / 4), z);
    for (int k = 0; k < n; ++k) {
      const A x = static_cast<A>(p[t0 + k]);
      if constexpr (std::is_same_v<A, float>) {
        p[t0 + k] = store_sat<T>(fadd(fmul(x, c), fmul(sd, z[k])));  // no FMA: the CUDA kernel's rounding
      } else {
        p[t0 + k] = store_sat<T>(x * c + static_cast<double>(fmul(sd, z[k])));
      }
    }
  }
}

// The same loop compiled for AVX2 (no FMA enabled, so it rounds as the portable one): the multiply-adds of
// the gradient then run eight wide beside the vector noise tiles.
template <typename T>
__attribute__((target("avx2"))) void scale_add_noise_avx2(T* p, int64_t begin, int64_t end, double coeff, float sd,
                                                          uint64_t seed, uint32_t tensor) {
  scale_add_noise_body(p, begin, end, coeff, sd, seed, tensor);
}
template <typename T>
MMK_TARGET_AVX512 void scale_add_noise_avx512(T* p, int64_t begin, int64_t end, double coeff, float sd,
                                              uint64_t seed, uint32_t tensor) {
  scale_add_noise_body(p, begin, end, coeff, sd, seed, tensor);
}
template <typename T>
void scale_add_noise(T* p, int64_t begin, int64_t end, double coeff, float sd, uint64_t seed, uint32_t tensor) {
  if (isa::avx512()) return scale_add_noise_avx512(p, begin, end, coeff, sd, seed, tensor);
  if (isa::avx2()) return scale_add_noise_avx2(p, begin, end, coeff, sd, seed, tensor);
  scale_add_noise_body(p, begin, end, coeff, sd, seed, tensor);
}

#define MMK_DISPATCH_GRAD_TYPES(dtype, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "scale_grads_", __VA_ARGS__)

at::Tensor scale_grads_cpu(at::TensorList tensors, const at::Tensor& coeff, const std::optional<at::Tensor>& seed) {
  check_scale_grads_inputs(tensors, coeff, seed, c10::DeviceType::CPU);
  const int64_t n = (int64_t)tensors.size();
  const double c = coeff.item<double>();  // a CPU scalar: no device sync
  const bool coeff_ok = std::isfinite(c);
  auto flags = at::full({n}, !coeff_ok, at::TensorOptions().dtype(at::kBool));
  if (!coeff_ok) return flags;
  bool* bad = flags.data_ptr<bool>();
  std::vector<int64_t> numel(n), bytes(n);
  for (int64_t i = 0; i < n; ++i) {
    numel[i] = tensors[i].numel();
    bytes[i] = numel[i] * (int64_t)tensors[i].element_size();
  }
  const cpu::ChunkList list(numel, kChunk);
  // A chunk writes its own slot; one relaxed store of `true` from any chunk marks the tensor.
  std::vector<uint8_t> chunk_bad(list.size(), 0);
  auto combine_flags = [&](int64_t t0, int64_t t1) {
    for (int64_t i = t0; i < t1; ++i)
      for (int64_t w = list.first(i); w < list.first(i + 1); ++w) bad[i] = bad[i] || chunk_bad[w];
  };

  if (!seed.has_value()) {
    cpu::for_each_chunk(list, [&](const cpu::Chunk& ch, int64_t w) {
      MMK_DISPATCH_GRAD_TYPES(tensors[ch.tensor].scalar_type(), [&] {
        chunk_bad[w] = scale_flag(tensors[ch.tensor].data_ptr<scalar_t>() + ch.begin, ch.end - ch.begin, c);
      });
    });
    combine_flags(0, n);
    return flags;
  }

  const uint64_t seed_v = (uint64_t)seed->item<int64_t>();
  // Sums are shifted by each tensor's first element: a one-pass variance cancels when |mean| >> std.
  std::vector<double> shift(n, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    if (numel[i] == 0) continue;
    MMK_DISPATCH_GRAD_TYPES(tensors[i].scalar_type(), [&] {
      shift[i] = static_cast<double>(static_cast<acc_t<scalar_t>>(tensors[i].const_data_ptr<scalar_t>()[0]));
    });
    if (!std::isfinite(shift[i])) shift[i] = 0.0;  // the tensor is flagged anyway
  }
  std::vector<Partial> part(list.size());
  std::vector<float> sd(n, 0.f);
  cpu::two_pass(
      list, bytes, cpu::cache_window_bytes(),
      [&](const cpu::Chunk& ch, int64_t w) {
        MMK_DISPATCH_GRAD_TYPES(tensors[ch.tensor].scalar_type(), [&] {
          const auto* p = tensors[ch.tensor].const_data_ptr<scalar_t>();
          part[w] = shifted_sums(p + ch.begin, ch.end - ch.begin, shift[ch.tensor]);
        });
      },
      [&](int64_t t0, int64_t t1) {
        for (int64_t i = t0; i < t1; ++i) {
          double s1 = 0, s2 = 0, chk = 0;
          for (int64_t w = list.first(i); w < list.first(i + 1); ++w) {
            s1 += part[w].s1;
            s2 += part[w].s2;
            chk += part[w].chk;
          }
          const double m = (double)numel[i];
          bad[i] = !(chk == 0.0);
          // unbiased variance from shifted sums; one element has no unbiased std: 0 (documented)
          const double var = m > 1 ? std::max(0.0, (s2 - s1 * (s1 / m)) / (m - 1)) : 0.0;
          sd[i] = (float)(std::sqrt(var) + 1e-8);
        }
      },
      [&](const cpu::Chunk& ch, int64_t w) {
        if (bad[ch.tensor]) return;
        MMK_DISPATCH_GRAD_TYPES(tensors[ch.tensor].scalar_type(), [&] {
          scale_add_noise(tensors[ch.tensor].data_ptr<scalar_t>(), ch.begin, ch.end, c, sd[ch.tensor], seed_v,
                          (uint32_t)ch.tensor);
        });
      });
  return flags;
}

at::Tensor philox_normal_cpu(const at::Tensor& seed, int64_t tensor, int64_t numel, int64_t offset) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "philox_normal: seed must be a 1-element int64 tensor");
  TORCH_CHECK(numel >= 0, "philox_normal: numel must be >= 0, got ", numel);
  TORCH_CHECK(offset >= 0 && offset % 4 == 0, "philox_normal: offset must be a multiple of 4 and >= 0, got ", offset);
  auto out = at::empty({numel}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const uint64_t s = (uint64_t)seed.item<int64_t>();
  at::parallel_for(0, (numel + kTile - 1) / kTile, 64, [&](int64_t b, int64_t e) {
    alignas(64) float z[kTile];
    for (int64_t t = b; t < e; ++t) {
      const int64_t t0 = t * kTile;
      normals_tile(s, (uint32_t)tensor, (uint64_t)((offset + t0) / 4), z);
      std::copy(z, z + std::min<int64_t>(kTile, numel - t0), o + t0);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels_C, CPU, m) {
  m.impl("scale_grads_", &scale_grads_cpu);
  m.impl("philox_normal", &philox_normal_cpu);
}

}  // namespace mmk
