// CUDA on the CPU, for tests only: lets g++ compile the torch-free kernel sources (csrc/cuda/*.cu, *.cuh) as host
// C++ and run every kernel launch on the calling thread, so that the kernels' logic can be checked against
// float64 references on machines without a GPU. tests/test_cuda_emulated.py copies the sources, includes this
// header first in each .cu file and rewrites each `kernel<<<grid, block, smem, stream>>>(args...)` into
// `::cuda_on_cpu::launch(CUDA_ON_CPU_LAUNCH_SITE(kernel), [&] { kernel(args...); }, grid, block, smem, stream)`.
//
// A launch runs its blocks one after another; a block runs its threads as cooperative fibers (ucontext), each
// on a reusable stack of its own, switched only at __syncthreads() and at warp shuffles, which wait for the
// whole block or the whole warp (lane = linear thread index % 32). Each warp in turn runs as far as it can
// before the next one starts, as a GPU may run it; warps in reverse order (settings) expose other hazards.
// __shared__ variables are static storage, which the block running at the time owns. A barrier that not every
// thread of the block reaches at the same call (threads that exited or wait elsewhere), or a full-mask shuffle
// that not all 32 lanes of the warp join, aborts the launch with a cuda_on_cpu::KernelError saying where each
// thread waits; it never hangs.
// The runtime calls the sources make get emulated answers; the device has few resident blocks (settings), so
// that grid-stride loops really loop. Launches are synchronous; streams are accepted and ignored.
// Not emulated (an error where used): dynamic shared memory, shuffles with a partial mask or a width. Not
// checked: __launch_bounds__. Math is the host's libm (nvcc's --use_fast_math approximations are not reproduced).
#pragma once

// The execution-space keywords, defined before the toolkit headers: in host mode crt/host_defines.h keeps a
// keyword already defined, and would otherwise leave __shared__ without storage.
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_runtime.h>  // what nvcc includes into every .cu file; its host-side C++ API compiles under g++
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// Device bit casts that math_constants.h spells CUDART_INF_F, CUDART_NAN etc. with; host versions.
inline float __int_as_float(int bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}
inline double __longlong_as_double(long long bits) {
  double value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}
#include <math_constants.h>

// Device math intrinsics the kernels call, at the host's precision.
inline float __expf(float x) { return std::exp(x); }

// Atomics: fibers never run concurrently, so a plain read-modify-write is atomic.
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

namespace cuda_on_cpu {

// The emulated device: settings.multiprocessors * settings.blocks_per_multiprocessor blocks are resident at
// once (what launch_resident sizes its grids by). reverse_schedule runs the warps of a block, and the lanes of a
// warp, from the highest index down: a kernel whose results change with it depends on the order threads run in,
// e.g. a warp that overwrites shared memory another warp has still to read, for want of a __syncthreads().
struct Settings {
  int multiprocessors = 2;
  int blocks_per_multiprocessor = 1;
  bool reverse_schedule = false;
};
inline Settings settings;

// A kernel misused the execution model (divergent barrier or shuffle, an unsupported intrinsic) or crashed.
struct KernelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A synchronisation call in the kernel source, for the error messages.
struct Site {
  const char* call;  // "__syncthreads()", "__shfl_xor_sync", ...
  const char* file;
  int line;
  const char* function;
  bool same_call(const Site& other) const { return line == other.line && std::strcmp(file, other.file) == 0; }
};

// Where a kernel is launched from: the kernel expression, the launch's source line and function.
struct LaunchSite {
  const char* kernel;
  const char* file;
  int line;
  const char* function;
};

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;
constexpr unsigned kMaxThreadsPerBlock = 1024;

namespace detail {

inline cudaError_t last_error = cudaSuccess;  // what cudaGetLastError returns and resets

// One thread of a block: its context and stack, reused by every block that has this many threads or more.
class Fiber {
 public:
  static constexpr size_t kStackBytes = 128 << 10;

