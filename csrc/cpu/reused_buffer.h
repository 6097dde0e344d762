// A one-slot cache for a kernel output that a training loop drops every step: the cross-entropy gradient (freed by
// optimizer.zero_grad(set_to_none=True) or `x.grad = None` before the next step makes another), BatchNorm's output
// and its input gradient (freed once the next layer's backward has used them). glibc hands such multi-MB buffers
// back to the system when they are freed, so every new one costs page faults and freshly zeroed pages. The slot
// keeps the last buffer's storage (not its tensor, so that autograd still takes the tensor over without a copy)
// and hands it out again only when nothing else holds it. Buffers larger than
// kMaxBytes are not kept: at most that much stays allocated between calls. fastlm::release_reused_buffers()
// (reused_buffer.cpp) drops every kept buffer, for a caller that wants the memory back or a benchmark that
// measures what a call allocates.
// One mutex guards every slot. It is held only to look at or swap a kept storage, never while a buffer is
// allocated or freed, and fork() takes it too (pthread_atfork): a child process never starts with it held by a
// thread the child does not have, which would leave the child's first call waiting forever.
#pragma once

#include "huge_pages.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/accumulate.h>

#include <mutex>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace fastlm {

class ReusedBuffer {
 public:
  ReusedBuffer() {
    std::lock_guard<std::mutex> lock(slots_mutex());
    registry().push_back(this);
  }
  ReusedBuffer(const ReusedBuffer&) = delete;
  ReusedBuffer& operator=(const ReusedBuffer&) = delete;

  // Drops the kept storage of every ReusedBuffer (a tensor handed out stays valid: it holds its storage).
  static void release_all() {
    std::vector<c10::Storage> dropped;  // freed after the lock is let go
    std::lock_guard<std::mutex> lock(slots_mutex());
    for (ReusedBuffer* buffer : registry()) dropped.push_back(std::exchange(buffer->kept_, c10::Storage()));
  }

  // An uninitialised contiguous tensor: the kept storage when it is free and of the right size, else a new one.
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const int64_t bytes = c10::multiply_integers(sizes) * int64_t(options.dtype().itemsize());
    {
      std::lock_guard<std::mutex> lock(slots_mutex());
      if (kept_ && kept_.use_count() == 1 && int64_t(kept_.nbytes()) == bytes && kept_.device() == options.device()) {
        return at::empty({0}, options).set_(kept_, 0, sizes);
      }
    }
    at::Tensor out = empty_on_huge_pages(sizes, options);
    c10::Storage replaced = bytes <= kMaxBytes ? out.storage() : c10::Storage();
    {
      std::lock_guard<std::mutex> lock(slots_mutex());
      std::swap(kept_, replaced);
    }
    return out;  // `replaced`, the storage kept before, is let go here, outside the lock
  }

 private:
  static constexpr int64_t kMaxBytes = int64_t(64) << 20;
  // Every ReusedBuffer (they are globals of the kernel files, alive for the whole process).
  static std::vector<ReusedBuffer*>& registry() {
    static std::vector<ReusedBuffer*> buffers;
    return buffers;
  }
  static std::mutex& slots_mutex() {
    static std::mutex& mutex = *[] {
      auto* created = new std::mutex;  // never destroyed: a fork handler may use it during exit
#if defined(__unix__) || defined(__APPLE__)
      pthread_atfork([] { slots_mutex().lock(); }, [] { slots_mutex().unlock(); }, [] { slots_mutex().unlock(); });
#endif
      return created;
    }();
    return mutex;
  }
  c10::Storage kept_;
};

}  // namespace fastlm
