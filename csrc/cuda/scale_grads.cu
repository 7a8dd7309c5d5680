// CUDA kernels of scale_grads_ (SPEC §2.6) in the multi-tensor-apply pattern: the addresses, sizes and
// dtypes of up to kMaxTensors tensors and a block -> (tensor, chunk) table travel in the kernel argument
// struct (< 4 KB), so one launch covers many tensors of mixed shapes and dtypes; each block handles one
// 64K-element chunk of one tensor.
//   pass 1 (stats): per chunk, sums of (x - x0) and (x - x0)^2 in double (x0 = the tensor's first element:
//     the shift keeps the one-pass variance from cancelling when |mean| >> std) and a finiteness check;
//     the last block of each tensor (atomic ticket) combines that tensor's chunk partials in chunk order,
//     so the std is deterministic (bit-identical noise for the same seed) without a third launch.
//   pass 2 (apply): g <- g*coeff + (std + 1e-8) * z, z from csrc/noise.h (same bits as the CPU kernel);
//     flagged (NaN/Inf) tensors are skipped.
// Only CUDA toolkit headers: this file compiles standalone (tools/cuda_check.sh); the glue is in
// scale_grads_glue.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <float.h>

#include <utility>
#include <vector>

#include "../noise.h"
#include "scale_grads.cuh"

