// CUDA kernels of group_grad_stats: a depth-2 reduction functor on multi_tensor_apply.cuh writes <a, b>,
// |a|^2, |b|^2 of each chunk (float64), the list being ordered by group so that each group's chunks are one
// contiguous run; a second tiny kernel (one block per group) sums its run in order. No atomics: the result
// is the same on every run.
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "group_grad_stats.cuh"
#include "multi_tensor_apply.cuh"

namespace mmk {
namespace cuda {
namespace {

template <typename T>
struct ChunkDotNorms {
  double* partials;
  __device__ void operator()(const TensorListArgs<2>& a, int slot, int64_t chunk, int64_t start, int64_t end) const {
    __shared__ double smem[kBlockThreads / 32];
    const T* x = static_cast<const T*>(a.addr[0][slot]);
    const T* y = static_cast<const T*>(a.addr[1][slot]);
    const bool al = aligned4<T>(x) && aligned4<T>(y);
    double ab = 0, aa = 0, bb = 0;
    for (int64_t i = start + 4 * (int64_t)threadIdx.x; i < end; i += 4 * (int64_t)blockDim.x) {
      acc_t<T> u[4], v[4];
      load4(x, i, end, al, u);  // lanes past the end load 0
      load4(y, i, end, al, v);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        ab += (double)u[k] * (double)v[k];
        aa += (double)u[k] * (double)u[k];
        bb += (double)v[k] * (double)v[k];
      }
    }
    ab = block_sum(ab, smem);
    aa = block_sum(aa, smem);
    bb = block_sum(bb, smem);
    if (threadIdx.x == 0) {
      double* p = partials + 3 * ((int64_t)a.chunk_base[slot] + chunk);
      p[0] = ab;
      p[1] = aa;
      p[2] = bb;
    }
  }
};

struct GroupRuns {
  int32_t first[kMaxGroups + 1];  // chunks of group g: [first[g], first[g + 1])
};

__global__ void __launch_bounds__(kBlockThreads) sum_group_runs(GroupRuns runs, const double* partials, double* out) {
  __shared__ double smem[kBlockThreads / 32];
  const int g = blockIdx.x;
  double s[3] = {0, 0, 0};
  for (int c = runs.first[g] + threadIdx.x; c < runs.first[g + 1]; c += blockDim.x)
    for (int k = 0; k < 3; ++k) s[k] += partials[3 * (int64_t)c + k];
  for (int k = 0; k < 3; ++k) {
    const double t = block_sum(s[k], smem);
    if (threadIdx.x == 0) out[3 * g + k] = t;
  }
}

}  // namespace

cudaError_t launch_group_grad_stats(const std::vector<PairRef>& pairs, int num_groups, double* partials, double* out,
                                    cudaStream_t stream) {
  std::vector<PairRef> sorted(pairs);
  std::stable_sort(sorted.begin(), sorted.end(), [](const PairRef& l, const PairRef& r) { return l.group < r.group; });
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
  std::vector<c10::ScalarType> dtypes;
  for (const auto& p : sorted)
    if (std::find(dtypes.begin(), dtypes.end(), p.dtype) == dtypes.end()) dtypes.push_back(p.dtype);
  for (const c10::ScalarType dtype : dtypes) {
    std::vector<TensorRef<2>> refs;
    for (size_t i = 0; i < sorted.size(); ++i)
      if (sorted[i].dtype == dtype)
        refs.push_back(TensorRef<2>{{const_cast<void*>(sorted[i].a), const_cast<void*>(sorted[i].b)}, sorted[i].numel,
                                    sorted[i].group, base[i]});
    cudaError_t err = cudaSuccess;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "group_grad_stats", [&] {
      err = multi_tensor_apply<2>(refs.data(), (int64_t)refs.size(), stream, ChunkDotNorms<scalar_t>{partials});
    });
    if (err != cudaSuccess) return err;
  }
  sum_group_runs<<<num_groups, kBlockThreads, 0, stream>>>(runs, partials, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mmk
