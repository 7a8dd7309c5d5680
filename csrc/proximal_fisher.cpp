// CPU kernel of proximal_fisher_ (Python: mmkernels/ops/proximal_fisher.py), InfoReg's per-step work on the
// parameter gradients of each modality encoder, in one multi-tensor pass (a functor on
// csrc/multi_tensor_apply.h): the proximal pull g <- g + beta_g * (theta - theta0) toward the parameters
// theta0 at the start of the epoch (or window), and the Fisher-trace term sum_t w_t * sum(g^2) of the
// pulled gradient, per group. The released code adds the pull before it accumulates g*g, so the trace
// sees the pulled gradient. A group whose beta is 0 (not regulated this step) or NaN/Inf is not written
// and only its gradients are read. Arithmetic: fp32 (fp64 for fp64) for the pull, rounded once per op
// (no FMA; the CUDA kernel and the PyTorch reference round alike), squares summed in fp64 per chunk and
// combined in chunk order, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "multi_tensor_apply.h"
#include "noise.h"
#include "proximal_fisher.h"

namespace mmk {

namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// 4 independent fp64 lanes: the adds vectorise without reassociating anything.
template <typename T>
double sum_squares(const T* g, int64_t n) {
  double s[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int l = 0; l < 4; ++l) {
      const double x = static_cast<double>(g[i + l]);
      s[l] += x * x;
    }
  for (; i < n; ++i) {
    const double x = static_cast<double>(g[i]);
    s[0] += x * x;
  }
  return (s[0] + s[1]) + (s[2] + s[3]);
}

template <typename T>
double pull_sum_squares(T* g, const T* p, const T* p0, int64_t n, double beta) {
  using A = acc_t<T>;
  const A c = static_cast<A>(beta);
  double s[4] = {0, 0, 0, 0};
  auto one = [&](int64_t i) {
    const A x = static_cast<A>(g[i]), w = static_cast<A>(p[i]), w0 = static_cast<A>(p0[i]);
    T y;
    if constexpr (std::is_same_v<A, float>) {
      y = static_cast<T>(fadd(x, fmul(c, fadd(w, -w0))));
    } else {
      y = static_cast<T>(x + c * (w - w0));
    }
    g[i] = y;
    const double d = static_cast<double>(y);  // the trace sees the gradient as stored
    return d * d;
  };
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int l = 0; l < 4; ++l) s[l] += one(i + l);
  for (; i < n; ++i) s[0] += one(i);
  return (s[0] + s[1]) + (s[2] + s[3]);
}

at::Tensor proximal_fisher_cpu(at::TensorList grads, at::TensorList params, at::TensorList anchors,
                               const at::Tensor& beta, const at::Tensor& weights, at::IntArrayRef group) {
  check_proximal_fisher_inputs(grads, params, anchors, beta, weights, group, c10::DeviceType::CPU);
  const double* b = beta.const_data_ptr<double>();
  const double* w = weights.const_data_ptr<double>();
  const int64_t num_groups = beta.numel();
  std::vector<int64_t> numel(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) numel[i] = grads[i].numel();
  const cpu::ChunkList list(numel, 16384);
  std::vector<double> part(list.size(), 0.0);
  cpu::for_each_chunk(list, [&](const cpu::Chunk& ch, int64_t k) {
    const double bg = b[group[ch.tensor]];
    const bool pull = bg != 0.0 && std::isfinite(bg);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[ch.tensor].scalar_type(), "proximal_fisher_", [&] {
      scalar_t* g = grads[ch.tensor].data_ptr<scalar_t>() + ch.begin;
      const int64_t len = ch.end - ch.begin;
      part[k] = w[ch.tensor] * (pull ? pull_sum_squares(g, params[ch.tensor].const_data_ptr<scalar_t>() + ch.begin,
                                                        anchors[ch.tensor].const_data_ptr<scalar_t>() + ch.begin,
                                                        len, bg)
                                     : sum_squares(g, len));
    });
  });
  auto out = at::zeros({num_groups}, beta.options());
  double* o = out.data_ptr<double>();
  for (int64_t k = 0; k < list.size(); ++k) o[group[list[k].tensor]] += part[k];
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmkernels_C, m) {
  // In place: grads[i] += beta[group[i]] * (params[i] - anchors[i]) (groups whose beta is 0 or NaN/Inf are
  // not written); returns (num_groups,) float64: per group, sum_i weights[i] * sum(grads[i]^2) after the pull.
  m.def("proximal_fisher_(Tensor(a!)[] grads, Tensor[] params, Tensor[] anchors, Tensor beta, Tensor weights, "
        "int[] group) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmkernels_C, CPU, m) { m.impl("proximal_fisher_", &proximal_fisher_cpu); }

}  // namespace mmk
