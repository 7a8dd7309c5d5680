// mmkernels._C: the operator schemas of the C++/CUDA kernels, in the dispatcher namespace mmkernels_C
// (the Python custom ops live in `mmkernels`; these are the compiled kernels they call). Implementations
// register per device with TORCH_LIBRARY_IMPL: CPU in csrc/*.cpp, CUDA in csrc/cuda/*.cpp, so a call goes
// to the right kernel through the dispatcher and no code here or in Python branches on the device.
// The Python module itself is empty: importing it loads this library, which runs the registrations.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu_isa.h"

namespace {

// The vector loops the CPU kernels of this process run (csrc/cpu_isa.h), for benchmark records and tests.
std::string cpu_vector_isa() {
  if (mmk::isa::avx512()) return "avx512";
  if (mmk::isa::avx2()) return "avx2";
  return "portable";
}

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "mmkernels compiled kernels (torch.ops.mmkernels_C)",
                               -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(mmkernels_C, m) {
  // In place on every tensor: g <- g*coeff (+ std(g)-scaled Philox normals when seed is given); returns one
  // bool per tensor, true where it was left unchanged (NaN/Inf in it, or a non-finite coeff).
  m.def("scale_grads_(Tensor(a!)[] tensors, Tensor coeff, Tensor? seed) -> Tensor");
  // The standard normals that list entry `tensor` gets for `seed` (the noise stream of scale_grads_), from
  // element `offset` of that stream on (a multiple of 4: one Philox counter gives 4 normals). The offset lets
  // the tests reach counters past 2^32 without a 2^34-element tensor.
  m.def("philox_normal(Tensor seed, int tensor, int numel, int offset=0) -> Tensor");
  // In place: params[i] <- snapshots[i] + coeffs[group[i]] * (params[i] - snapshots[i]); returns one bool per
  // group, true where its coefficient was NaN/Inf and its parameters were left unchanged.
  m.def("update_scale_(Tensor(a!)[] params, Tensor[] snapshots, Tensor coeffs, int[] group) -> Tensor");
  // (num_groups, 3) float64: per group, <a, b>, |a|^2, |b|^2 summed over the tensors of that group.
  m.def("group_grad_stats(Tensor[] a, Tensor[] b, int[] group, int num_groups) -> Tensor");
  // "avx512", "avx2" or "portable": the widest vector loops the CPU kernels use in this process.
  m.def("cpu_vector_isa() -> str", &cpu_vector_isa);
}
