// CUDA kernels of proximal_fisher_: a depth-3 functor (gradient, parameter, anchor) on multi_tensor_apply.cuh
// applies the proximal pull and writes each chunk's weighted sum of squares (fp64); the list is ordered by
// group so that each group's chunks are one contiguous run, and a second tiny kernel (one block per group)
// sums its run in order. No atomics: the result is the same on every run. A block whose group has beta 0
// or NaN/Inf reads the gradient only and writes nothing. Same rounding as the CPU kernel and the PyTorch
// reference: fp32 (fp64 for fp64), no FMA contraction.
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>
#include <float.h>

#include <algorithm>
#include <vector>

#include "../noise.h"
#include "multi_tensor_apply.cuh"
#include "proximal_fisher.cuh"

namespace mmk {
namespace cuda {
namespace {

struct GroupRuns {
  int32_t first[kMaxFisherGroups + 1];  // chunks of group g: [first[g], first[g + 1])
};

template <typename T>
struct PullSumSquares {
  const double* beta;
  const double* weights;
  double* partials;
  GroupRuns runs;
  __device__ void operator()(const TensorListArgs<3>& a, int slot, int64_t chunk, int64_t start, int64_t end) const {
    __shared__ double smem[kBlockThreads / 32];
    const int64_t base = (int64_t)a.chunk_base[slot];
    int g = 0;
    while (base >= runs.first[g + 1]) ++g;  // the list is ordered by group: its run holds this tensor
    const double bg = beta[g];
    const bool pull = bg != 0.0 && fabs(bg) <= DBL_MAX;
    using A = acc_t<T>;
    const A c = static_cast<A>(bg);
    T* x = static_cast<T*>(a.addr[0][slot]);
    const T* w = static_cast<const T*>(a.addr[1][slot]);
    const T* w0 = static_cast<const T*>(a.addr[2][slot]);
    const bool al = aligned4<T>(x) && aligned4<T>(w) && aligned4<T>(w0);
    double s = 0;
    for (int64_t i = start + 4 * (int64_t)threadIdx.x; i < end; i += 4 * (int64_t)blockDim.x) {
      A v[4];
      load4(x, i, end, al, v);  // lanes past the end load 0
      if (pull) {
        A p[4], p0[4];
        T out[4];
        load4(w, i, end, al, p);
        load4(w0, i, end, al, p0);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if constexpr (std::is_same_v<A, float>) {
            out[k] = static_cast<T>(fadd(v[k], fmul(c, fadd(p[k], -p0[k]))));
          } else {
            out[k] = static_cast<T>(__dadd_rn(v[k], __dmul_rn(c, __dadd_rn(p[k], -p0[k]))));
          }
          v[k] = static_cast<A>(out[k]);  // the trace sees the gradient as stored
        }
        store4(x, i, end, al, out);
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) s += (double)v[k] * (double)v[k];
    }
    s = block_sum(s, smem);
    if (threadIdx.x == 0) partials[base + chunk] = weights[a.index[slot]] * s;
  }
};

__global__ void __launch_bounds__(kBlockThreads) sum_group_runs(GroupRuns runs, const double* partials, double* out) {
  __shared__ double smem[kBlockThreads / 32];
  const int g = blockIdx.x;
  double s = 0;
  for (int c = runs.first[g] + threadIdx.x; c < runs.first[g + 1]; c += blockDim.x) s += partials[c];
  s = block_sum(s, smem);
  if (threadIdx.x == 0) out[g] = s;
}

}  // namespace

cudaError_t launch_proximal_fisher(const std::vector<PullRef>& refs, int num_groups, const double* beta,
                                   const double* weights, double* partials, double* out, cudaStream_t stream) {
  std::vector<PullRef> sorted(refs);
  std::stable_sort(sorted.begin(), sorted.end(), [](const PullRef& l, const PullRef& r) { return l.group < r.group; });
  GroupRuns runs;
  std::vector<int32_t> base(sorted.size());
  int64_t chunks = 0;
  size_t j = 0;
  for (int g = 0; g < num_groups; ++g) {
    runs.first[g] = (int32_t)chunks;
    for (; j < sorted.size() && sorted[j].group == g; ++j) {
      base[j] = (int32_t)chunks;
      chunks += num_chunks(sorted[j].numel);
    }
  }
  runs.first[num_groups] = (int32_t)chunks;
  for (int g = num_groups + 1; g <= kMaxFisherGroups; ++g) runs.first[g] = (int32_t)chunks;
  std::vector<c10::ScalarType> dtypes;
  for (const auto& r : sorted)
    if (std::find(dtypes.begin(), dtypes.end(), r.dtype) == dtypes.end()) dtypes.push_back(r.dtype);
  for (const c10::ScalarType dtype : dtypes) {
    std::vector<TensorRef<3>> list;
    for (size_t i = 0; i < sorted.size(); ++i)
      if (sorted[i].dtype == dtype)
        list.push_back(TensorRef<3>{{sorted[i].grad, const_cast<void*>(sorted[i].param),
                                     const_cast<void*>(sorted[i].anchor)},
                                    sorted[i].numel, sorted[i].index, base[i]});
    cudaError_t err = cudaSuccess;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "proximal_fisher_", [&] {
      err = multi_tensor_apply<3>(list.data(), (int64_t)list.size(), stream,
                                  PullSumSquares<scalar_t>{beta, weights, partials, runs});
    });
    if (err != cudaSuccess) return err;
  }
  sum_group_runs<<<num_groups, kBlockThreads, 0, stream>>>(runs, partials, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mmk
