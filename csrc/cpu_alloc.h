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
// The tensor is an ordinary resizable CPU tensor: its storage carries this allocator, so resize_ to a larger
// size, in-place ops, autograd accumulation into .grad, pickling, .numpy() and share_memory_() behave as for
// at::empty. Blocks under 2 MiB, platforms without madvise/posix_memalign, a failed aligned allocation, and
// MMKERNELS_NO_HUGEPAGES in the environment all take PyTorch's CPU allocator (at::empty).
#pragma once
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>

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
struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n >= kHugePage) {
      void* p = nullptr;
      if (posix_memalign(&p, kHugePage, n) == 0) {
        // a refusal (THP disabled, an old kernel) leaves ordinary pages: the memory is valid either way
        madvise(p, n, MADV_HUGEPAGE);
        return {p, p, &std::free, c10::Device(c10::DeviceType::CPU)};
      }
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

}  // namespace cpu_alloc
}  // namespace mmk
