// Multi-tensor apply on CUDA (the pattern of apex's csrc/multi_tensor_apply.cuh): one launch covers many
// tensors of different sizes. The packer fills a kernel-argument struct (< 4 KB) with the addresses and
// sizes of up to ListCapacity<Depth> tensors and a block -> (tensor, chunk) table; each block handles one
// kChunk-element chunk of one tensor by calling the functor. A list that does not fit is split over
// several launches, a tensor whose chunks do not all fit being carried into the next one.
// A new multi-tensor op is a functor
//   __device__ void operator()(const TensorListArgs<Depth>& a, int slot, int64_t chunk, int64_t start,
//                              int64_t end, Extra... extra)
// where slot indexes a.addr[d][slot] / a.numel[slot] / a.index[slot] and [start, end) is the chunk's
// element range; the functor's own arguments (coefficients, workspaces) are its members, passed by value.
// The sizes and the chunk count are also visible to host-only C++ (the torch-facing glue sizes its
// workspaces with them); the kernel and the launchers need nvcc. CPU counterpart: csrc/multi_tensor_apply.h. CUDA toolkit headers only.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>
#include <vector>

namespace mmk {
namespace cuda {

constexpr int64_t kChunk = 65536;        // elements per block
constexpr int kBlockThreads = 512;       // threads per block
constexpr int kMaxBlocksPerLaunch = 320;

// Tensors per launch, so that the argument struct stays under the 4 KB kernel-parameter limit.
template <int Depth> struct ListCapacity;
template <> struct ListCapacity<1> { static constexpr int tensors = 72; };
template <> struct ListCapacity<2> { static constexpr int tensors = 56; };
template <> struct ListCapacity<3> { static constexpr int tensors = 44; };
template <> struct ListCapacity<4> { static constexpr int tensors = 36; };

// One list entry as the packer sees it: Depth addresses of same-sized tensors (a gradient; a parameter and
// its snapshot; ...), the element count, and where it sits in the caller's bookkeeping.
template <int Depth>
struct TensorRef {
  void* addr[Depth];
  int64_t numel;       // > 0
  int32_t index;       // position in the caller's list (statistic slot, noise counter)
  int32_t chunk_base;  // first slot of this tensor in a caller's per-chunk workspace
};

template <int Depth>
struct TensorListArgs {
  static constexpr int kTensors = ListCapacity<Depth>::tensors;
  void* addr[Depth][kTensors];
  int64_t numel[kTensors];
  int32_t index[kTensors];
  int32_t chunk_base[kTensors];
  uint8_t block_tensor[kMaxBlocksPerLaunch];
  int32_t block_chunk[kMaxBlocksPerLaunch];
};
static_assert(sizeof(TensorListArgs<1>) < 4000 && sizeof(TensorListArgs<2>) < 4000 &&
                  sizeof(TensorListArgs<3>) < 4000 && sizeof(TensorListArgs<4>) < 4000,
              "kernel arguments must stay under 4 KB");

#if defined(__CUDACC__)
__host__ __device__
#endif
inline int64_t num_chunks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

#if defined(__CUDACC__)

template <int Depth, typename Functor, typename... Extra>
__global__ void __launch_bounds__(kBlockThreads)
    multi_tensor_kernel(const TensorListArgs<Depth> args, Functor functor, Extra... extra) {
  const int slot = args.block_tensor[blockIdx.x];
  const int64_t chunk = args.block_chunk[blockIdx.x];
  const int64_t start = chunk * kChunk;
  const int64_t end = min(start + kChunk, args.numel[slot]);
  functor(args, slot, chunk, start, end, extra...);
}

// Launches functor over every chunk of refs[begin, end) on `stream`; returns the launch status.
template <int Depth, typename Functor, typename... Extra>
cudaError_t multi_tensor_apply(const TensorRef<Depth>* refs, int64_t count, cudaStream_t stream, Functor functor,
                               Extra... extra) {
  TensorListArgs<Depth> args;
  int nt = 0, nb = 0;
  auto add_tensor = [&](const TensorRef<Depth>& t) {
    for (int d = 0; d < Depth; ++d) args.addr[d][nt] = t.addr[d];
    args.numel[nt] = t.numel;
    args.index[nt] = t.index;
    args.chunk_base[nt] = t.chunk_base;
    ++nt;
  };
  for (int64_t i = 0; i < count; ++i) {
    const int64_t chunks = num_chunks(refs[i].numel);
    add_tensor(refs[i]);
    for (int64_t c = 0; c < chunks; ++c) {
      args.block_tensor[nb] = (uint8_t)(nt - 1);
      args.block_chunk[nb] = (int32_t)c;
      ++nb;
      const bool last_chunk = c == chunks - 1;
      if (nb == kMaxBlocksPerLaunch || (nt == TensorListArgs<Depth>::kTensors && last_chunk)) {
        multi_tensor_kernel<<<nb, kBlockThreads, 0, stream>>>(args, functor, extra...);
        nb = 0;
        nt = 0;
        if (!last_chunk) add_tensor(refs[i]);  // carry the rest of this tensor into the next launch
      }
    }
  }
  if (nb > 0) multi_tensor_kernel<<<nb, kBlockThreads, 0, stream>>>(args, functor, extra...);
  return cudaGetLastError();
}

// Two multi-tensor passes where pass 2 of a tensor needs pass 1 of all its chunks (a per-tensor statistic
// or check), run window by window over consecutive whole tensors of at most window_bytes (a larger tensor
// alone): with a window of half the L2, pass 2 reads what pass 1 left in L2, so DRAM sees about one read
// and one write per element instead of two reads and a write. bytes[i]: bytes of refs[i]'s first tensor.
template <int Depth, typename Pass1, typename Pass2>
cudaError_t two_pass(const std::vector<TensorRef<Depth>>& refs, const std::vector<int64_t>& bytes,
                     int64_t window_bytes, cudaStream_t stream, Pass1 pass1, Pass2 pass2) {
  const int64_t n = (int64_t)refs.size();
  for (int64_t t0 = 0; t0 < n;) {
    int64_t t1 = t0 + 1, total = bytes[t0];
    while (t1 < n && total + bytes[t1] <= window_bytes) total += bytes[t1++];
    cudaError_t err = multi_tensor_apply<Depth>(refs.data() + t0, t1 - t0, stream, pass1);
    if (err == cudaSuccess) err = multi_tensor_apply<Depth>(refs.data() + t0, t1 - t0, stream, pass2);
    if (err != cudaSuccess) return err;
    t0 = t1;
  }
  return cudaSuccess;
}

// Half the L2 of the current device (4 MiB when it cannot be read): the window of two_pass.
inline int64_t l2_window_bytes() {
  int dev = 0, l2 = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev) != cudaSuccess ||
      l2 <= 0) {
    cudaGetLastError();  // clear the error state we caused
    return int64_t(4) << 20;
  }
  return int64_t(l2) / 2;
}

