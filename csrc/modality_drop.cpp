// CPU kernels of modality_drop (Python: mmkernels/ops/modality_drop.py, which holds the rule and its reference).
// Forward: from the (B, M) uniforms u (the one torch.rand((B, M), float32, generator) the reference draws, so
// both take identical decisions for a generator state), per sample i and modality m
//   keep[i, m] = available[i, m] and u[i, m] < 1 - q[m]          (float32, as the reference compares)
//   where sample i kept none: its available modality of lowest q (first on ties) is kept,
//   factor[i, m] = keep ? scale[m] : 0,   out_m[i] = factor != 0 ? x_m[i] * factor : 0
// and the backward applies the same factor to the incoming gradients. One pass per modality over its
// features (csrc/row_scale.h: float math, double for double features, rounded once; streaming stores above
// the cache size) into huge-page backed outputs (csrc/cpu_alloc.h), with the (B, M) decisions computed once
// in front of it.
//
// `modality_drop` is the eager CPU entry: the draw and a C++ autograd Function around the two kernels, so
// neither direction enters Python (at OPM's B=64 a call is host overhead, not arithmetic). The caller checks
// every argument first; the checks here run before the draw too, so a rejected call leaves the generator as
// it was.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "cpu_alloc.h"
#include "row_scale.h"

namespace mmk {
namespace {

bool float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_features(at::TensorList xs, int64_t B, const char* what) {
  for (size_t m = 0; m < xs.size(); ++m) {
    const at::Tensor& x = xs[m];
    TORCH_CHECK(x.device().is_cpu() && x.layout() == at::kStrided && float_type(x.scalar_type()),
                "modality_drop: ", what, "[", m, "] must be a dense floating CPU tensor, got ", x.scalar_type(),
                " on ", x.device());
    TORCH_CHECK(x.dim() >= 1 && x.size(0) == B, "modality_drop: ", what, "[", m, "] must have ", B,
                " rows, got shape ", x.sizes());
  }
}

// dst_m = where(f[:, m] != 0, src_m * f[:, m], 0), each new and contiguous, shaped like src_m
std::vector<at::Tensor> apply_factor(at::TensorList srcs, const float* f, int64_t M) {
  std::vector<at::Tensor> outs;
  outs.reserve(srcs.size() + 1);
  for (int64_t m = 0; m < (int64_t)srcs.size(); ++m) {
    const at::Tensor x = srcs[m].contiguous();
    at::Tensor out = cpu_alloc::empty(x.sizes(), x.options());
    const int64_t rows = x.size(0), cols = rows ? x.numel() / rows : 0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modality_drop", [&] {
      using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      rowscale::scale_rows<scalar_t, A>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rows, cols,
                                        [f, M, m](int64_t r) { return static_cast<A>(f[r * M + m]); }, true);
    });
    outs.push_back(std::move(out));
  }
  return outs;
}

// everything but the uniforms, for B rows
void check_args(at::TensorList features, int64_t B, const at::Tensor& q, const std::optional<at::Tensor>& scale,
                const std::optional<at::Tensor>& mask) {
  const int64_t M = (int64_t)features.size();
  TORCH_CHECK(q.numel() == M && q.dim() == 1 && q.scalar_type() == at::kFloat && q.device().is_cpu(),
              "modality_drop: q must be a (", M, ",) float32 CPU tensor, got ", q.scalar_type(), " ", q.sizes());
  const bool given = scale.has_value() && scale->defined();
  TORCH_CHECK(!given || (scale->numel() == M && scale->dim() == 1 && scale->scalar_type() == at::kFloat &&
                         scale->device().is_cpu()),
              "modality_drop: scale must be a (", M, ",) float32 CPU tensor or None, got ", scale->sizes());
  check_features(features, B, "features");
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& mk = *mask;
    TORCH_CHECK(mk.dim() == 2 && mk.size(0) == B && mk.size(1) == M && mk.device().is_cpu(),
                "modality_drop: mask must be a (", B, ", ", M, ") CPU tensor, got ", mk.sizes());
  }
}

