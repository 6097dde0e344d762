// A thread's kept scratch: a thread_local buffer a kernel reuses from call to call, since a fresh buffer of its
// size is a fresh mmap, page faults included. Used by the MLP step kernels and cross-entropy's soft cap.
#pragma once

#include <cstdint>
#include <vector>

namespace fastlm {

// Ends the life of a thread's kept scratch with the call that grew it past kMaxBytes: at most that much per
// buffer, thread and dtype stays allocated between calls (the cap ReusedBuffer has; unlike its buffers, these
// stay through fastlm::release_reused_buffers, which cannot reach other threads' memory).
template <typename T>
class ScratchCap {
 public:
  explicit ScratchCap(std::vector<T>& scratch) : scratch_(scratch) {}
  ScratchCap(const ScratchCap&) = delete;
  ScratchCap& operator=(const ScratchCap&) = delete;
  ~ScratchCap() {
    if (int64_t(scratch_.capacity() * sizeof(T)) > kMaxBytes) std::vector<T>().swap(scratch_);
  }

 private:
  static constexpr int64_t kMaxBytes = int64_t(64) << 20;
  std::vector<T>& scratch_;
};

}  // namespace fastlm
