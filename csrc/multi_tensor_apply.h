// Multi-tensor apply on the CPU, the counterpart of csrc/cuda/multi_tensor_apply.cuh: a list of tensors of
// mixed sizes is cut into fixed-size chunks (one work item = one chunk of one tensor) and a functor runs over
// the chunks on the OpenMP threads, in one parallel pass over the whole list. A new multi-tensor op is a
// functor `f(const Chunk&, int64_t w)` (w: the chunk's index in the list) (plus, for ops with a per-tensor statistic, a combine step and a second functor).
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

namespace mmk {
namespace cpu {

struct Chunk {
  int64_t tensor;      // position in the caller's list
  int64_t begin, end;  // element range [begin, end) of that tensor
};

class ChunkList {
 public:
  // numel[i]: elements of list entry i (0 gives no chunk); chunk: elements per work item
  ChunkList(const std::vector<int64_t>& numel, int64_t chunk) : first_(numel.size() + 1, 0) {
    for (size_t i = 0; i < numel.size(); ++i) {
      first_[i + 1] = first_[i] + (numel[i] + chunk - 1) / chunk;
      for (int64_t b = 0; b < numel[i]; b += chunk) chunks_.push_back({(int64_t)i, b, std::min(b + chunk, numel[i])});
    }
  }
  int64_t size() const { return (int64_t)chunks_.size(); }
  int64_t tensors() const { return (int64_t)first_.size() - 1; }
  const Chunk& operator[](int64_t w) const { return chunks_[w]; }
  // chunks of tensor i are [first(i), first(i + 1)), in element order
  int64_t first(int64_t i) const { return first_[i]; }

 private:
  std::vector<Chunk> chunks_;
  std::vector<int64_t> first_;
};

// f(chunk, w) for chunks w in [begin, end) of the list, spread over the threads. at::parallel_for splits a range
// the same way every time it is given the same range, so two passes over one range see the same chunks
// on the same thread (the second pass finds them in that core's cache).
template <class F>
void for_each_chunk(const ChunkList& list, int64_t begin, int64_t end, const F& f) {
  at::parallel_for(begin, end, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) f(list[w], w);
  });
}

template <class F>
void for_each_chunk(const ChunkList& list, const F& f) { for_each_chunk(list, 0, list.size(), f); }

// Bytes of the window two_pass uses: a quarter of the last-level cache (the other threads' windows and the
// output writes share it), 8 MiB when the system does not say.
inline int64_t cache_window_bytes() {
  static const int64_t bytes = [] {
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return l3 > 0 ? std::max<int64_t>(int64_t(1) << 20, l3 / 4) : int64_t(8) << 20;
  }();
  return bytes;
}

// Two passes where pass 2 of a tensor needs pass 1 of all its chunks (a per-tensor statistic or check). Run
// window by window, a window being consecutive whole tensors of at most `window_bytes` (a larger tensor
// alone), pass 2 re-reads what pass 1 has just brought into the cache, so memory sees about one read and
// one write per element rather than two reads and a write. combine(t0, t1) runs on the calling thread
// between the passes of the window holding tensors [t0, t1).
template <class P1, class Combine, class P2>
void two_pass(const ChunkList& list, const std::vector<int64_t>& bytes, int64_t window_bytes, const P1& pass1,
              const Combine& combine, const P2& pass2) {
  const int64_t n = list.tensors();
  for (int64_t t0 = 0; t0 < n;) {
    int64_t t1 = t0 + 1, total = bytes[t0];
    while (t1 < n && total + bytes[t1] <= window_bytes) total += bytes[t1++];
    for_each_chunk(list, list.first(t0), list.first(t1), pass1);
    combine(t0, t1);
    for_each_chunk(list, list.first(t0), list.first(t1), pass2);
    t0 = t1;
  }
}

// Tensors an in-place multi-tensor op writes must not share memory: a tensor listed twice (or two views
// of one buffer) would be updated twice, once from already-updated values. Ranges of contiguous tensors.
inline void check_disjoint(at::TensorList tensors, const char* op) {
  std::vector<std::pair<uintptr_t, int64_t>> spans;  // (first byte, list position)
  for (int64_t i = 0; i < (int64_t)tensors.size(); ++i)
    if (tensors[i].numel() > 0) spans.push_back({reinterpret_cast<uintptr_t>(tensors[i].const_data_ptr()), i});
  std::sort(spans.begin(), spans.end());
  for (size_t k = 1; k < spans.size(); ++k) {
    const at::Tensor& prev = tensors[spans[k - 1].second];
    const uintptr_t prev_end = spans[k - 1].first + (uintptr_t)(prev.numel() * prev.element_size());
    TORCH_CHECK(spans[k].first >= prev_end, op, ": tensors[", std::min(spans[k - 1].second, spans[k].second),
                "] and tensors[", std::max(spans[k - 1].second, spans[k].second),
                "] share memory; each tensor would be updated twice. Pass each tensor once.");
  }
}

}  // namespace cpu
}  // namespace mmk
