// A thread's kept scratch: a thread_local buffer a kernel reuses from call to call, since a fresh buffer of its
// size is a fresh mmap, page faults included. Used by the MLP step kernels and by cross-entropy's widened,
// capped and narrowed rows.
#pragma once

#include <cstdint>
#include <vector>

namespace fastlm {

// The kept scratch of one user on this thread: Owner, any type that names the user, gives each user its own
// buffer, so that users alive at once on a thread never share one. The buffer outlives this object, but is
// handed back when the object that grew it past kMaxBytes ends: at most that much per user, thread and dtype
// stays allocated between calls (the cap ReusedBuffer has; unlike its buffers, these stay through
// fastlm::release_reused_buffers, which cannot reach other threads' memory).
template <typename T, typename Owner>
class KeptScratch {
 public:
  KeptScratch() = default;
  KeptScratch(const KeptScratch&) = delete;
  KeptScratch& operator=(const KeptScratch&) = delete;
  ~KeptScratch() {
    if (int64_t(buffer().capacity() * sizeof(T)) > kMaxBytes) std::vector<T>().swap(buffer());
  }

  std::vector<T>& buffer() const {
    thread_local std::vector<T> kept;
    return kept;
  }

 private:
  static constexpr int64_t kMaxBytes = int64_t(64) << 20;
};

}  // namespace fastlm
