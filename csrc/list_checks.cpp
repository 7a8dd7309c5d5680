// One C++ pass over the tensor lists of the multi-tensor ops (mmkernels/_common.py fast_paired_groups):
// the per-tensor checks written in Python cost about 10 us a tensor, 1.2 ms for the 120 gradients of two
// ResNet-18 encoders, against a kernel of about 15 ms on one CPU thread and tens of microseconds on a GPU.
// It answers only "every check passes"; when it says no, the Python checks run and raise their message
// (naming the argument, the value and the fix). So it may be stricter than they are (it asks for contiguous
// tensors) but never looser. Only metadata and addresses are read: no device sync, any device.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace mmk {
namespace {

// flags: 1 - the first list's tensors are written in place: contiguous and pairwise disjoint;
//        2 - the second list's tensors share no memory with the first's (they are read after its writes);
//        4 - none of the first list's tensors requires grad (the caller passes it when grad mode is on);
//        8 - every tensor of every list is contiguous (the caller then hands the lists to its kernel as they
//            are, without a .contiguous() per tensor: about 0.3 us each in Python).
constexpr int64_t kWritten = 1, kApart = 2, kNoGrad = 4, kContiguous = 8;

bool float_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

using Span = std::pair<uintptr_t, uintptr_t>;  // [first byte, one past the last)

Span span_of(const at::Tensor& t) {
  const auto start = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {start, start + (uintptr_t)t.nbytes()};
}

bool lists_ok(at::TensorList a, at::TensorList b, at::TensorList c, int64_t flags) {
  if (a.empty()) return false;
  const c10::Device dev = a[0].device();
  if (dev.is_meta()) return false;
  auto plain = [&](const at::Tensor& t) {
    return t.defined() && t.layout() == at::kStrided && float_dtype(t.scalar_type()) && t.device() == dev;
  };
  for (const at::Tensor& t : a) {
    if (!plain(t) || ((flags & kNoGrad) && t.requires_grad())) return false;
    if ((flags & (kWritten | kContiguous)) && !t.is_contiguous()) return false;
  }
  for (at::TensorList other : {b, c}) {
    if (other.empty()) continue;
    if (other.size() != a.size()) return false;
    for (size_t i = 0; i < a.size(); ++i)
      if (!plain(other[i]) || other[i].scalar_type() != a[i].scalar_type() || other[i].sizes() != a[i].sizes() ||
          ((flags & kContiguous) && !other[i].is_contiguous()))
        return false;
  }
  if (!(flags & (kWritten | kApart))) return true;
  std::vector<Span> spans;
  spans.reserve(a.size());
  for (const at::Tensor& t : a)
    if (t.numel() > 0) spans.push_back(span_of(t));
  std::sort(spans.begin(), spans.end());
  for (size_t k = 1; k < spans.size(); ++k)
    if (spans[k].first < spans[k - 1].second) return false;
  if (flags & kApart) {
    // the spans are disjoint and sorted by start, so by end too: only the last one starting before t ends
    // can overlap t
    for (const at::Tensor& t : b) {
      if (t.numel() == 0) continue;
      if (!t.is_contiguous()) return false;
      const Span s = span_of(t);
      auto it = std::lower_bound(spans.begin(), spans.end(), Span{s.second, 0});
      if (it != spans.begin() && std::prev(it)->second > s.first) return false;
    }
  }
  return true;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmkernels_C, m) {
  // Whether the multi-tensor ops' argument checks all pass (flags: see list_checks.cpp); reads metadata only.
  m.def("lists_ok(Tensor[] a, Tensor[] b, Tensor[] c, int flags) -> bool", &lists_ok);
}

}  // namespace mmk