std::vector<at::Tensor> modality_drop_fwd_cpu(at::TensorList features, const at::Tensor& u, const at::Tensor& q,
                                              const std::optional<at::Tensor>& scale,
                                              const std::optional<at::Tensor>& mask) {
  const int64_t M = (int64_t)features.size();
  TORCH_CHECK(M >= 1, "modality_drop: features must hold at least one modality");
  TORCH_CHECK(u.dim() == 2 && u.size(1) == M && u.scalar_type() == at::kFloat && u.device().is_cpu(),
              "modality_drop: u must be a (B, ", M, ") float32 CPU tensor, got ", u.scalar_type(), " ", u.sizes());
  const int64_t B = u.size(0);
  check_args(features, B, q, scale, mask);
  const bool given = scale.has_value() && scale->defined();
  at::Tensor avail;  // (B, M) bool, any strides
  if (mask.has_value() && mask->defined()) avail = mask->scalar_type() == at::kBool ? *mask : mask->ne(0);
  const at::Tensor uc = u.contiguous(), qc = q.contiguous();
  const float* uv = uc.const_data_ptr<float>();
  const float* qv = qc.const_data_ptr<float>();
  std::vector<float> sv(M);
  if (given) {
    const at::Tensor sc = scale->contiguous();
    std::copy(sc.const_data_ptr<float>(), sc.const_data_ptr<float>() + M, sv.begin());
  } else {
    // the default inverted-dropout factors 1 / (1 - q), 1 where q >= 1, in the reference's float32 ops
    for (int64_t j = 0; j < M; ++j) sv[j] = 1.0f / (qv[j] < 1.0f ? 1.0f - qv[j] : 1.0f);
  }
  at::Tensor factor = at::empty({B, M}, u.options());
  float* f = factor.mutable_data_ptr<float>();
  std::vector<float> keep_below(M);
  int64_t lowest = 0;  // every modality available: the one restored is the same for every sample
  for (int64_t j = 0; j < M; ++j) {
    keep_below[j] = 1.0f - qv[j];
    if (qv[j] < qv[lowest]) lowest = j;
  }
  const bool* av = avail.defined() ? avail.const_data_ptr<bool>() : nullptr;
  const int64_t sa0 = avail.defined() ? avail.stride(0) : 0, sa1 = avail.defined() ? avail.stride(1) : 0;
  for (int64_t i = 0; i < B; ++i) {
    bool any = false;
    int64_t best = -1;
    float best_q = std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < M; ++j) {
      const bool a = av == nullptr || av[i * sa0 + j * sa1];
      const bool k = a && uv[i * M + j] < keep_below[j];
      any |= k;
      if (a && qv[j] < best_q) best = j, best_q = qv[j];
      f[i * M + j] = k ? sv[j] : 0.0f;
    }
    if (!any) {
      const int64_t r = av == nullptr ? lowest : best;
      if (r >= 0) f[i * M + r] = sv[r];
    }
  }
  std::vector<at::Tensor> outs = apply_factor(features, f, M);
  outs.push_back(factor);
  return outs;
}

std::vector<at::Tensor> modality_drop_bwd_cpu(at::TensorList grads, const at::Tensor& factor) {
  const int64_t M = (int64_t)grads.size();
  TORCH_CHECK(factor.dim() == 2 && factor.size(1) == M && factor.scalar_type() == at::kFloat &&
                  factor.device().is_cpu(),
              "modality_drop: factor must be a (B, ", M, ") float32 CPU tensor, got ", factor.sizes());
  check_features(grads, factor.size(0), "grads");
  const at::Tensor fc = factor.contiguous();
  return apply_factor(grads, fc.const_data_ptr<float>(), M);
}

