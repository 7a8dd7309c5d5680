// grad_scale's eager autograd path in C++ (Python: mmkernels/ops/grad_scale.py): identity forward (a view of
// x), backward = incoming gradient times the coefficient, read when the backward runs (the caller may fill
// it in place after the forward: OGM-GE computes it from the same forward's logits). Written as a C++
// autograd Function so that neither direction enters Python: at the balancers' sizes a call is host
// overhead, not arithmetic. The product is the one PyTorch's `(grad * c).to(grad.dtype)` gives: float
// (double where the gradient or the coefficient is double), rounded once; CPU gradients of a supported
// layout go through one pass of csrc/row_scale.h into a huge-page backed gradient (csrc/cpu_alloc.h: a fresh
// 51 MB output otherwise costs more in page faults than in arithmetic), everything else through that ATen
// expression.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

#include "cpu_alloc.h"
#include "row_scale.h"

namespace mmk {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

at::Tensor scale_aten(const at::Tensor& grad, const at::Tensor& coeff) {
  if (coeff.dim() == 0 && coeff.device() != grad.device()) return grad * coeff;
  // a 0-d coefficient reshaped to one element per dimension takes part in type promotion: the product is
  // formed in the wider dtype and rounded once
  std::vector<int64_t> shape(grad.dim(), 1);
  if (coeff.dim() == 1) shape[0] = coeff.size(0);
  return (grad * coeff.reshape(shape)).to(grad.scalar_type());
}

// the coefficients widened to A (exact: A is double whenever the coefficient is), read through their stride
template <typename A>
std::vector<A> coefficients(const at::Tensor& coeff) {
  const int64_t n = coeff.dim() == 0 ? 1 : coeff.size(0), stride = coeff.dim() == 0 ? 0 : coeff.stride(0);
  std::vector<A> out(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, coeff.scalar_type(), "grad_scale", [&] {
    const scalar_t* p = coeff.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<A>(p[i * stride]);
  });
  return out;
}

template <typename T, typename A>
void scale_kernel(const at::Tensor& grad, const at::Tensor& coeff, at::Tensor& out) {
  const std::vector<A> c = coefficients<A>(coeff);
  const T* g = grad.const_data_ptr<T>();
  T* o = out.mutable_data_ptr<T>();
  if (coeff.dim() == 0) {
    rowscale::scale_rows<T, A>(g, o, 1, grad.numel(), [&c](int64_t) { return c[0]; }, false);
  } else {
    const int64_t rows = grad.size(0);
    rowscale::scale_rows<T, A>(g, o, rows, rows ? grad.numel() / rows : 0, [&c](int64_t r) { return c[r]; }, false);
  }
}

at::Tensor scale_grad(const at::Tensor& grad, const at::Tensor& coeff) {
  const auto gt = grad.scalar_type(), ct = coeff.scalar_type();
  // create_graph (a differentiable backward), other devices, layouts and dtypes: the ATen expression
  if (grad.requires_grad() || !grad.device().is_cpu() || !coeff.device().is_cpu() || grad.dim() == 0 ||
      !grad.is_contiguous() || grad.layout() != at::kStrided || !float_type(gt) || !float_type(ct) ||
      (coeff.dim() == 1 && coeff.size(0) != grad.size(0)) || coeff.dim() > 1) {
    return scale_aten(grad, coeff);
  }
  at::Tensor out = cpu_alloc::empty(grad.sizes(), grad.options());
  if (gt == at::kDouble || ct == at::kDouble) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gt, "grad_scale", [&] {
      scale_kernel<scalar_t, double>(grad, coeff, out);
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gt, "grad_scale", [&] {
      scale_kernel<scalar_t, float>(grad, coeff, out);
    });
  }
  return out;
}

struct GradScaleFunction : public torch::autograd::Function<GradScaleFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& coeff) {
    // kept as a reference, not saved for backward: a saved tensor's version check would reject the in-place
    // fill that this op exists to allow
    ctx->saved_data["coeff"] = coeff;
    return x.view_as(x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return {at::Tensor(), at::Tensor()};
    return {scale_grad(grad, ctx->saved_data["coeff"].toTensor()), at::Tensor()};
  }
};

at::Tensor grad_scale(const at::Tensor& x, const at::Tensor& coeff) { return GradScaleFunction::apply(x, coeff); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmkernels_C, m) {
  // x itself (a view); its gradient is the incoming one times coeff (() or (B,)), read at backward time
  m.def("grad_scale(Tensor(a) x, Tensor coeff) -> Tensor(a)");
  // the backward's product alone: grad * coeff rounded once to grad's dtype
  m.def("grad_scale_bwd(Tensor grad, Tensor coeff) -> Tensor");
  // the cached blocks of the fresh-output allocator (csrc/cpu_alloc.h) back to the system; returns the bytes
  m.def("empty_cpu_cache() -> int", &cpu_alloc::empty_cache);
}

TORCH_LIBRARY_IMPL(mmkernels_C, CompositeImplicitAutograd, m) { m.impl("grad_scale", &grad_scale); }

TORCH_LIBRARY_IMPL(mmkernels_C, CPU, m) { m.impl("grad_scale_bwd", &scale_grad); }

}  // namespace mmk
