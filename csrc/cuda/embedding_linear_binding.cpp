// CUDA kernels for the embedding + linear ops that csrc/cpu/embedding_linear.cpp defines (TORCH_LIBRARY_FRAGMENT).
// This file owns everything torch: the input checks (indices included, before any kernel uses them), the layout
// the kernels need (int64 indices, contiguous data in a dtype they read), the GEMMs (cuBLAS through at::mm and
// at::addmm), the stable sort of the scatter keys, allocation, the device guard and the current stream. The
// gathers and scatters are in embedding_linear.cu, which stays torch-free so nvcc never parses torch headers.
//
// The product-table strategy keeps its tables position-minor: with Wp = weight viewed (out, T, D), permuted to
// (T, out, D) and flattened to (T*out, D) (row t*out + o is row o of W_t),
//   P = table Wp^T is (V, T*out) = (V, T, out), P[v, t] = table[v] W_t^T, one GEMM for every position;
//   G (V*T, out) gathers dY by the key v*T + t, so G viewed (V, T*out) gives d(table) = G Wp in one GEMM (the
//   sum over t is part of its inner dimension) and d(weight) from G^T table, (T*out, D) permuted back.
// Data in float, double, half and bfloat16 is used in its own dtype; any other floating dtype goes through fp32
// and comes back in its own.
#include "../embedding_linear_checks.h"
#include "../math_dtype.h"
#include "embedding_linear.cuh"
#include "binding_utils.h"

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/minimum.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace fastlm {
namespace {

// One device-side test and one sync; the offending value is fetched only to raise. Skipped while a CUDA
// graph is captured, which forbids the sync: the kernels then read an out-of-range id as a zero row and
// scatter nothing for it.
void check_indices(const at::Tensor& idx, int64_t V) {
  const c10::cuda::CUDAGuard guard(idx.device());  // capture is a property of that device's current stream
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return;
  const at::Tensor bad = idx.lt(0).logical_or_(idx.ge(V));
  if (bad.any().item<bool>()) {
    TORCH_CHECK_INDEX(false, "fastlm embedding_linear: index ", idx.masked_select(bad)[0].item<int64_t>(),
                      " is out of range for a table of ", V, " rows");
  }
}

// The inputs as the kernels and GEMMs use them, and what the other arguments are checked against.
struct Inputs {
  at::Tensor original_table;  // the caller's table: its device and dtype are the reference
  at::Tensor idx;             // (B, T) int64, contiguous, every value in [0, V)
  at::Tensor table, weight;   // contiguous, in a dtype the kernels read
  int64_t B, T, V, D, out;

  at::ScalarType dtype() const { return table.scalar_type(); }
  at::ScalarType math_dtype() const { return fastlm::math_dtype(table); }

  void check_device(const at::Tensor& t, const char* name) const {
    TORCH_CHECK(t.device() == original_table.device(), "fastlm embedding_linear: ", name,
                " must be on the device of table (", original_table.device(), "), got ", t.device());
  }

  // weight viewed (out, T, D) and laid out (T, out, D), flattened to (T*out, D): row t*out + o is row o of W_t.
  at::Tensor position_major_weight() const {
    return weight.view({out, T, D}).permute({1, 0, 2}).reshape({T * out, D});
  }

  at::Tensor to_caller(const at::Tensor& t) const { return t.to(original_table.scalar_type()); }
};

Inputs prepare(const at::Tensor& idx, const at::Tensor& table, const at::Tensor& weight) {
  TORCH_CHECK(table.is_cuda(), "fastlm embedding_linear: table must be a CUDA tensor, got ", table.device());
  check_embedding_linear_shapes(idx, table, weight);
  const int64_t B = idx.size(0), T = idx.size(1), V = table.size(0), D = table.size(1);
  Inputs in{table, at::Tensor(), at::Tensor(), at::Tensor(), B, T, V, D, weight.size(0)};
  in.check_device(idx, "idx");
  in.check_device(weight, "weight");
  in.idx = idx.to(at::kLong).contiguous();
  check_indices(in.idx, V);
  const at::ScalarType dtype = kernel_dtype(table.scalar_type()) ? table.scalar_type() : at::kFloat;
  in.table = table.to(dtype).contiguous();
  in.weight = weight.to(dtype).contiguous();
  return in;
}

// X = table[idx] packed as (B, T*D), the input of the linear layer.
at::Tensor gather(const Inputs& in) {
  at::Tensor x = at::empty({in.B, in.T * in.D}, in.table.options());
  dispatch(in.dtype(), "embedding_linear", [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_cuda(embedding_linear_gather_cuda<T>(data<int64_t>(in.idx), in.B * in.T, data<T>(in.table), in.V, in.D,
                                               mutable_data<T>(x), stream()),
               "embedding_linear_gather");
  });
  return x;
}

// Segments of the sorted positions cut into pieces of at most `piece` positions, so that a frequent key (the
// '.' that pads the names' contexts) is summed by many warps rather than one. offsets (keys + 1) bounds the keys'
// segments; key k owns pieces [piece_offsets[k], piece_offsets[k + 1]). Computed on the device without reading
// the count back (no sync, so CUDA graphs can capture it): rows / piece + min(keys, rows) entries bound the count
// (a segment of l positions makes at most l / piece + 1 pieces, and at most `rows` keys have one), the spare ones
// empty. The same cut as kernels/embedding_linear.py's _pieces.
struct Pieces {
  at::Tensor starts, ends, piece_offsets;
};
Pieces cut_into_pieces(const at::Tensor& offsets, int64_t rows, int64_t piece) {
  const int64_t keys = offsets.numel() - 1;
  const at::Tensor lengths = offsets.slice(0, 1).sub(offsets.slice(0, 0, keys));
  const at::Tensor counts = lengths.add(piece - 1).div(piece, "floor");
  const at::Tensor piece_offsets = at::cat({at::zeros({1}, offsets.options()), counts.cumsum(0)});
  const at::Tensor p = at::arange(rows / piece + std::min(keys, rows), offsets.options());
  const at::Tensor owner = at::searchsorted(piece_offsets, p, /*out_int32=*/false, /*right=*/true).sub_(1);
  const at::Tensor owned = owner.lt(keys);
  const at::Tensor key = owner.clamp_max(keys - 1);
  const at::Tensor zero = at::zeros({}, offsets.options());
  const at::Tensor starts =
      at::where(owned, offsets.index_select(0, key).add(p.sub(piece_offsets.index_select(0, key)).mul(piece)), zero);
  const at::Tensor ends = at::where(owned, at::minimum(starts.add(piece), offsets.index_select(0, key.add(1))), zero);
  return {starts, ends, piece_offsets};
}

// Past this many rows a key's segment may be long enough to be worth cutting (see cut_into_pieces).
constexpr int64_t kPieceRows = 128;

// dst (dst_rows, width), row k the sum of the rows r / src_div of src (contiguous, width wide) over the r with
// keys[r] == k, except k == skip_key, which stays zero. Deterministic: summed in the order of a stable sort.
at::Tensor scatter_rows(const Inputs& in, const at::Tensor& keys, const at::Tensor& src, int64_t src_div,
                        int64_t dst_rows, int64_t skip_key, bool deterministic) {
  const int64_t width = src.size(1), n = keys.numel();
  const at::TensorOptions math = src.options().dtype(in.math_dtype());
  at::Tensor acc;
  dispatch(in.dtype(), "embedding_linear", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_type<T>;
    // Checked again here: deterministic mode may have been switched on since the forward chose the path.
    if (deterministic || at::globalContext().deterministicAlgorithms()) {
      const auto [sorted, perm] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      // The source row of each sorted key, divided here once rather than per row and column chunk in the kernel.
      const at::Tensor src_rows = src_div == 1 ? perm : perm.div(src_div, "floor");
      // Keys outside [0, dst_rows) fall before offsets[0] or after offsets[dst_rows], in no segment.
      const at::Tensor offsets = at::searchsorted(sorted, at::arange(dst_rows + 1, keys.options()));
      acc = at::empty({dst_rows, width}, math);
      const auto segment_sum = [&](const at::Tensor& starts, const at::Tensor& ends, const int64_t* rows,
                                   auto* source, const at::Tensor& dst) {
        const EmbeddingLinearSegments s{data<int64_t>(starts), data<int64_t>(ends), starts.numel(), width};
        check_cuda(embedding_linear_segment_sum_cuda(s, rows, source, mutable_data<acc_t>(dst), stream()),
                   "embedding_linear_segment_sum");
      };
      if (n <= kPieceRows || dst_rows == 0) {
        segment_sum(offsets.slice(0, 0, dst_rows), offsets.slice(0, 1), data<int64_t>(src_rows), data<T>(src), acc);
      } else {
        const Pieces pieces = cut_into_pieces(offsets, n, kPieceRows);
        const at::Tensor partial = at::empty({pieces.starts.numel(), width}, math);
        segment_sum(pieces.starts, pieces.ends, data<int64_t>(src_rows), data<T>(src), partial);
        segment_sum(pieces.piece_offsets.slice(0, 0, dst_rows), pieces.piece_offsets.slice(0, 1), nullptr,
                    data<acc_t>(partial), acc);
      }
      if (skip_key >= 0 && skip_key < dst_rows) acc.select(0, skip_key).zero_();
    } else {
      const EmbeddingLinearScatter s{data<int64_t>(keys), n, width, dst_rows, skip_key};
      acc = at::zeros({dst_rows, width}, math);
      check_cuda(embedding_linear_scatter_add_cuda<T>(s, src_div, data<T>(src), mutable_data<acc_t>(acc), stream()),
                 "embedding_linear_scatter_add");
    }
  });
  return acc.to(in.dtype());
}

at::Tensor embedding_linear_forward(const at::Tensor& idx, const at::Tensor& table, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, int64_t strategy) {
  check_strategy(strategy);
  const Inputs in = prepare(idx, table, weight);
  at::Tensor b;
  if (bias.has_value()) {
    in.check_device(*bias, "bias");
    check_embedding_linear_bias(bias, in.out);
    b = bias->to(in.dtype()).contiguous();
  }
  const c10::cuda::CUDAGuard guard(in.table.device());
  if (strategy == kGatherGemm) {
    const at::Tensor x = gather(in);
    return in.to_caller(b.defined() ? at::addmm(b, x, in.weight.t()) : at::mm(x, in.weight.t()));
  }
  const at::Tensor product = at::mm(in.table, in.position_major_weight().t());  // (V, T*out)
  at::Tensor y = at::empty({in.B, in.out}, in.table.options());
  dispatch(in.dtype(), "embedding_linear", [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_cuda(embedding_linear_product_sum_cuda<T>(data<int64_t>(in.idx), in.B, in.T, in.V, in.out,
                                                    data<T>(product), b.defined() ? data<T>(b) : nullptr,
                                                    mutable_data<T>(y), stream()),
               "embedding_linear_product_sum");
  });
  return in.to_caller(y);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_linear_backward(
    const at::Tensor& grad_output, const at::Tensor& idx, const at::Tensor& table, const at::Tensor& weight,
    bool has_bias, int64_t strategy, int64_t padding_idx, bool deterministic) {
  check_strategy(strategy);
  const Inputs in = prepare(idx, table, weight);
  in.check_device(grad_output, "grad_output");
  check_embedding_linear_backward(grad_output, in.B, in.out, in.V, padding_idx);
  const at::Tensor dy = grad_output.to(in.dtype()).contiguous();
  const c10::cuda::CUDAGuard guard(in.table.device());

  const at::Tensor grad_bias = has_bias ? in.to_caller(at::sum(dy, {0}, false, in.math_dtype()))
                                        : at::empty({0}, in.original_table.options());
  at::Tensor grad_table, grad_weight;
  if (strategy == kGatherGemm) {
    grad_weight = at::mm(dy.t(), gather(in));      // (out, T*D)
    const at::Tensor dx = at::mm(dy, in.weight);   // (B, T*D): row b*T + t of its (B*T, D) view belongs to idx[b, t]
    grad_table = scatter_rows(in, in.idx.view({-1}), dx.view({in.B * in.T, in.D}), /*src_div=*/1, in.V, padding_idx,
                              deterministic);
  } else {
    // Key v*T + t for idx[b, t] == v: the flat (B*T) keys share the B rows of dY, hence src_div = T (T == 0
    // leaves no keys, and 1 keeps the divisor valid).
    const at::Tensor keys = in.idx.mul(in.T).add_(at::arange(in.T, in.idx.options())).view({-1});
    const at::Tensor g = scatter_rows(in, keys, dy, /*src_div=*/std::max<int64_t>(in.T, 1), in.V * in.T,
                                      /*skip_key=*/-1, deterministic)
                             .view({in.V, in.T * in.out});
    grad_weight = at::mm(g.t(), in.table).view({in.T, in.out, in.D}).permute({1, 0, 2}).reshape({in.out, in.T * in.D});
    grad_table = at::mm(g, in.position_major_weight());
    if (padding_idx >= 0) grad_table.select(0, padding_idx).zero_();
  }
  return {in.to_caller(grad_table), in.to_caller(grad_weight), grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("embedding_linear_forward", &embedding_linear_forward);
  m.impl("embedding_linear_backward", &embedding_linear_backward);
}

}  // namespace fastlm