namespace mmk {
namespace cuda {
namespace {

constexpr int kMaxTensors = 72;
constexpr int kMaxBlocks = 320;
constexpr int kThreads = 512;

struct Batch {
  void* ptr[kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t index[kMaxTensors];       // list position
  int32_t chunk_base[kMaxTensors];  // first partial slot of the tensor
  uint8_t dtype[kMaxTensors];
  uint8_t aligned[kMaxTensors];  // pointer aligned to 4 elements: vector loads/stores
  uint8_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};
static_assert(sizeof(Batch) <= 4000, "kernel arguments must stay under 4 KB");

// v clamped to [-m, m]; NaN passes through (as on the CPU and in torch.clamp), unlike fminf/fmaxf.
template <typename A>
__device__ __forceinline__ A sat(A v, A m) { return v > m ? m : (v < -m ? -m : v); }

template <typename T>
struct Traits;
template <>
struct Traits<float> {
  using acc = float;
  using vec = float4;
  __device__ static float to(float v) { return v; }
  __device__ static float from(float v) { return sat(v, FLT_MAX); }
};
template <>
struct Traits<__half> {
  using acc = float;
  using vec = uint2;
  __device__ static float to(__half v) { return __half2float(v); }
  // saturate: 65504 is the largest finite fp16; a finite gradient plus noise stays finite
  __device__ static __half from(float v) { return __float2half_rn(sat(v, 65504.f)); }
};
template <>
struct Traits<__nv_bfloat16> {
  using acc = float;
  using vec = uint2;
  __device__ static float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from(float v) {
    const float m = 3.38953139e38f;  // largest finite bf16
    return __float2bfloat16_rn(sat(v, m));
  }
};
template <>
struct Traits<double> {
  using acc = double;
  using vec = double2;  // unused: 4 doubles are moved as two double2
  __device__ static double to(double v) { return v; }
  __device__ static double from(double v) { return sat(v, DBL_MAX); }
};

__device__ __forceinline__ bool nonfinite(float v) { return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u; }
__device__ __forceinline__ bool nonfinite(double v) {
  return (__double_as_longlong(v) & 0x7ff0000000000000ll) == 0x7ff0000000000000ll;
}

// 4 consecutive elements starting at i (i a multiple of 4), fewer at the tensor's end.
template <typename T>
__device__ __forceinline__ void load4(const T* p, int64_t i, int64_t end, bool aligned, typename Traits<T>::acc* v) {
  if (aligned && i + 4 <= end) {
    T tmp[4];
    if constexpr (sizeof(T) == 8) {
      reinterpret_cast<double2*>(tmp)[0] = reinterpret_cast<const double2*>(p + i)[0];
      reinterpret_cast<double2*>(tmp)[1] = reinterpret_cast<const double2*>(p + i)[1];
    } else {
      *reinterpret_cast<typename Traits<T>::vec*>(tmp) = *reinterpret_cast<const typename Traits<T>::vec*>(p + i);
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = Traits<T>::to(tmp[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = i + k < end ? Traits<T>::to(p[i + k]) : typename Traits<T>::acc(0);
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* p, int64_t i, int64_t end, bool aligned, const typename Traits<T>::acc* v) {
  T tmp[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) tmp[k] = Traits<T>::from(v[k]);
  if (aligned && i + 4 <= end) {
    if constexpr (sizeof(T) == 8) {
      reinterpret_cast<double2*>(p + i)[0] = reinterpret_cast<double2*>(tmp)[0];
      reinterpret_cast<double2*>(p + i)[1] = reinterpret_cast<double2*>(tmp)[1];
    } else {
      *reinterpret_cast<typename Traits<T>::vec*>(p + i) = *reinterpret_cast<typename Traits<T>::vec*>(tmp);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (i + k < end) p[i + k] = tmp[k];
  }
}

// Deterministic block sum (fixed shuffle tree, then fixed order over warps).
__device__ double block_sum(double v, double* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  double total = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += smem[w];
  return total;  // valid in thread 0
}

template <typename T>
__device__ void chunk_sums(const T* p, int64_t start, int64_t end, bool aligned, double shift, double* s1, double* s2,
                           bool* bad) {
  using A = typename Traits<T>::acc;
  for (int64_t i = start + 4 * (int64_t)threadIdx.x; i < end; i += 4 * (int64_t)blockDim.x) {
    A v[4];
    load4(p, i, end, aligned, v);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (i + k < end) {
        *bad |= nonfinite(v[k]);
        const double d = (double)v[k] - shift;
        *s1 += d;
        *s2 += d * d;
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ double first_value(const void* p) {
  return (double)Traits<T>::to(*static_cast<const T*>(p));
}

__global__ void __launch_bounds__(kThreads) stats_kernel(Batch b, double* partials, unsigned int* counters,
                                                         float* stdv, bool* flags) {
  __shared__ double smem[kThreads / 32];
  __shared__ bool last;
  const int slot = b.block_tensor[blockIdx.x];
  const int chunk = b.block_chunk[blockIdx.x];
  const int64_t numel = b.numel[slot];
  const int64_t start = (int64_t)chunk * kChunk;
  const int64_t end = min(start + kChunk, numel);
  const bool aligned = b.aligned[slot];
  double s1 = 0, s2 = 0, shift = 0;
  bool bad = false;
  switch (b.dtype[slot]) {
    case kF32: shift = first_value<float>(b.ptr[slot]); break;
    case kF16: shift = first_value<__half>(b.ptr[slot]); break;
    case kBF16: shift = first_value<__nv_bfloat16>(b.ptr[slot]); break;
    default: shift = first_value<double>(b.ptr[slot]); break;
  }
  if (nonfinite(shift)) shift = 0;  // the tensor is flagged anyway; keep the sums meaningful elsewhere
  switch (b.dtype[slot]) {
    case kF32: chunk_sums(static_cast<const float*>(b.ptr[slot]), start, end, aligned, shift, &s1, &s2, &bad); break;
    case kF16: chunk_sums(static_cast<const __half*>(b.ptr[slot]), start, end, aligned, shift, &s1, &s2, &bad); break;
    case kBF16:
      chunk_sums(static_cast<const __nv_bfloat16*>(b.ptr[slot]), start, end, aligned, shift, &s1, &s2, &bad);
      break;
    default: chunk_sums(static_cast<const double*>(b.ptr[slot]), start, end, aligned, shift, &s1, &s2, &bad); break;
  }
  const int any_bad = __syncthreads_or(bad);
  s1 = block_sum(s1, smem);
  s2 = block_sum(s2, smem);
  const int idx = b.index[slot];
  const int nchunks = (int)num_chunks(numel);
  double* part = partials + 3 * (int64_t)(b.chunk_base[slot]);
  if (threadIdx.x == 0) {
    part[3 * chunk] = s1;
    part[3 * chunk + 1] = s2;
    part[3 * chunk + 2] = any_bad ? 1.0 : 0.0;
    __threadfence();  // publish the partial before taking a ticket
    last = atomicAdd(&counters[idx], 1u) == (unsigned)(nchunks - 1);
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  // The last block of this tensor combines all its chunks in a fixed order: deterministic std.
  double t1 = 0, t2 = 0, tb = 0;
  for (int c = threadIdx.x; c < nchunks; c += blockDim.x) {
    t1 += __ldcg(part + 3 * c);
    t2 += __ldcg(part + 3 * c + 1);
    tb += __ldcg(part + 3 * c + 2);
  }
  t1 = block_sum(t1, smem);
  t2 = block_sum(t2, smem);
  tb = block_sum(tb, smem);
  if (threadIdx.x == 0) {
    const double m = (double)numel;
    // unbiased variance; one element has none: std = 0 (documented in mmkernels/ops/scale_grads.py)
    const double var = m > 1 ? fmax(0.0, (t2 - t1 * (t1 / m)) / (m - 1)) : 0.0;
    stdv[idx] = (float)(sqrt(var) + 1e-8);
    flags[idx] = tb != 0.0;
  }
}

template <typename T>
__device__ void apply_chunk(T* p, int64_t start, int64_t end, bool aligned, double coeff, float sd, bool noise,
                            uint64_t seed, uint32_t idx) {
  using A = typename Traits<T>::acc;
  const A c = (A)coeff;
  for (int64_t i = start + 4 * (int64_t)threadIdx.x; i < end; i += 4 * (int64_t)blockDim.x) {
    A v[4];
    load4(p, i, end, aligned, v);
    if (noise) {
      float z[4];
      normal4(seed, idx, (uint64_t)(i >> 2), z);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if constexpr (sizeof(A) == 8) {
          v[k] = v[k] * c + (double)fmul(sd, z[k]);
        } else {
          v[k] = fadd(fmul(v[k], c), fmul(sd, z[k]));
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if constexpr (sizeof(A) == 8) {
          v[k] = v[k] * c;
        } else {
          v[k] = fmul(v[k], c);
        }
      }
    }
    store4(p, i, end, aligned, v);
  }
}

__global__ void __launch_bounds__(kThreads) apply_kernel(Batch b, const double* coeff, const int64_t* seed,
                                                         const float* stdv, const bool* flags) {
  const int slot = b.block_tensor[blockIdx.x];
  const int idx = b.index[slot];
  if (flags[idx]) return;  // NaN/Inf: left unchanged
  const int64_t start = (int64_t)b.block_chunk[blockIdx.x] * kChunk;
  const int64_t end = min(start + kChunk, b.numel[slot]);
  const bool noise = seed != nullptr;
  const uint64_t s = noise ? (uint64_t)*seed : 0;
  const float sd = noise ? stdv[idx] : 0.f;
  const double c = *coeff;
  const bool al = b.aligned[slot];
  switch (b.dtype[slot]) {
    case kF32: apply_chunk(static_cast<float*>(b.ptr[slot]), start, end, al, c, sd, noise, s, idx); break;
    case kF16: apply_chunk(static_cast<__half*>(b.ptr[slot]), start, end, al, c, sd, noise, s, idx); break;
    case kBF16: apply_chunk(static_cast<__nv_bfloat16*>(b.ptr[slot]), start, end, al, c, sd, noise, s, idx); break;
    default: apply_chunk(static_cast<double*>(b.ptr[slot]), start, end, al, c, sd, noise, s, idx); break;
  }
}

__global__ void philox_normal_kernel(uint64_t seed, uint32_t tensor, int64_t numel, float* out) {
  const int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (4 * g >= numel) return;
  float z[4];
  normal4(seed, tensor, (uint64_t)g, z);
  for (int k = 0; k < 4; ++k)
    if (4 * g + k < numel) out[4 * g + k] = z[k];
}

int elem_size(int dtype) { return dtype == kF32 ? 4 : dtype == kF64 ? 8 : 2; }

}  // namespace

int launch_scale_grads(const TensorDesc* tensors, int n, const double* coeff, const int64_t* seed, double* partials,
                       unsigned int* counters, float* stdv, bool* flags, void* stream_) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  // Pack the list into batches that fit the argument struct. A tensor whose chunks do not all fit is
  // carried into the next batch (same list index and partial slots, so the ticket counting still works).
  // Pass 1 for every batch must precede pass 2 (the std needs all chunks), so batches are built once and
  // launched twice.
  std::vector<std::pair<Batch, int>> batches;  // (arguments, blocks)
  Batch b;
  int nt = 0, nb = 0;
  int64_t chunk_base = 0;
  auto begin_tensor = [&](const TensorDesc& t, int64_t base) {
    b.ptr[nt] = t.ptr;
    b.numel[nt] = t.numel;
    b.index[nt] = t.index;
    b.chunk_base[nt] = (int32_t)base;
    b.dtype[nt] = (uint8_t)t.dtype;
    b.aligned[nt] = (reinterpret_cast<uintptr_t>(t.ptr) % (4 * elem_size(t.dtype))) == 0;
    ++nt;
  };
  for (int i = 0; i < n; ++i) {
    const TensorDesc& t = tensors[i];
    const int64_t chunks = num_chunks(t.numel);
    begin_tensor(t, chunk_base);
    for (int64_t c = 0; c < chunks; ++c) {
      b.block_tensor[nb] = (uint8_t)(nt - 1);
      b.block_chunk[nb] = (int32_t)c;
      ++nb;
      const bool last_chunk = c == chunks - 1;
      if (nb == kMaxBlocks || (nt == kMaxTensors && last_chunk)) {
        batches.emplace_back(b, nb);
        nb = 0;
        nt = 0;
        if (!last_chunk) begin_tensor(t, chunk_base);  // carry the rest of this tensor
      }
    }
    chunk_base += chunks;
  }
  if (nb > 0) batches.emplace_back(b, nb);
  for (const auto& [args, blocks] : batches) {
    stats_kernel<<<blocks, kThreads, 0, stream>>>(args, partials, counters, stdv, flags);
  }
  for (const auto& [args, blocks] : batches) {
    apply_kernel<<<blocks, kThreads, 0, stream>>>(args, coeff, seed, stdv, flags);
  }
  return (int)cudaGetLastError();
}

int launch_philox_normal(uint64_t seed, uint32_t tensor, int64_t numel, float* out, void* stream) {
  if (numel <= 0) return 0;
  const int64_t groups = (numel + 3) / 4;
  const int threads = 256;
  philox_normal_kernel<<<(unsigned)((groups + threads - 1) / threads), threads, 0, static_cast<cudaStream_t>(stream)>>>(
      seed, tensor, numel, out);
  return (int)cudaGetLastError();
}

}  // namespace cuda
}  // namespace mmk
