// CPU kernel of scale_grads_ (SPEC §2.6): two OpenMP passes over a flat list of fixed-size blocks of
// every tensor — (1) shifted sums in double per block, combined per tensor in block order, (2) scale +
// Philox noise. Block partials are combined in a fixed order, so the statistics (and hence the noise
// std) do not depend on the number of threads.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "noise.h"
#include "scale_grads.h"

namespace mmk {
namespace {

constexpr int64_t kBlock = 16384;  // elements per work item; a multiple of the 4-element noise group
constexpr int kTile = 256;         // normals generated per inner batch (vectorised)

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }
inline double to_acc(double v) { return v; }
template <typename T>
inline double to_acc(T v) { return static_cast<double>(static_cast<float>(v)); }

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
  for (int g = 0; g < kTile / 4; g += 8) {
    alignas(32) uint32_t lo[8], hi[8];
    for (int l = 0; l < 8; ++l) {
      const uint64_t gg = g0 + (uint64_t)(g + l);
      lo[l] = (uint32_t)gg;
      hi[l] = (uint32_t)(gg >> 32);
    }
    __m256i c0 = _mm256_load_si256((const __m256i*)lo), c1 = _mm256_load_si256((const __m256i*)hi);
    __m256i c2 = _mm256_set1_epi32((int)tensor), c3 = _mm256_set1_epi32(0x5ca1e5);
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c0, M0, &hi0, &lo0);
      mulhilo8(c2, M1, &hi1, &lo1);
      const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32((int)k0));
      const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32((int)k1));
      c0 = n0, c1 = lo1, c2 = n2, c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    _mm256_store_si256((__m256i*)(X + g), c0);
    _mm256_store_si256((__m256i*)(Y + g), c1);
    _mm256_store_si256((__m256i*)(Z + g), c2);
    _mm256_store_si256((__m256i*)(W + g), c3);
  }
  MMK_BOX_MULLER_LOOP
}

void normals_tile(uint64_t seed, uint32_t tensor, uint64_t g0, float* z) {
  // MMKERNELS_NO_AVX2=1 forces the portable path (the tests check both give the same bits)
  static const bool avx2 = __builtin_cpu_supports("avx2") && std::getenv("MMKERNELS_NO_AVX2") == nullptr;
  if (avx2) {
    normals_tile_avx2(seed, tensor, g0, z);
  } else {
    normals_tile_generic(seed, tensor, g0, z);
  }
}

struct Partial {
  double s1 = 0, s2 = 0, chk = 0;
};

template <typename T>
Partial block_sums(const T* p, int64_t begin, int64_t end, double shift) {
  // 8 independent lanes: the adds vectorise without reassociating anything.
  double s1[8] = {0}, s2[8] = {0}, chk[8] = {0};
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    for (int l = 0; l < 8; ++l) {
      const double d = to_acc(p[i + l]) - shift;
      s1[l] += d;
      s2[l] += d * d;
      chk[l] += d * 0.0;  // NaN iff some element is NaN or +-Inf
    }
  }
  for (; i < end; ++i) {
    const double d = to_acc(p[i]) - shift;
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
constexpr double finite_max() { return static_cast<double>(std::numeric_limits<T>::max()); }

// Stores v rounded to nearest in T, saturated to T's finite range: a finite gradient plus noise must
// stay finite (fp16 tops out at 65504, and large fp16 gradients with their std added would overflow).
template <typename T, typename A>
inline T store_sat(A v) {
  const A m = static_cast<A>(finite_max<T>());
  v = v > m ? m : (v < -m ? -m : v);
  return static_cast<T>(v);
}

template <typename T>
void apply_block(T* p, int64_t begin, int64_t end, double coeff, float sd, bool noise, uint64_t seed,
                 uint32_t tensor) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const A c = static_cast<A>(coeff);
  alignas(64) float z[kTile];
  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    const int n = (int)std::min<int64_t>(kTile, end - t0);
    if (noise) {
      normals_tile(seed, tensor, (uint64_t)(t0 / 4), z);
      for (int k = 0; k < n; ++k) {
        const A x = static_cast<A>(to_f(p[t0 + k]));
        A y;
        if constexpr (std::is_same_v<A, float>) {
          y = fadd(fmul(x, c), fmul(sd, z[k]));
        } else {
          y = x * c + static_cast<double>(fmul(sd, z[k]));
        }
        p[t0 + k] = store_sat<T>(y);
      }
    } else {
      for (int k = 0; k < n; ++k) p[t0 + k] = store_sat<T>(static_cast<A>(to_f(p[t0 + k])) * c);
    }
  }
}
template <>
void apply_block<double>(double* p, int64_t begin, int64_t end, double coeff, float sd, bool noise,
                         uint64_t seed, uint32_t tensor) {
  alignas(64) float z[kTile];
  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    const int n = (int)std::min<int64_t>(kTile, end - t0);
    if (noise) normals_tile(seed, tensor, (uint64_t)(t0 / 4), z);
    for (int k = 0; k < n; ++k) {
      const double y = p[t0 + k] * coeff + (noise ? static_cast<double>(fmul(sd, z[k])) : 0.0);
      p[t0 + k] = store_sat<double>(y);
    }
  }
}
template <>
inline float to_f<double>(double v) { return static_cast<float>(v); }

