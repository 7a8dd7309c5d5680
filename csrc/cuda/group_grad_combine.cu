// CUDA kernel of group_grad_combine_: grads_t <- p_t * grads_t + q_t * others_t as a depth-2 functor on
// multi_tensor_apply.cuh, one launch per dtype for the whole list; the per-tensor coefficients p_t = s_t * a_g
// and q_t = s_t * b_g are formed on the device from the (G,) and (N,) tensors (no host sync, no copy). Same rounding as the CPU kernel and the PyTorch
// reference: coefficients rounded once from float64, fp32 arithmetic (fp64 for fp64) with no FMA contraction.
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "../noise.h"
#include "group_grad_combine.cuh"
#include "multi_tensor_apply.cuh"

namespace mmk {
namespace cuda {
namespace {

template <typename T>
struct CombinePair {
  const double* a;      // (G,) float64
  const double* b;      // (G,) float64
  const double* scale;  // (N,) float64 or nullptr (1)
  __device__ void operator()(const TensorListArgs<2>& args, int slot, int64_t, int64_t start, int64_t end) const {
    using A = acc_t<T>;
    T* g = static_cast<T*>(args.addr[0][slot]);
    const T* h = static_cast<const T*>(args.addr[1][slot]);
    const bool al = aligned4<T>(g) && aligned4<T>(h);
    // this op keeps no per-chunk workspace: the packer's chunk_base field carries the tensor's group
    const int grp = args.chunk_base[slot];
    const double s = scale ? scale[args.index[slot]] : 1.0;
    const A cp = static_cast<A>(__dmul_rn(s, a[grp])), cq = static_cast<A>(__dmul_rn(s, b[grp]));
    for (int64_t i = start + 4 * (int64_t)threadIdx.x; i < end; i += 4 * (int64_t)blockDim.x) {
      A x[4], y[4];
      T out[4];
      load4(g, i, end, al, x);
      load4(h, i, end, al, y);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if constexpr (std::is_same_v<A, float>) {
          out[k] = static_cast<T>(fadd(fmul(cp, x[k]), fmul(cq, y[k])));
        } else {
          out[k] = static_cast<T>(__dadd_rn(__dmul_rn(cp, x[k]), __dmul_rn(cq, y[k])));
        }
      }
      store4(g, i, end, al, out);
    }
  }
};

}  // namespace

cudaError_t launch_group_grad_combine(const std::vector<CombineRef>& refs, const double* a, const double* b,
                                      const double* scale, cudaStream_t stream) {
  std::vector<c10::ScalarType> dtypes;
  for (const auto& r : refs)
    if (std::find(dtypes.begin(), dtypes.end(), r.dtype) == dtypes.end()) dtypes.push_back(r.dtype);
  for (const c10::ScalarType dtype : dtypes) {
    std::vector<TensorRef<2>> list;
    for (const auto& r : refs)
      if (r.dtype == dtype) list.push_back(TensorRef<2>{{r.grads, const_cast<void*>(r.others)}, r.numel, r.index, r.group});
    cudaError_t err = cudaSuccess;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "group_grad_combine_", [&] {
      err = multi_tensor_apply<2>(list.data(), (int64_t)list.size(), stream, CombinePair<scalar_t>{a, b, scale});
    });
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace mmk
