// CPU kernel of group_grad_stats (Python: mmkernels/ops/group_grad_stats.py): for two gradient lists a, b
// whose tensors belong to groups (one group per modality encoder), per group <a, b>, |a|^2 and |b|^2 in
// float64, in one multi-tensor pass (a functor on csrc/multi_tensor_apply.h). MMPareto needs exactly these
// three numbers per encoder: the cosine of the multimodal and unimodal gradients and the two-task min-norm
// weights. Chunk partials are combined in chunk order: the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>
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

at::Tensor group_grad_stats_cpu(at::TensorList a, at::TensorList b, at::IntArrayRef group, int64_t num_groups) {
  check_group_grad_stats_inputs(a, b, group, num_groups, c10::DeviceType::CPU);
  std::vector<int64_t> numel(a.size());
  for (size_t i = 0; i < a.size(); ++i) numel[i] = a[i].numel();
  const cpu::ChunkList list(numel, 16384);
  std::vector<std::array<double, 3>> part(list.size());
  cpu::for_each_chunk(list, [&](const cpu::Chunk& ch, int64_t w) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a[ch.tensor].scalar_type(), "group_grad_stats", [&] {
      part[w] = dot_norms(a[ch.tensor].const_data_ptr<scalar_t>() + ch.begin,
                          b[ch.tensor].const_data_ptr<scalar_t>() + ch.begin, ch.end - ch.begin);
    });
  });
  auto out = at::zeros({num_groups, 3}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t w = 0; w < list.size(); ++w)
    for (int k = 0; k < 3; ++k) o[3 * group[list[w].tensor] + k] += part[w][k];
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels_C, CPU, m) { m.impl("group_grad_stats", &group_grad_stats_cpu); }

}  // namespace mmk