#define MMK_DISPATCH(dtype, T, ...)                                             \
  switch (dtype) {                                                              \
    case at::kFloat: { using T = float; __VA_ARGS__; break; }                   \
    case at::kHalf: { using T = c10::Half; __VA_ARGS__; break; }                \
    case at::kBFloat16: { using T = c10::BFloat16; __VA_ARGS__; break; }        \
    case at::kDouble: { using T = double; __VA_ARGS__; break; }                 \
    default: TORCH_CHECK(false, "scale_grads_: unsupported dtype ", dtype);      \
  }

double shift_of(const at::Tensor& t) {
  double k = 0;
  MMK_DISPATCH(t.scalar_type(), T, { k = to_acc(static_cast<const T*>(t.const_data_ptr())[0]); })
  // A non-finite first element would poison every shifted sum; the tensor is flagged anyway.
  return std::isfinite(k) ? k : 0.0;
}

}  // namespace

at::Tensor scale_grads_cpu(const std::vector<at::Tensor>& tensors, const at::Tensor& coeff,
                           const std::optional<at::Tensor>& seed) {
  const int64_t n = (int64_t)tensors.size();
  TORCH_CHECK(coeff.numel() == 1 && coeff.is_floating_point() && coeff.device().is_cpu(),
              "scale_grads_: coeff must be a 1-element floating CPU tensor");
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "scale_grads_: tensors must be contiguous CPU tensors");
  }
  const bool noise = seed.has_value();
  uint64_t seed_v = 0;
  if (noise) {
    TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong && seed->device().is_cpu(),
                "scale_grads_: seed must be a 1-element int64 CPU tensor");
    seed_v = (uint64_t)seed->item<int64_t>();
  }
  const double c = coeff.item<double>();
  auto flags = at::zeros({n}, at::TensorOptions().dtype(at::kBool));
  // work items: (tensor, block); block partials combined per tensor in block order
  std::vector<int64_t> first(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) first[i + 1] = first[i] + (tensors[i].numel() + kBlock - 1) / kBlock;
  const int64_t items = first[n];
  std::vector<int32_t> owner(items);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t w = first[i]; w < first[i + 1]; ++w) owner[w] = (int32_t)i;
  std::vector<double> shift(n, 0.0);
  for (int64_t i = 0; i < n; ++i)
    if (tensors[i].numel() > 0) shift[i] = shift_of(tensors[i]);

  std::vector<Partial> part(items);
  at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      const auto& t = tensors[owner[w]];
      const int64_t begin = (w - first[owner[w]]) * kBlock, end = std::min(begin + kBlock, t.numel());
      MMK_DISPATCH(t.scalar_type(), T,
                   { part[w] = block_sums(static_cast<const T*>(t.const_data_ptr()), begin, end, shift[owner[w]]); })
    }
  });
  std::vector<float> sd(n, 0.f);
  std::vector<char> bad(n, 0);
  bool* fl = flags.data_ptr<bool>();
  for (int64_t i = 0; i < n; ++i) {
    double s1 = 0, s2 = 0, chk = 0;
    for (int64_t w = first[i]; w < first[i + 1]; ++w) {
      s1 += part[w].s1;
      s2 += part[w].s2;
      chk += part[w].chk;
    }
    const double m = (double)tensors[i].numel();
    bad[i] = fl[i] = !(chk == 0.0);
    // unbiased variance from shifted sums; n == 1 has no unbiased std: we use 0 (documented)
    const double var = m > 1 ? std::max(0.0, (s2 - s1 * (s1 / m)) / (m - 1)) : 0.0;
    sd[i] = (float)(std::sqrt(var) + 1e-8);
  }
  at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      const int64_t i = owner[w];
      if (bad[i]) continue;
      const auto& t = tensors[i];
      const int64_t begin = (w - first[i]) * kBlock, end = std::min(begin + kBlock, t.numel());
      MMK_DISPATCH(t.scalar_type(), T, {
        apply_block(static_cast<T*>(t.data_ptr()), begin, end, c, sd[i], noise, seed_v, (uint32_t)i);
      })
    }
  });
  return flags;
}

at::Tensor philox_normal_cpu(int64_t seed, int64_t tensor, int64_t numel) {
  auto out = at::empty({numel}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  alignas(64) float z[kTile];
  for (int64_t t0 = 0; t0 < numel; t0 += kTile) {
    normals_tile((uint64_t)seed, (uint32_t)tensor, (uint64_t)(t0 / 4), z);
    std::copy(z, z + std::min<int64_t>(kTile, numel - t0), o + t0);
  }
  return out;
}

}  // namespace mmk
