// CPU kernels of group_grad_stats and group_grad_tensor_stats (Python: mmkernels/ops/group_grad_stats.py): for
// two gradient lists a, b whose tensors belong to groups (one group per modality encoder), per group (and,
// for the second, also per tensor) <a, b>, |a|^2 and |b|^2 in float64, in one multi-tensor pass (a functor
// on csrc/multi_tensor_apply.h). MMPareto needs exactly these: per encoder, the cosine of the multimodal and
// unimodal gradients and the two-task min-norm weights; per tensor, the norms of its magnitude rule. Chunk
// partials are combined in chunk order: the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "group_grad_stats.h"
#include "multi_tensor_apply.h"

namespace mmk {
namespace {

template <typename T>
std::array<double, 3> dot_norms(const T* a, const T* b, int64_t n) {
  // 4 independent lanes: the adds vectorise without reassociating anything
  double ab[4] = {0}, aa[4] = {0}, bb[4] = {0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int l = 0; l < 4; ++l) {
      const double x = static_cast<double>(a[i + l]), y = static_cast<double>(b[i + l]);
      ab[l] += x * y;
      aa[l] += x * x;
      bb[l] += y * y;
    }
  }
  for (; i < n; ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    ab[0] += x * y;
    aa[0] += x * x;
    bb[0] += y * y;
  }
  return {(ab[0] + ab[1]) + (ab[2] + ab[3]), (aa[0] + aa[1]) + (aa[2] + aa[3]), (bb[0] + bb[1]) + (bb[2] + bb[3])};
}

// Chunk partials <a, b>, |a|^2, |b|^2 of the whole list, in chunk order (the inputs checked first).
std::vector<std::array<double, 3>> chunk_partials(at::TensorList a, at::TensorList b, const cpu::ChunkList& list) {
  std::vector<std::array<double, 3>> part(list.size());
  cpu::for_each_chunk(list, [&](const cpu::Chunk& ch, int64_t w) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a[ch.tensor].scalar_type(), "group_grad_stats", [&] {
      part[w] = dot_norms(a[ch.tensor].const_data_ptr<scalar_t>() + ch.begin,
                          b[ch.tensor].const_data_ptr<scalar_t>() + ch.begin, ch.end - ch.begin);
    });
  });
  return part;
}

cpu::ChunkList chunks_of(at::TensorList a) {
  std::vector<int64_t> numel(a.size());
  for (size_t i = 0; i < a.size(); ++i) numel[i] = a[i].numel();
  return cpu::ChunkList(numel, 16384);
}

at::Tensor group_sums(const cpu::ChunkList& list, const std::vector<std::array<double, 3>>& part,
                      at::IntArrayRef group, int64_t num_groups) {
  auto out = at::zeros({num_groups, 3}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t w = 0; w < list.size(); ++w)
    for (int k = 0; k < 3; ++k) o[3 * group[list[w].tensor] + k] += part[w][k];
  return out;
}

at::Tensor group_grad_stats_cpu(at::TensorList a, at::TensorList b, at::IntArrayRef group, int64_t num_groups) {
  check_group_grad_stats_inputs(a, b, group, num_groups, c10::DeviceType::CPU);
  cpu::ChunkList list = chunks_of(a);
  return group_sums(list, chunk_partials(a, b, list), group, num_groups);
}

// The per-group numbers and, from the same pass, the per-tensor ones (MMPareto's magnitude rule is per
// tensor): each tensor's chunks summed in chunk order.
std::tuple<at::Tensor, at::Tensor> group_grad_tensor_stats_cpu(at::TensorList a, at::TensorList b,
                                                               at::IntArrayRef group, int64_t num_groups) {
  check_group_grad_stats_inputs(a, b, group, num_groups, c10::DeviceType::CPU);
  cpu::ChunkList list = chunks_of(a);
  const auto part = chunk_partials(a, b, list);
  auto per_tensor = at::zeros({(int64_t)a.size(), 3}, at::TensorOptions().dtype(at::kDouble));
  double* t = per_tensor.data_ptr<double>();
  for (int64_t i = 0; i < list.tensors(); ++i)
    for (int64_t w = list.first(i); w < list.first(i + 1); ++w)
      for (int k = 0; k < 3; ++k) t[3 * i + k] += part[w][k];
  return {group_sums(list, part, group, num_groups), per_tensor};
}

}  // namespace

// The per-tensor variant's schema lives here (a fragment of the namespace csrc/module.cpp defines).
TORCH_LIBRARY_FRAGMENT(mmkernels_C, m) {
  // ((num_groups, 3), (len(a), 3)) float64: per group and per tensor, <a, b>, |a|^2, |b|^2.
  m.def("group_grad_tensor_stats(Tensor[] a, Tensor[] b, int[] group, int num_groups) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmkernels_C, CPU, m) {
  m.impl("group_grad_stats", &group_grad_stats_cpu);
  m.impl("group_grad_tensor_stats", &group_grad_tensor_stats_cpu);
}

}  // namespace mmk
