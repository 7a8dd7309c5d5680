// CUDA kernel of update_scale_: theta <- theta0 + k_g * (theta - theta0) as a depth-2 functor (parameter,
// snapshot) on multi_tensor_apply.cuh, one launch per dtype for all groups; the slot's index is its group.
// Same rounding as the CPU kernel and the PyTorch reference: fp32 (fp64 for fp64), no FMA contraction.
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "../noise.h"
#include "multi_tensor_apply.cuh"
#include "update_scale.cuh"

namespace mmk {
namespace cuda {
namespace {

template <typename T>
struct PullToSnapshot {
  const double* coeffs;
  const bool* flags;  // a non-finite coefficient: the group is left unchanged
  __device__ void operator()(const TensorListArgs<2>& a, int slot, int64_t, int64_t start, int64_t end) const {
    const int g = a.index[slot];
    if (flags[g]) return;
    using A = acc_t<T>;
    T* p = static_cast<T*>(a.addr[0][slot]);
    const T* s = static_cast<const T*>(a.addr[1][slot]);
    const bool al = aligned4<T>(p) && aligned4<T>(s);
    const A c = static_cast<A>(coeffs[g]);
    for (int64_t i = start + 4 * (int64_t)threadIdx.x; i < end; i += 4 * (int64_t)blockDim.x) {
      A x[4], x0[4];
      T out[4];
      load4(p, i, end, al, x);
      load4(s, i, end, al, x0);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if constexpr (std::is_same_v<A, float>) {
          out[k] = static_cast<T>(fadd(x0[k], fmul(c, fadd(x[k], -x0[k]))));
        } else {
          out[k] = static_cast<T>(__dadd_rn(x0[k], __dmul_rn(c, __dadd_rn(x[k], -x0[k]))));
        }
      }
      store4(p, i, end, al, out);
    }
  }
};

}  // namespace

cudaError_t launch_update_scale(const std::vector<ParamRef>& params, const double* coeffs, const bool* flags,
                                cudaStream_t stream) {
  std::vector<c10::ScalarType> dtypes;
  for (const auto& p : params)
    if (std::find(dtypes.begin(), dtypes.end(), p.dtype) == dtypes.end()) dtypes.push_back(p.dtype);
  for (const c10::ScalarType dtype : dtypes) {
    std::vector<TensorRef<2>> refs;
    for (const auto& p : params)
      if (p.dtype == dtype) refs.push_back(TensorRef<2>{{p.param, const_cast<void*>(p.snapshot)}, p.numel, p.group, 0});
    cudaError_t err = cudaSuccess;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "update_scale_", [&] {
      err = multi_tensor_apply<2>(refs.data(), (int64_t)refs.size(), stream, PullToSnapshot<scalar_t>{coeffs, flags});
    });
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace mmk