  Fiber() {
    // The lowest page stays inaccessible, so a stack overflow faults instead of corrupting its neighbour.
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    mapping_bytes_ = kStackBytes + page;
    mapping_ = mmap(nullptr, mapping_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                    -1, 0);
    if (mapping_ == MAP_FAILED) throw std::runtime_error("cuda_on_cpu: cannot map a fiber stack");
    mprotect(mapping_, page, PROT_NONE);
    if (getcontext(&context) != 0) throw std::runtime_error("cuda_on_cpu: getcontext failed");
    context.uc_stack.ss_sp = static_cast<char*>(mapping_) + page;
    context.uc_stack.ss_size = kStackBytes;
  }
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;
  ~Fiber() { munmap(mapping_, mapping_bytes_); }

  enum class State { runnable, at_barrier, at_shuffle, exited };

  ucontext_t context;
  uint3 thread_index;
  int linear_index;
  State state;
  Site site;  // the call it waits at, while at_barrier or at_shuffle

 private:
  void* mapping_;
  size_t mapping_bytes_;
};

// The lanes of a warp exchanging values: each shuffle writes into one of two buffers, alternately, so that a
// lane already at the next shuffle cannot overwrite a value a slower lane has still to read.
struct Warp {
  int size;
  int arrived;
  unsigned generation;
  uint64_t values[2][kWarpSize];
};

// Runs the blocks of a launch, one at a time, and serves the intrinsics of the thread running now.
class Runner {
 public:
  void run_block(const LaunchSite& launch, dim3 grid, dim3 block, uint3 block_index,
                 const std::function<void()>& body) {
    launch_ = &launch;
    grid_ = grid;
    block_ = block;
    block_index_ = block_index;
    body_ = &body;
    threads_ = int(block.x * block.y * block.z);
    while (int(fibers_.size()) < threads_) fibers_.push_back(std::make_unique<Fiber>());
    for (int i = 0; i < threads_; ++i) {
      Fiber& f = *fibers_[i];
      const unsigned linear = unsigned(i);
      f.thread_index = uint3{linear % block.x, linear / block.x % block.y, linear / (block.x * block.y)};
      f.linear_index = i;
      f.state = Fiber::State::runnable;
      f.context.uc_link = &scheduler_;
      makecontext(&f.context, &Runner::fiber_main, 0);
    }
    warps_.assign((threads_ + kWarpSize - 1) / kWarpSize, Warp{});
    for (size_t w = 0; w < warps_.size(); ++w) warps_[w].size = std::min(kWarpSize, threads_ - int(w) * kWarpSize);
    at_barrier_ = exited_ = 0;
    failure_.clear();
    const int warps = int(warps_.size());
    while (exited_ < threads_) {
      bool ran = false;
      for (int k = 0; k < warps; ++k) {
        const int warp = settings.reverse_schedule ? warps - 1 - k : k;
        while (run_lanes(warp)) ran = true;
      }
      if (!ran) throw KernelError(describe("deadlock: no thread can continue (a divergent barrier or shuffle)"));
    }
  }

  const uint3& thread_index() const { return fibers_[current_]->thread_index; }
  const uint3& block_index() const { return block_index_; }
  const dim3& block_dim() const { return block_; }
  const dim3& grid_dim() const { return grid_; }

  // __syncthreads(): waits until every thread of the block waits at this same call.
  void barrier(const Site& site) {
    wait(Fiber::State::at_barrier, site);
    if (++at_barrier_ == threads_) {
      for (int i = 0; i < threads_; ++i) {
        if (!fibers_[i]->site.same_call(site)) fail("the threads wait at different __syncthreads() calls");
      }
      for (int i = 0; i < threads_; ++i) fibers_[i]->state = Fiber::State::runnable;
      at_barrier_ = 0;
    }
    yield();
  }

