// Python module mmkernels._C: device dispatch for the C++/CUDA kernels. The public API and the
// torch.library registration live in Python (mmkernels/ops/*.py); this module is an implementation detail.
#include <torch/extension.h>

#include "scale_grads.h"

namespace {

bool with_cuda() {
#ifdef MMKERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

at::Tensor scale_grads(const std::vector<at::Tensor>& tensors, const at::Tensor& coeff,
                       const std::optional<at::Tensor>& seed) {
  if (coeff.is_cuda()) {
#ifdef MMKERNELS_WITH_CUDA
    return mmk::scale_grads_cuda(tensors, coeff, seed);
#else
    TORCH_CHECK(false, "mmkernels._C was built without CUDA; rebuild with a CUDA build of torch and nvcc");
#endif
  }
  return mmk::scale_grads_cpu(tensors, coeff, seed);
}

at::Tensor philox_normal(int64_t seed, int64_t tensor, int64_t numel, const std::string& device) {
  if (device.rfind("cuda", 0) == 0) {
#ifdef MMKERNELS_WITH_CUDA
    return mmk::philox_normal_cuda(seed, tensor, numel);
#else
    TORCH_CHECK(false, "mmkernels._C was built without CUDA");
#endif
  }
  return mmk::philox_normal_cpu(seed, tensor, numel);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmkernels C++/CUDA kernels (scale_grads_ multi-tensor modulation)";
  m.def("with_cuda", &with_cuda, "whether the CUDA kernels were compiled in");
  m.def("scale_grads_", &scale_grads, "in-place g <- g*coeff (+ N(0, std(g)+1e-8)); returns non-finite flags",
        pybind11::arg("tensors"), pybind11::arg("coeff"), pybind11::arg("seed"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("philox_normal", &philox_normal, "the noise stream of one list entry", pybind11::arg("seed"),
        pybind11::arg("tensor"), pybind11::arg("numel"), pybind11::arg("device") = "cpu");
}
