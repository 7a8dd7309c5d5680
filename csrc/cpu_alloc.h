// Fresh CPU outputs of the elementwise kernels (grad_scale's backward, modality_drop's forward and backward),
// backed by transparent huge pages where they are large.
//
// Why: a new tensor's memory is faulted in page by page on its first write. For a 51 MB output that is
// ~12,500 faults of 4 KiB, each zeroing a page in the kernel: on the development machine `x * 0.7` on a
// 64x64x56x56 fp32 tensor took 43.7 ms, against 7.7 ms writing into preallocated memory. Aligning the block
// to 2 MiB and madvise(MADV_HUGEPAGE) lets the kernel back it with 2 MiB pages (25 faults), which took it to
// 13.5 ms (what PyTorch's own allocator does under THP_MEM_ALLOC_ENABLE=1; the system default
// /sys/kernel/mm/transparent_hugepage/enabled = madvise gives huge pages only to regions that ask).
//
// Freed blocks are kept for reuse (a size-keyed cache, as CUDA's caching allocator does): even with huge pages
// the kernel zeroes every fresh page, so writing a new 268 MB output ran at half the rate of writing into memory
// that is already mapped (1 thread, Zen 4 EPYC: grad_scale's backward 51% of the read bandwidth, a copy into
// mapped memory 91%). A training step frees its gradient buffers and asks for the same sizes in the next step,
// which then get mapped pages. The cache holds at most MMKERNELS_CPU_CACHE_MB megabytes (default 1024; 0 turns
// it off), evicting the oldest blocks beyond that; mmkernels_C::empty_cpu_cache() returns them to the system.
//
// The tensor is an ordinary resizable CPU tensor: its storage carries this allocator, so resize_ to a larger
// size, in-place ops, autograd accumulation into .grad, pickling, .numpy() and share_memory_() behave as for
// at::empty. Blocks under 2 MiB, platforms without madvise/posix_memalign, a failed aligned allocation, and
// MMKERNELS_NO_HUGEPAGES in the environment all take PyTorch's CPU allocator (at::empty).
#pragma once
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cerrno>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mmk {
namespace cpu_alloc {

constexpr size_t kHugePage = size_t(2) << 20;

inline bool enabled() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool on = std::getenv("MMKERNELS_NO_HUGEPAGES") == nullptr;
  return on;
#else
  return false;
#endif
}

#if defined(__linux__) && defined(MADV_HUGEPAGE)
// Freed huge-page blocks, oldest first, keyed by their size (a multiple of 2 MiB).
class BlockCache {
 public:
  static BlockCache& get() {
    static BlockCache* cache = new BlockCache();  // never destroyed: tensors may be freed at interpreter exit
    return *cache;
  }
  void* take(size_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = blocks_.begin(); it != blocks_.end(); ++it) {
      if (it->second == n) {
        void* p = it->first;
        blocks_.erase(it);
        bytes_ -= n;
        return p;
      }
    }
    return nullptr;
  }
  void give(void* p, size_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    if (n > cap_) {
      std::free(p);
      return;
    }
    while (bytes_ + n > cap_) {
      std::free(blocks_.front().first);
      bytes_ -= blocks_.front().second;
      blocks_.pop_front();
    }
    blocks_.emplace_back(p, n);
    bytes_ += n;
  }
  size_t clear() {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t freed = bytes_;
    for (auto& b : blocks_) std::free(b.first);
    blocks_.clear();
    bytes_ = 0;
    return freed;
  }

 private:
  BlockCache() : cap_(cap_from_env()) {}

  // MMKERNELS_CPU_CACHE_MB: a whole number of megabytes. Anything else (a sign, a unit, a fraction, a value past
  // 2^40) warns once and keeps the default, rather than being read as 0 (cache off) or wrapping to no cap.
  static size_t cap_from_env() {
    constexpr unsigned long long kDefaultMb = 1024;
    const char* mb = std::getenv("MMKERNELS_CPU_CACHE_MB");
    if (mb == nullptr) return size_t(kDefaultMb) << 20;
    char* end = nullptr;
    errno = 0;
    const unsigned long long v = (*mb >= '0' && *mb <= '9') ? std::strtoull(mb, &end, 10) : 0;
    if (end == nullptr || *end != '\0' || errno == ERANGE || v > (1ull << 40)) {
      TORCH_WARN_ONCE("MMKERNELS_CPU_CACHE_MB='", mb, "' is not a whole number of megabytes; the CPU output ",
                      "block cache keeps its default cap of ", kDefaultMb, " MB. Set it to a number such as 512, ",
                      "or to 0 to keep no blocks.");
      return size_t(kDefaultMb) << 20;
    }
    return size_t(v) << 20;
  }
  std::mutex mu_;
  std::deque<std::pair<void*, size_t>> blocks_;
  size_t bytes_ = 0;
  const size_t cap_;
};

// The DataPtr's context: the block and its size, so that the deleter can hand it to the cache.
struct Block {
  void* p;
  size_t n;
};

inline void release_block(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  BlockCache::get().give(b->p, b->n);
  delete b;
}

struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n >= kHugePage) {
      const size_t size = (n + kHugePage - 1) / kHugePage * kHugePage;
      void* p = BlockCache::get().take(size);
      if (p == nullptr) {
        if (posix_memalign(&p, kHugePage, size) == 0) {
          // a refusal (THP disabled, an old kernel) leaves ordinary pages: the memory is valid either way
          madvise(p, size, MADV_HUGEPAGE);
        } else {
          p = nullptr;
        }
      }
      if (p != nullptr) return {p, new Block{p, size}, &release_block, c10::Device(c10::DeviceType::CPU)};
    }
    return c10::GetCPUAllocator()->allocate(n);
  }
  // blocks come from two allocators (small ones from PyTorch's), so there is no single raw deleter
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

inline c10::Allocator* huge_page_allocator() {
  static HugePageAllocator alloc;
  return &alloc;
}
#endif

// at::empty(sizes, options) for a contiguous CPU tensor; huge-page backed from 2 MiB (see above).
inline at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (enabled() && options.device().is_cpu() && !options.pinned_memory()) {
    int64_t numel = 1;
    for (const int64_t s : sizes) numel *= s;
    const size_t nbytes = size_t(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
    if (nbytes >= kHugePage) {
      return at::detail::empty_generic(sizes, huge_page_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                       c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
    }
  }
#endif
  return at::empty(sizes, options);
}

// Returns the cached blocks to the system; the number of bytes released.
inline int64_t empty_cache() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  return static_cast<int64_t>(BlockCache::get().clear());
#else
  return 0;
#endif
}

}  // namespace cpu_alloc
}  // namespace mmk
