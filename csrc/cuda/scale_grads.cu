// CUDA kernels of scale_grads_ as functors on the multi-tensor apply of multi_tensor_apply.cuh (one block
// per 64K-element chunk of one tensor, many tensors per launch), one dtype per list (the glue groups the
// user's list by dtype; AT_DISPATCH picks the element type).
//   noise=None: ScaleFlagNonfinite, one read-modify-write pass: g*coeff into every tensor, and the tensors
//     that held NaN/Inf flagged from the same reads (one DRAM read and write per element).
//   noise="ge": ChunkStats sums (x - x0) and (x - x0)^2 in double per chunk (x0 = the tensor's first
//     element: the shift keeps the one-pass variance from cancelling when |mean| >> std); the last block
//     of each tensor (atomic ticket) combines its chunk partials in chunk order, so the std is
//     deterministic without a third launch. ScaleAddNoise writes g*coeff + (std + 1e-8)*z, z from
//     csrc/noise.h (the same bits as the CPU kernel).
// A non-finite coeff is caught on the device: the glue fills the flags with !isfinite(coeff); the noise
// functors skip flagged tensors and ScaleFlagNonfinite reads coeff itself, so nothing is written and no
// value is read on the host.
// Torch headers used here are the header-only c10 ones (dtype dispatch, Half, BFloat16); the tensors,
// streams and the registration are in scale_grads_glue.cpp.
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>
#include <float.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../noise.h"
#include "multi_tensor_apply.cuh"
#include "scale_grads.cuh"

namespace mmk {
namespace cuda {
namespace {

template <typename T> __device__ __forceinline__ acc_t<T> finite_max();
template <> __device__ __forceinline__ float finite_max<float>() { return FLT_MAX; }
template <> __device__ __forceinline__ double finite_max<double>() { return DBL_MAX; }
template <> __device__ __forceinline__ float finite_max<c10::Half>() { return 65504.f; }
template <> __device__ __forceinline__ float finite_max<c10::BFloat16>() { return 3.38953139e38f; }

// Rounded to nearest in T and saturated to T's finite range: a finite gradient (plus noise) stays finite.
// NaN passes through, as on the CPU.
template <typename T>
__device__ __forceinline__ T store_sat(acc_t<T> v) {
  const acc_t<T> m = finite_max<T>();
  return static_cast<T>(v > m ? m : (v < -m ? -m : v));
}

__device__ __forceinline__ bool nonfinite(float v) { return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u; }
__device__ __forceinline__ bool nonfinite(double v) {
  return (__double_as_longlong(v) & 0x7ff0000000000000ll) == 0x7ff0000000000000ll;
}

// noise=None, in one pass: every element becomes g*coeff (saturated for finite g, the plain product for
// NaN/Inf, as `g *= k`), and a block that read a NaN/Inf flags its tensor (racing stores of `true`).
template <typename T>
struct ScaleFlagNonfinite {
  bool* flags;
  const double* coeff;
  __device__ void operator()(const TensorListArgs<1>& a, int slot, int64_t, int64_t start, int64_t end) const {
    const double cd = *coeff;
    if (!(fabs(cd) <= DBL_MAX)) return;  // non-finite coeff: nothing written, every flag already set
    T* p = static_cast<T*>(a.addr[0][slot]);
    const bool al = aligned4<T>(p);
    const acc_t<T> c = static_cast<acc_t<T>>(cd);
    bool bad = false;
    for (int64_t i = start + 4 * (int64_t)threadIdx.x; i < end; i += 4 * (int64_t)blockDim.x) {
      acc_t<T> v[4];
      T out[4];
      load4(p, i, end, al, v);  // padding lanes load 0
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        acc_t<T> y;
        if constexpr (std::is_same_v<acc_t<T>, float>) {
          y = fmul(v[k], c);
        } else {
          y = v[k] * c;
        }
        const bool nf = nonfinite(v[k]);
        bad |= nf;
        out[k] = nf ? static_cast<T>(y) : store_sat<T>(y);
      }
      store4(p, i, end, al, out);
    }
    if (__syncthreads_or(bad) && threadIdx.x == 0) flags[a.index[slot]] = true;
  }
};

struct StatsWorkspace {
  double* partials;        // 3 per chunk of the whole list: shifted sum, sum of squares, non-finite count
  unsigned int* counters;  // one per list entry, zero on entry: chunks done
  float* stdv;             // one per list entry: std + 1e-8
  bool* flags;             // one per list entry
};

// noise="ge", pass 1.
template <typename T>
struct ChunkStats {
  StatsWorkspace ws;
  __device__ void operator()(const TensorListArgs<1>& a, int slot, int64_t chunk, int64_t start, int64_t end) const {
    __shared__ double smem[kBlockThreads / 32];
    __shared__ bool last;
    const T* p = static_cast<const T*>(a.addr[0][slot]);
    const bool al = aligned4<T>(p);
    const int64_t numel = a.numel[slot];
    double shift = static_cast<double>(static_cast<acc_t<T>>(p[0]));
    if (nonfinite(shift)) shift = 0;  // the tensor is flagged anyway; keeps the other sums meaningful
    double s1 = 0, s2 = 0;
    bool bad = false;
    for (int64_t i = start + 4 * (int64_t)threadIdx.x; i < end; i += 4 * (int64_t)blockDim.x) {
      acc_t<T> v[4];
      load4(p, i, end, al, v);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (i + k < end) {
          bad |= nonfinite(v[k]);
          const double d = (double)v[k] - shift;
          s1 += d;
          s2 += d * d;
        }
      }
    }
    const int any_bad = __syncthreads_or(bad);
    s1 = block_sum(s1, smem);
    s2 = block_sum(s2, smem);
    const int idx = a.index[slot];
    const int nchunks = (int)num_chunks(numel);
    double* part = ws.partials + 3 * (int64_t)a.chunk_base[slot];
    if (threadIdx.x == 0) {
      part[3 * chunk] = s1;
      part[3 * chunk + 1] = s2;
      part[3 * chunk + 2] = any_bad ? 1.0 : 0.0;
      __threadfence();  // publish the partial before taking a ticket
      last = atomicAdd(&ws.counters[idx], 1u) == (unsigned)(nchunks - 1);
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    // The last block of this tensor combines all its chunks in a fixed order: a deterministic std.
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
      ws.stdv[idx] = (float)(sqrt(var) + 1e-8);
      if (tb != 0.0) ws.flags[idx] = true;
    }
  }
};

// noise="ge", pass 2.
template <typename T>
struct ScaleAddNoise {
  StatsWorkspace ws;
  const double* coeff;
  const int64_t* seed;
  __device__ void operator()(const TensorListArgs<1>& a, int slot, int64_t, int64_t start, int64_t end) const {
    const int idx = a.index[slot];
    if (ws.flags[idx]) return;  // NaN/Inf in the tensor, or a non-finite coeff: left unchanged
    T* p = static_cast<T*>(a.addr[0][slot]);
    const bool al = aligned4<T>(p);
    using A = acc_t<T>;
    const A c = static_cast<A>(*coeff);
    const uint64_t s = (uint64_t)*seed;
    const float sd = ws.stdv[idx];
    for (int64_t i = start + 4 * (int64_t)threadIdx.x; i < end; i += 4 * (int64_t)blockDim.x) {
      A v[4];
      T out[4];
      load4(p, i, end, al, v);
      float z[4];
      normal4(s, (uint32_t)idx, (uint64_t)(i >> 2), z);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if constexpr (std::is_same_v<A, double>) {
          out[k] = store_sat<T>(v[k] * c + (double)fmul(sd, z[k]));
        } else {
          out[k] = store_sat<T>(fadd(fmul(v[k], c), fmul(sd, z[k])));  // no FMA: the CPU kernel's rounding
        }
      }
      store4(p, i, end, al, out);
    }
  }
};

