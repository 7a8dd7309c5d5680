// CUDA kernels of group_grad_stats and group_grad_tensor_stats: a depth-2 reduction functor on multi_tensor_apply.cuh writes <a, b>,
// |a|^2, |b|^2 of each chunk (float64), the list being ordered by group so that each group's chunks are one
// contiguous run; a second tiny kernel (one block per group) sums its run in order. No atomics: the result
// is the same on every run. The per-tensor variant sums each tensor's run of chunks the same way (one block per
// tensor, the runs passed as kernel arguments).
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

namespace {

// Chunk partials of every pair, the list ordered by group (stable) so each group's chunks are one run;
// first_chunk[j]: the first chunk of sorted[j].
cudaError_t launch_partials(const std::vector<PairRef>& sorted, int num_groups, double* partials, GroupRuns& runs,
                            std::vector<int32_t>& first_chunk, cudaStream_t stream) {
  first_chunk.assign(sorted.size(), 0);
  int64_t chunks = 0;
  size_t j = 0;
  for (int g = 0; g < num_groups; ++g) {
    runs.first[g] = (int32_t)chunks;
    for (; j < sorted.size() && sorted[j].group == g; ++j) {
      first_chunk[j] = (int32_t)chunks;
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
                                    sorted[i].group, first_chunk[i]});
    cudaError_t err = cudaSuccess;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "group_grad_stats", [&] {
      err = multi_tensor_apply<2>(refs.data(), (int64_t)refs.size(), stream, ChunkDotNorms<scalar_t>{partials});
    });
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

std::vector<PairRef> by_group(const std::vector<PairRef>& pairs) {
  std::vector<PairRef> sorted(pairs);
  std::stable_sort(sorted.begin(), sorted.end(), [](const PairRef& l, const PairRef& r) { return l.group < r.group; });
  return sorted;
}

// Per-tensor runs of chunks, passed as kernel arguments (no host-to-device copy): block j sums the run of
// tensor j of this launch into row[j] of the output.
constexpr int kRunsPerLaunch = 256;
struct TensorRuns {
  int32_t first[kRunsPerLaunch], count[kRunsPerLaunch], row[kRunsPerLaunch];
};
static_assert(sizeof(TensorRuns) < 4000, "kernel arguments must stay under 4 KB");

__global__ void __launch_bounds__(kBlockThreads) sum_tensor_runs(TensorRuns runs, const double* partials,
                                                                 double* out) {
  __shared__ double smem[kBlockThreads / 32];
  const int32_t first = runs.first[blockIdx.x], count = runs.count[blockIdx.x], row = runs.row[blockIdx.x];
  double s[3] = {0, 0, 0};
  for (int c = threadIdx.x; c < count; c += blockDim.x)
    for (int k = 0; k < 3; ++k) s[k] += partials[3 * ((int64_t)first + c) + k];
  for (int k = 0; k < 3; ++k) {
    const double t = block_sum(s[k], smem);
    if (threadIdx.x == 0) out[3 * (int64_t)row + k] = t;
  }
}

}  // namespace

cudaError_t launch_group_grad_stats(const std::vector<PairRef>& pairs, int num_groups, double* partials, double* out,
                                    cudaStream_t stream) {
  const std::vector<PairRef> sorted = by_group(pairs);
  GroupRuns runs;
  std::vector<int32_t> first_chunk;
  cudaError_t err = launch_partials(sorted, num_groups, partials, runs, first_chunk, stream);
  if (err != cudaSuccess) return err;
  sum_group_runs<<<num_groups, kBlockThreads, 0, stream>>>(runs, partials, out);
  return cudaGetLastError();
}

cudaError_t launch_group_grad_tensor_stats(const std::vector<PairRef>& pairs, int num_groups, double* partials,
                                           double* out, double* per_tensor, cudaStream_t stream) {
  const std::vector<PairRef> sorted = by_group(pairs);
  GroupRuns runs;
  std::vector<int32_t> first_chunk;
  cudaError_t err = launch_partials(sorted, num_groups, partials, runs, first_chunk, stream);
  if (err != cudaSuccess) return err;
  sum_group_runs<<<num_groups, kBlockThreads, 0, stream>>>(runs, partials, out);
  for (size_t j0 = 0; j0 < sorted.size(); j0 += kRunsPerLaunch) {
    TensorRuns tr;
    const size_t n = std::min(sorted.size() - j0, (size_t)kRunsPerLaunch);
    for (size_t j = 0; j < n; ++j) {
      tr.first[j] = first_chunk[j0 + j];
      tr.count[j] = (int32_t)num_chunks(sorted[j0 + j].numel);
      tr.row[j] = sorted[j0 + j].index;
    }
    sum_tensor_runs<<<(unsigned)n, kBlockThreads, 0, stream>>>(tr, partials, per_tensor);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mmk
