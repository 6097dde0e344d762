// The op fastlm::release_reused_buffers(): drops the memory the CPU kernels keep from call to call for their
// outputs and gradients (see reused_buffer.h), as torch.cuda.empty_cache() does for the CUDA caching allocator.
#include "reused_buffer.h"

#include <torch/library.h>

namespace fastlm {

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def("release_reused_buffers() -> ()", [] { ReusedBuffer::release_all(); });
}

}  // namespace fastlm