// Element access shared by the functors: 4 consecutive elements starting at i (a multiple of 4), with one
// vector load/store when the tensor's address is aligned to 4 elements, fewer at the tensor's end.
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename T>
__device__ __forceinline__ bool aligned4(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0;
}

template <typename T, typename A>
__device__ __forceinline__ void load4(const T* p, int64_t i, int64_t end, bool aligned, A* out) {
  if (aligned && i + 4 <= end) {
    const Vec4<T> v = *reinterpret_cast<const Vec4<T>*>(p + i);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = static_cast<A>(v.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = i + k < end ? static_cast<A>(p[i + k]) : A(0);
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* p, int64_t i, int64_t end, bool aligned, const T* in) {
  if (aligned && i + 4 <= end) {
    Vec4<T> v;
#pragma unroll
    for (int k = 0; k < 4; ++k) v.v[k] = in[k];
    *reinterpret_cast<Vec4<T>*>(p + i) = v;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (i + k < end) p[i + k] = in[k];
  }
}

// fp32 arithmetic for fp16/bf16/fp32 elements, fp64 for fp64
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Deterministic sum over the block (fixed shuffle tree, then the warps in order); valid in thread 0.
// smem: kBlockThreads / 32 doubles of shared memory.
__device__ inline double block_sum(double v, double* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  double total = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += smem[w];
  return total;
}

#endif  // __CUDACC__

}  // namespace cuda
}  // namespace mmk
