// Large kernel outputs are allocated through torch's allocator and then advised onto transparent huge
// pages. A fresh multi-hundred-MB buffer otherwise costs one page fault per 4 KiB on first write, which on
// a 2-core machine takes longer than the kernel itself (measured: 140 ms of a 170 ms 512 MB copy).
// Only buffers of at least 32 MiB are advised: glibc gives those their own mapping, which takes the advice
// with it when freed. A smaller buffer lives in the heap, where the advice would outlive it and apply to
// whatever other code allocates there next.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastlm {

inline at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(out.nbytes());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = end & ~(kHugePage - 1);
  constexpr uintptr_t kOwnMapping = uintptr_t(32) << 20;  // glibc's largest mmap threshold on 64-bit
  if (out.nbytes() >= kOwnMapping && last > first) {
    // Advice only: if the kernel refuses, the buffer is still valid on ordinary pages.
    (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace fastlm