// where(f != 0, g * f, 0) in the op's precision from differentiable ATen ops: the backward of a backward
// (create_graph) and gradients the kernel does not take
at::Tensor apply_factor_aten(const at::Tensor& g, const at::Tensor& f) {
  std::vector<int64_t> shape(g.dim(), 1);
  shape[0] = f.size(0);
  const at::Tensor fb = f.reshape(shape);
  const auto acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::where(fb != 0, g.to(acc) * fb.to(acc), at::zeros({}, g.options().dtype(acc))).to(g.scalar_type());
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct ModalityDropFunction : public torch::autograd::Function<ModalityDropFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList features, const at::Tensor& u,
                               const at::Tensor& q, const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& mask) {
    variable_list outs = modality_drop_fwd_cpu(features, u, q, scale, mask);
    const at::Tensor& factor = outs.back();
    ctx->save_for_backward({factor});
    ctx->mark_non_differentiable({factor});
    // an output that does not reach the loss gets a zero gradient without a pass over a zero tensor; its
    // shape and dtype are kept for that (flattened: rank, sizes..., dtype per modality)
    ctx->set_materialize_grads(false);
    std::vector<int64_t> meta;
    for (const at::Tensor& x : features) {
      meta.push_back(x.dim());
      meta.insert(meta.end(), x.sizes().begin(), x.sizes().end());
      meta.push_back(static_cast<int64_t>(x.scalar_type()));
    }
    ctx->saved_data["meta"] = std::move(meta);
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor factor = ctx->get_saved_variables()[0];
    const int64_t M = factor.size(1);
    bool plain = true;  // every gradient defined and none needing a graph: one kernel call
    for (int64_t m = 0; m < M; ++m) plain = plain && grads[m].defined() && !grads[m].requires_grad();
    variable_list dx;
    if (plain) {
      dx = modality_drop_bwd_cpu(at::TensorList(grads.data(), M), factor);
    } else {
      const auto meta = ctx->saved_data["meta"].toIntVector();
      size_t p = 0;
      for (int64_t m = 0; m < M; ++m) {
        const int64_t rank = meta[p];
        const at::IntArrayRef sizes(meta.data() + p + 1, rank);
        const auto dtype = static_cast<at::ScalarType>(meta[p + 1 + rank]);
        p += rank + 2;
        const at::Tensor& g = grads[m];
        if (!g.defined()) {
          dx.push_back(at::zeros(sizes, factor.options().dtype(dtype)));
        } else if (g.requires_grad()) {
          dx.push_back(apply_factor_aten(g, factor.select(1, m)));
        } else {
          dx.push_back(std::move(modality_drop_bwd_cpu({g}, factor.narrow(1, m, 1))[0]));
        }
      }
    }
    dx.resize(M + 4);  // no gradient for u, q, scale, mask
    return dx;
  }
};

// the eager entry: checks, the one draw of the (B, M) uniforms, then the Function
std::vector<at::Tensor> modality_drop_cpu(at::TensorList features, const at::Tensor& q,
                                          const std::optional<at::Tensor>& scale,
                                          const std::optional<at::Tensor>& mask,
                                          std::optional<at::Generator> generator) {
  const int64_t M = (int64_t)features.size();
  TORCH_CHECK(M >= 1, "modality_drop: features must hold at least one modality");
  TORCH_CHECK(features[0].dim() >= 1, "modality_drop: features[0] must have a batch dimension (B, ...)");
  const int64_t B = features[0].size(0);
  check_args(features, B, q, scale, mask);
  const at::Tensor u = at::rand({B, M}, std::move(generator), features[0].options().dtype(at::kFloat));
  return ModalityDropFunction::apply(features, u, q, scale, mask);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmkernels_C, m) {
  // outputs (one per modality, contiguous) followed by the (B, M) float32 factor applied (0 = dropped/missing)
  m.def("modality_drop_fwd(Tensor[] features, Tensor u, Tensor q, Tensor? scale, Tensor? mask) -> Tensor[]");
  // grads[m] times factor[:, m] (exact zeros where it is 0)
  m.def("modality_drop_bwd(Tensor[] grads, Tensor factor) -> Tensor[]");
  // eager CPU calls: the draw u = rand((B, M), generator) and modality_drop_fwd with its backward attached
  m.def("modality_drop(Tensor[] features, Tensor q, Tensor? scale, Tensor? mask, Generator? generator) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mmkernels_C, CPU, m) {
  m.impl("modality_drop_fwd", &modality_drop_fwd_cpu);
  m.impl("modality_drop_bwd", &modality_drop_bwd_cpu);
}

// Called from the op's own autograd (the eager Function and the registered custom op): no autograd here.
TORCH_LIBRARY_IMPL(mmkernels_C, Autograd, m) {
  m.impl("modality_drop_fwd", torch::CppFunction::makeFallthrough());
  m.impl("modality_drop_bwd", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(mmkernels_C, CompositeImplicitAutograd, m) { m.impl("modality_drop", &modality_drop_cpu); }

}  // namespace mmk
