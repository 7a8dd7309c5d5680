// CPU kernel of scale_grads_ (SPEC §2.6): two OpenMP passes over a flat list of fixed-size blocks of
// every tensor — (1) shifted sums in double per block, combined per tensor in block order, (2) scale +
// Philox noise. Block partials are combined in a fixed order, so the statistics (and hence the noise
// std) do not depend on the number of threads.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
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

// 256 normals for element groups g0 .. g0+63 of list entry `tensor`. Cloned for AVX2 so the Philox
// multiplies (vpmuludq) and the polynomials vectorise where the CPU has it; no FMA, so both clones round
// exactly like the CUDA kernel.
__attribute__((target_clones("avx2", "default"))) void normals_tile(uint64_t seed, uint32_t tensor,
                                                                       uint64_t g0, float* z) {
  uint32_t r[kTile];
  const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#pragma omp simd
  for (int g = 0; g < kTile / 4; ++g) {
    const uint64_t gg = g0 + (uint64_t)g;
    const U4 o = philox4x32_10(U4{(uint32_t)gg, (uint32_t)(gg >> 32), tensor, 0x5ca1e5u}, k0, k1);
    r[4 * g] = o.x;
    r[4 * g + 1] = o.y;
    r[4 * g + 2] = o.z;
    r[4 * g + 3] = o.w;
  }
#pragma omp simd
  for (int p = 0; p < kTile / 2; ++p) {
    float a, b;
    box_muller(r[2 * p], r[2 * p + 1], &a, &b);
    z[2 * p] = a;
    z[2 * p + 1] = b;
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