__global__ void philox_normal_kernel(const int64_t* seed, uint32_t tensor, int64_t numel, int64_t first_group,
                                     float* out) {
  const int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (4 * g >= numel) return;
  float z[4];
  normal4((uint64_t)*seed, tensor, (uint64_t)(first_group + g), z);
  for (int k = 0; k < 4; ++k)
    if (4 * g + k < numel) out[4 * g + k] = z[k];
}

}  // namespace

cudaError_t launch_scale_grads(const std::vector<GradRef>& grads, const double* coeff, const int64_t* seed,
                               const ScaleGradsWorkspace& work, cudaStream_t stream) {
  const StatsWorkspace ws{work.partials, work.counters, work.stdv, work.flags};
  const int64_t window = l2_window_bytes();
  // one dtype per packed list: group the user's list by dtype, keeping each tensor's list index
  std::vector<c10::ScalarType> dtypes;
  for (const auto& g : grads)
    if (std::find(dtypes.begin(), dtypes.end(), g.dtype) == dtypes.end()) dtypes.push_back(g.dtype);
  for (const c10::ScalarType dtype : dtypes) {
    std::vector<TensorRef<1>> refs;
    std::vector<int64_t> bytes;
    for (const auto& g : grads) {
      if (g.dtype != dtype) continue;
      refs.push_back(TensorRef<1>{{g.ptr}, g.numel, g.index, g.chunk_base});
      bytes.push_back(g.numel * (int64_t)c10::elementSize(dtype));
    }
    cudaError_t err = cudaSuccess;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "scale_grads_", [&] {
      if (seed == nullptr) {
        err = multi_tensor_apply<1>(refs.data(), (int64_t)refs.size(), stream,
                                    ScaleFlagNonfinite<scalar_t>{work.flags, coeff});
      } else {
        err = two_pass<1>(refs, bytes, window, stream, ChunkStats<scalar_t>{ws},
                          ScaleAddNoise<scalar_t>{ws, coeff, seed});
      }
    });
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t launch_philox_normal(const int64_t* seed, uint32_t tensor, int64_t numel, int64_t first_group, float* out,
                                 cudaStream_t stream) {
  if (numel <= 0) return cudaSuccess;
  const int64_t groups = (numel + 3) / 4;
  const int threads = 256;
  philox_normal_kernel<<<(unsigned)((groups + threads - 1) / threads), threads, 0, stream>>>(seed, tensor, numel,
                                                                                           first_group, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mmk