  // A full-mask shuffle: every lane of the warp gives `value` and gets that of lane source_lane(lane).
  template <typename T, typename SourceLane>
  T shuffle(unsigned mask, T value, SourceLane source_lane, const Site& site) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t), "unsupported shuffle type");
    Fiber& self = *fibers_[current_];
    Warp& warp = warps_[self.linear_index / kWarpSize];
    const int lane = self.linear_index % kWarpSize;
    if (mask != kFullWarpMask) fail(std::string(site.call) + " with a partial mask is not emulated", site);
    if (warp.size != kWarpSize) {
      fail(std::string(site.call) + " with the full mask in a warp of " + std::to_string(warp.size) +
               " threads (the block size is not a multiple of 32)",
           site);
    }
    const unsigned buffer = warp.generation % 2;
    std::memcpy(&warp.values[buffer][lane], &value, sizeof(T));
    wait(Fiber::State::at_shuffle, site);
    if (++warp.arrived == kWarpSize) {
      const int first = self.linear_index - lane;
      for (int i = first; i < first + kWarpSize; ++i) {
        if (!fibers_[i]->site.same_call(site)) fail("the lanes of a warp wait at different shuffles");
      }
      for (int i = first; i < first + kWarpSize; ++i) fibers_[i]->state = Fiber::State::runnable;
      warp.arrived = 0;
      ++warp.generation;
    }
    yield();
    T result;
    std::memcpy(&result, &warp.values[buffer][source_lane(lane)], sizeof(T));
    return result;
  }

 private:
  static void fiber_main() {
    Runner& self = instance();
    try {
      (*self.body_)();
    } catch (const std::exception& error) {
      self.failure_ = error.what();  // the thread keeps the state it failed in, for the error message
      return;
    }
    self.fibers_[self.current_]->state = Fiber::State::exited;
    ++self.exited_;
  }  // returns to the scheduler through uc_link

  static Runner& instance();

  // Runs each runnable lane of the warp until it waits or exits; false when none could run.
  bool run_lanes(int warp) {
    const int size = warps_[warp].size;
    bool ran = false;
    for (int k = 0; k < size; ++k) {
      current_ = warp * kWarpSize + (settings.reverse_schedule ? size - 1 - k : k);
      if (fibers_[current_]->state != Fiber::State::runnable) continue;
      ran = true;
      swapcontext(&scheduler_, &fibers_[current_]->context);
      if (!failure_.empty()) throw KernelError(describe(failure_));
    }
    return ran;
  }

  void wait(Fiber::State state, const Site& site) {
    Fiber& self = *fibers_[current_];
    self.state = state;
    self.site = site;
  }
  void yield() { swapcontext(&fibers_[current_]->context, &scheduler_); }

  // Raised inside a fiber; fiber_main records it and the scheduler aborts the launch.
  [[noreturn]] void fail(const std::string& what) { throw std::logic_error(what); }
  [[noreturn]] void fail(const std::string& what, const Site& site) {
    throw std::logic_error(what + ", at " + site.file + ":" + std::to_string(site.line) + " in " + site.function);
  }

  static std::string where(const Fiber& f) {
    switch (f.state) {
      case Fiber::State::exited: return "exited";
      case Fiber::State::runnable: return "running";
      default: break;
    }
    std::ostringstream out;
    out << "wait at " << f.site.call << " at " << f.site.file << ":" << f.site.line << " in " << f.site.function;
    return out.str();
  }

  // The error, the launch and block it happened in, and where every thread is (runs of equal threads merged).
  std::string describe(const std::string& error) const {
    std::ostringstream out;
    out << "cuda_on_cpu: " << error << "\n  in block (" << block_index_.x << "," << block_index_.y << ","
        << block_index_.z << ") of kernel `" << launch_->kernel << "` with grid (" << grid_.x << "," << grid_.y
        << "," << grid_.z << ") and block (" << block_.x << "," << block_.y << "," << block_.z << "), launched at "
        << launch_->file << ":" << launch_->line << " in " << launch_->function << "\n  threads (linear index):";
    for (int first = 0; first < threads_;) {
      const std::string state = where(*fibers_[first]);
      int last = first;
      while (last + 1 < threads_ && where(*fibers_[last + 1]) == state) ++last;
      out << "\n    " << first << (last > first ? "-" + std::to_string(last) : "") << ": " << state;
      first = last + 1;
    }
    return out.str();
  }

  std::vector<std::unique_ptr<Fiber>> fibers_;
  std::vector<Warp> warps_;
  ucontext_t scheduler_;
  const LaunchSite* launch_ = nullptr;
  const std::function<void()>* body_ = nullptr;
  dim3 grid_, block_;
  uint3 block_index_;
  int threads_ = 0, current_ = 0, at_barrier_ = 0, exited_ = 0;
  std::string failure_;
};

inline Runner runner;
inline Runner& Runner::instance() { return runner; }

