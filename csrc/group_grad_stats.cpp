// CPU kernels of group_grad_stats and group_grad_tensor_stats (Python: mmkernels/ops/group_grad_stats.py): for
// two gradient lists a, b whose tensors belong to groups (one group per modality encoder), per group (and,
// for the second, also per tensor) <a, b>, |a|^2 and |b|^2 in float64, in one multi-tensor pass (a functor
// on csrc/multi_tensor_apply.h). MMPareto needs exactly these: per encoder, the cosine of the multimodal and
// unimodal gradients and the two-task min-norm weights; per tensor, the norms of its magnitude rule. Float32
// runs through an AVX2 or AVX-512 loop where the CPU has one; every path sums in the lanes of csrc/group_grad_lanes.h,
// so they give the same bits. Chunk partials are combined in chunk order: the result does not depend on the
// thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "group_grad_lanes.h"
#include "group_grad_stats.h"
#include "multi_tensor_apply.h"

namespace mmk {
namespace {

struct Lanes3 {
  double ab[lanes::kLanes] = {0}, aa[lanes::kLanes] = {0}, bb[lanes::kLanes] = {0};
};

// Elements [begin, n) of the chunk, element i into lane i % 16.
template <typename T>
void dot_norms_portable(const T* a, const T* b, int64_t begin, int64_t n, Lanes3& s) {
  int64_t i = begin;
  for (; i + lanes::kLanes <= n; i += lanes::kLanes)
    for (int l = 0; l < lanes::kLanes; ++l) {
      const double x = static_cast<double>(a[i + l]), y = static_cast<double>(b[i + l]);
      s.ab[l] += x * y;
      s.aa[l] += x * x;
      s.bb[l] += y * y;
    }
  for (; i < n; ++i) {
    const int l = (int)(i % lanes::kLanes);
    const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    s.ab[l] += x * y;
    s.aa[l] += x * x;
    s.bb[l] += y * y;
  }
}

// Whole 16-element blocks of the chunk; returns how many elements it took.
__attribute__((target("avx2,fma"))) int64_t dot_norms_avx2(const float* a, const float* b, int64_t n, Lanes3& s) {
  __m256d ab[4], aa[4], bb[4];
  for (int k = 0; k < 4; ++k) ab[k] = aa[k] = bb[k] = _mm256_setzero_pd();
  const int64_t m = n - n % lanes::kLanes;
  for (int64_t i = 0; i < m; i += lanes::kLanes) {
    lanes::prefetch_ahead(a + i);
    lanes::prefetch_ahead(b + i);
    __m256d x[4], y[4];
    lanes::widen16(a + i, x);
    lanes::widen16(b + i, y);
    for (int k = 0; k < 4; ++k) {
      ab[k] = _mm256_fmadd_pd(x[k], y[k], ab[k]);
      aa[k] = _mm256_fmadd_pd(x[k], x[k], aa[k]);
      bb[k] = _mm256_fmadd_pd(y[k], y[k], bb[k]);
    }
  }
  lanes::store_lanes(ab, s.ab);
  lanes::store_lanes(aa, s.aa);
  lanes::store_lanes(bb, s.bb);
  return m;
}

// AVX-512: the 16 lanes are two fp64 vectors (lanes 0-7, 8-15), the same association as the AVX2 loop, and no
// software prefetch (group_grad_lanes.h). Zen 4, 1 thread, 2x ResNet-18 w96 (402 MB read), interleaved runs
// against the compiled formula: this loop 1.11-1.17x it, the AVX2 loop 0.84-0.90x with its prefetch and
// 0.90-0.97x without.
MMK_TARGET_AVX512 int64_t dot_norms_avx512(const float* a, const float* b, int64_t n, Lanes3& s) {
  __m512d ab[2], aa[2], bb[2];
  for (int k = 0; k < 2; ++k) ab[k] = aa[k] = bb[k] = _mm512_setzero_pd();
  const int64_t m = n - n % lanes::kLanes;
  for (int64_t i = 0; i < m; i += lanes::kLanes) {
    const __m512d x[2] = {_mm512_cvtps_pd(_mm256_loadu_ps(a + i)), _mm512_cvtps_pd(_mm256_loadu_ps(a + i + 8))};
    const __m512d y[2] = {_mm512_cvtps_pd(_mm256_loadu_ps(b + i)), _mm512_cvtps_pd(_mm256_loadu_ps(b + i + 8))};
    for (int k = 0; k < 2; ++k) {
      ab[k] = _mm512_fmadd_pd(x[k], y[k], ab[k]);
      aa[k] = _mm512_fmadd_pd(x[k], x[k], aa[k]);
      bb[k] = _mm512_fmadd_pd(y[k], y[k], bb[k]);
    }
  }
  lanes::store_lanes(ab, s.ab);
  lanes::store_lanes(aa, s.aa);
  lanes::store_lanes(bb, s.bb);
  return m;
}

template <typename T>
std::array<double, 3> dot_norms(const T* a, const T* b, int64_t n) {
  Lanes3 s;
  int64_t done = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (isa::avx512())
      done = dot_norms_avx512(a, b, n, s);
    else if (isa::avx2_fma())
      done = dot_norms_avx2(a, b, n, s);
  }
  dot_norms_portable(a, b, done, n, s);
  return {lanes::reduce(s.ab), lanes::reduce(s.aa), lanes::reduce(s.bb)};
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