inline bool valid_launch(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  return grid.x >= 1 && grid.x <= 0x7fffffffu && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 &&
         grid.z <= 65535 && threads >= 1 && threads <= kMaxThreadsPerBlock && block.x <= 1024 && block.y <= 1024 &&
         block.z <= 64;
}

}  // namespace detail

// kernel<<<grid, block, dynamic_shared_bytes, stream>>>(args...), with body calling kernel(args...). An invalid
// configuration is reported by cudaGetLastError, as on a GPU; a kernel error throws KernelError.
template <typename Body>
void launch(const LaunchSite& site, Body&& body, dim3 grid, dim3 block, size_t dynamic_shared_bytes = 0,
            [[maybe_unused]] cudaStream_t stream = nullptr) {
  if (dynamic_shared_bytes != 0) {
    throw KernelError(std::string("cuda_on_cpu: dynamic shared memory is not emulated (kernel `") + site.kernel +
                      "` launched at " + site.file + ":" + std::to_string(site.line) + ")");
  }
  if (!detail::valid_launch(grid, block)) {
    detail::last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const std::function<void()> call(std::forward<Body>(body));
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) detail::runner.run_block(site, grid, block, uint3{x, y, z}, call);
    }
  }
}

template <typename T>
T shfl_down_sync(unsigned mask, T value, unsigned delta, const Site& site) {
  return detail::runner.shuffle(
      mask, value, [delta](int lane) { return lane + delta < unsigned(kWarpSize) ? int(lane + delta) : lane; }, site);
}

template <typename T>
T shfl_xor_sync(unsigned mask, T value, int lane_mask, const Site& site) {
  return detail::runner.shuffle(
      mask, value, [lane_mask](int lane) { return unsigned(lane ^ lane_mask) < kWarpSize ? lane ^ lane_mask : lane; },
      site);
}

}  // namespace cuda_on_cpu

#define CUDA_ON_CPU_SITE(call) ::cuda_on_cpu::Site{call, __FILE__, __LINE__, __PRETTY_FUNCTION__}
#define CUDA_ON_CPU_LAUNCH_SITE(kernel) ::cuda_on_cpu::LaunchSite{#kernel, __FILE__, __LINE__, __PRETTY_FUNCTION__}

#define threadIdx (::cuda_on_cpu::detail::runner.thread_index())
#define blockIdx (::cuda_on_cpu::detail::runner.block_index())
#define blockDim (::cuda_on_cpu::detail::runner.block_dim())
#define gridDim (::cuda_on_cpu::detail::runner.grid_dim())
#define __syncthreads() ::cuda_on_cpu::detail::runner.barrier(CUDA_ON_CPU_SITE("__syncthreads()"))
#define __shfl_down_sync(mask, value, delta) \
  ::cuda_on_cpu::shfl_down_sync(mask, value, delta, CUDA_ON_CPU_SITE("__shfl_down_sync"))
#define __shfl_xor_sync(mask, value, lane_mask) \
  ::cuda_on_cpu::shfl_xor_sync(mask, value, lane_mask, CUDA_ON_CPU_SITE("__shfl_xor_sync"))

// The runtime calls the sources make, answered for the emulated device 0. They are declared (extern "C") by
// cuda_runtime_api.h; defined inline here, in every translation unit that includes this header.
inline cudaError_t cudaGetLastError(void) { return std::exchange(cuda_on_cpu::detail::last_error, cudaSuccess); }

inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    default: return "an error the CUDA emulation does not produce";
  }
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  if (attr != cudaDevAttrMultiProcessorCount) {
    throw std::logic_error("cuda_on_cpu: device attribute " + std::to_string(int(attr)) + " is not emulated");
  }
  *value = cuda_on_cpu::settings.multiprocessors;
  return cudaSuccess;
}

// The C function behind cuda_runtime.h's cudaOccupancyMaxActiveBlocksPerMultiprocessor template.
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* num_blocks, const void*, int block_size,
                                                                         size_t, unsigned int) {
  if (block_size < 1 || block_size > int(cuda_on_cpu::kMaxThreadsPerBlock)) return cudaErrorInvalidValue;
  *num_blocks = cuda_on_cpu::settings.blocks_per_multiprocessor;
  return cudaSuccess;
}
