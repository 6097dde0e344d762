// The makemore MLP's training step on the CPU: loss and every gradient of the whole model in one call
// (mlp_loss_and_grads), or the whole plain-SGD step, update included (mlp_sgd_step).
//
// At the lecture's size (batch 32, context 3, embedding 10, hidden 200, vocabulary 27) one step is about a
// million multiply-adds, some 25 us on one core at this 2-core machine's measured FMA peak (37-47 G FMA/s),
// while calling the layers one by one through autograd costs some 20 us per layer in Python, dispatch and
// small-GEMM overhead (measured: 0.39 ms per fused step, 0.44 ms eager). This op does what llm.c does for
// GPT-2: the forward and backward of the whole network written out in one place, with every intermediate in
// scratch. Two kernels: gather_step (here) for small batches (on two threads from 64 rows), and product_table_step
// (mlp_step_product_tables.cpp) on every thread for batches large against the vocabulary.
// On a GPU the same overhead is removed by capturing the layer-by-layer step in a CUDA graph instead.
//
// The network (all matrices row-major, weights in nn.Linear's (out, in) layout):
//   x = table[idx].view(B, K)                  idx (B, T), table (Vt, D), K = T*D
//   h = x W1^T + b1                            W1 (H, K)
//   a = tanh(BN(h)) with BatchNorm, else tanh(h); BN on batch statistics, variance M2/(n-1) if unbiased
//       else M2/n, running stats moved by momentum towards the mean and M2/(n-1) (as torch does)
//   logits = a W2^T + b2                       W2 (V, H)
//   loss = mean over rows of cross_entropy(logits, targets)
// and back: dlogits = (softmax - onehot)/B; dW2 = dlogits^T a; da = dlogits W2; dz = da (1 - a^2);
// BatchNorm's closed form (see batch_norm.cpp) gives dh, d(bn weight), d(bn bias); dW1 = dh^T x;
// dx = dh W1, scattered by token into d(table), position by position in batch order. Every sum runs in a
// fixed order: results are deterministic. Math in the input's dtype (fp32 or fp64).

#include "contiguous_as.h"
#include "mlp_step.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastlm {
namespace {

using at::vec::Vectorized;

// The product-table kernel where the batch is large against the table: its first layer then costs about
// vocab / B of the gathered product's multiply-adds, and its blocks of rows keep every core busy. (fastlm's
// MLP.sgd_step calls this op at such sizes whatever the work per row: fastlm/models/makemore.py.) Empty
// tables (no context or no hidden unit) are the gather kernel's: the product-table kernel divides by their size.
constexpr int64_t kProductTableMinBatch = 256;
bool uses_product_tables(const Sizes& s) {
  return s.B >= kProductTableMinBatch && 8 * s.vocab <= s.B && s.vocab * s.T * s.H > 0;
}

// The sum of a vector's lanes.
template <typename T>
T sum_lanes(Vectorized<T> v) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T>& x, Vectorized<T>& y) { return x + y; }, v);
}

// The sum of p[0:n]: in vector lanes, then across them.
template <typename T>
T row_sum(const T* p, int64_t n) {
  Vectorized<T> acc(T(0));
  for_each_vector<T>(n, [&](int64_t k, int64_t lanes) { acc += load(p + k, lanes); });
  return sum_lanes(acc);
}

// The sum of p[0:n] * q[0:n], likewise.
template <typename T>
T row_dot(const T* p, const T* q, int64_t n) {
  Vectorized<T> acc(T(0));
  for_each_vector<T>(n, [&](int64_t k, int64_t lanes) {
    acc = at::vec::fmadd(load(p + k, lanes), load(q + k, lanes), acc);
  });
  return sum_lanes(acc);
}

// BatchNorm over the columns of hT (H x B, a channel per row), channels [j0, j1), in place: hT becomes xhat
// and aT = tanh(w xhat + b); the per-channel invstd is left in invstd for the backward, the running stats
// moved; mean is scratch for H values. One pass over the channels per quantity (means, then squared
// deviations, then xhat): within a pass the channels are independent, so their horizontal sums overlap, and
// invstd is one vector loop (measured in a C++ harness: about 1 us less per batch-32 step than all of a
// channel at once).
template <typename T>
void batch_norm_tanh_forward(const StepData<T>& d, int64_t j0, int64_t j1, T* hT, T* aT, T* mean, T* invstd) {
  using Vec = Vectorized<T>;
  const int64_t B = d.s.B;
  for (int64_t j = j0; j < j1; ++j) mean[j] = row_sum(hT + j * B, B) / T(B);
  for (int64_t j = j0; j < j1; ++j) {  // the sum of squared deviations, M2, into invstd
    const T* h = hT + j * B;
    Vec m2(T(0));
    for_each_vector<T>(B, [&](int64_t k, int64_t n) {
      const Vec dev = Vec::set(Vec(T(0)), load(h + k, n) - Vec(mean[j]), n);
      m2 = at::vec::fmadd(dev, dev, m2);
    });
    const T m2_sum = invstd[j] = sum_lanes(m2);
    if (d.running_mean) d.running_mean[j] = T((1 - d.momentum) * d.running_mean[j] + d.momentum * mean[j]);
    if (d.running_var) d.running_var[j] = T((1 - d.momentum) * d.running_var[j] + d.momentum * (m2_sum / T(B - 1)));
  }
  const Vec var_scale(T(1) / T(d.unbiased ? B - 1 : B)), eps(T(d.eps));
  at::vec::map([&](Vec m2) { return Vec(T(1)) / (m2 * var_scale + eps).sqrt(); }, invstd + j0, invstd + j0, j1 - j0);
  for (int64_t j = j0; j < j1; ++j) {
    const Vec mu(mean[j]), scale(invstd[j]), w(d.bn_w[j]), b(d.bn_b[j]);
    T* h = hT + j * B;
    for_each_vector<T>(B, [&](int64_t k, int64_t n) {
      const Vec xhat = (load(h + k, n) - mu) * scale;
      xhat.store(h + k, n);
      at::vec::fmadd(xhat, w, b).store(aT + j * B + k, n);
    });
  }
  tanh_in_place(aT + j0 * B, (j1 - j0) * B);  // in one long loop, where the tanh of many vectors overlap
}

// From dzT (H x B, in place) to dhT for channels [j0, j1), with d(weight) = sum dz xhat and d(bias) = sum dz
// per channel.
template <typename T>
void batch_norm_backward(const StepData<T>& d, int64_t j0, int64_t j1, T* dzT, const T* xhatT, const T* invstd) {
  using Vec = Vectorized<T>;
  const int64_t B = d.s.B;
  const T mean_scale = T(1) / T(B), xhat_scale = T(1) / T(d.unbiased ? B - 1 : B);
  for (int64_t j = j0; j < j1; ++j) {
    T* dz = dzT + j * B;
    const T* xhat = xhatT + j * B;
    d.g_bn_b[j] = row_sum(dz, B);
    d.g_bn_w[j] = row_dot(dz, xhat, B);
    const Vec scale(d.bn_w[j] * invstd[j]), shift(-mean_scale * d.g_bn_b[j]), slope(-xhat_scale * d.g_bn_w[j]);
    for_each_vector<T>(B, [&](int64_t k, int64_t n) {
      (scale * at::vec::fmadd(load(xhat + k, n), slope, load(dz + k, n) + shift)).store(dz + k, n);
    });
  }
}

// Mean cross-entropy over the columns of lT (V x B, a row per class); lT is overwritten by the gradient.
// Columns are rows of the batch, so each step runs on a vector of batch rows at once. Each row's loss is
// (max - logit[target]) + log(sum of exps), two terms that are never negative, so neither is the loss (summing
// every lse and every -logit[target] apart cancelled to small negative losses on data learnt by heart).
template <typename T>
T cross_entropy_columns(int64_t B, int64_t V, T* lT, const int64_t* targets) {
  using Vec = Vectorized<T>;
  c10::SmallVector<T, 256> target_logits(B);  // read before the columns are overwritten
  for (int64_t r = 0; r < B; ++r) target_logits[r] = lT[targets[r] * B + r];
  T total = 0;
  for_each_vector<T>(B, [&](int64_t k, int64_t n) {
    Vec max = load(lT + k, n);
    for (int64_t v = 1; v < V; ++v) max = at::vec::maximum(max, load(lT + v * B + k, n));
    Vec sum(T(0));
    for (int64_t v = 0; v < V; ++v) {
      const Vec e = exp_nonpositive(load(lT + v * B + k, n) - max);
      e.store(lT + v * B + k, n);
      sum += e;
    }
    total += sum_lanes(Vec::set(Vec(T(0)), (max - load(target_logits.data() + k, n)) + sum.log(), n));
    const Vec scale = Vec(T(1)) / (sum * Vec(T(B)));
    for (int64_t v = 0; v < V; ++v) (load(lT + v * B + k, n) * scale).store(lT + v * B + k, n);
  });
  for (int64_t r = 0; r < B; ++r) lT[targets[r] * B + r] -= T(1) / T(B);
  return total / T(B);
}

}  // namespace

// Two threads from this batch size on: below, their hand-offs cost what they save (batch 32, fastlm bench, two
// alternating runs: 0.078/0.077 ms a step on one thread, 0.107/0.112 on two), and on a machine whose other core
// is busy each barrier waits for the scheduler (fastlm train at batch 32 beside one busy process: 0.10 ms a step
// on one thread, 0.27-0.46 on two; beside a build, up to 12).
constexpr int64_t kTwoThreadsMinBatch = 64;

// Runs phases[0](part) for both parts, then phases[1], and so on: on two threads (a part each, a barrier
// between phases) where the batch is large enough, torch allows two and OpenMP grants them, else one part after
// the other. Either way the same arithmetic in the same order, so results do not depend on the thread count.
template <size_t N, typename Phase>
void run_parts_in_order(const std::array<Phase, N>& phases) {
  for (const auto& phase : phases)
    for (int part = 0; part < 2; ++part) phase(part);
}

template <size_t N, typename Phase>
void run_two_parts(const std::array<Phase, N>& phases, int64_t batch) {
#ifdef _OPENMP
  if (batch >= kTwoThreadsMinBatch && at::get_num_threads() >= 2 && !at::in_parallel_region()) {
#pragma omp parallel num_threads(2)
    {
      // The team can be smaller than asked (OMP_THREAD_LIMIT, dynamic threads): then its one thread runs both
      // parts. Every thread of a team takes the same branch, so the barriers match.
      if (omp_get_num_threads() == 2) {
        for (const auto& phase : phases) {
          phase(omp_get_thread_num());
#pragma omp barrier
        }
      } else {
        run_parts_in_order(phases);
      }
    }
    return;
  }
#endif
  run_parts_in_order(phases);
}

// Activations are kept transposed, (features, B): the batch runs along the vector lanes, so every product
// has the batch as its vector dimension (B = 32 is two whole vectors, where the vocabulary of 27 wastes 5 of
// 32 lanes), the weights are read in their own layout without transposes, and the cross-entropy runs on
// vectors of rows.
//
// The step is split in two parts by hidden channel, [0, mid) and [mid, H), which run on two threads: a part
// computes its channels' h, BatchNorm, tanh and the logits' share of them, and (after the first barrier, the
// two shares added and the cross-entropy done by each part for itself) their gradients, d(W2) and d(W1)
// columns and rows, and its share of dx; after the second, each part scatters both shares of dx as
// rows into d(table), for the tokens of its half of the vocabulary (split by token, not by embedding column:
// columns put both threads' writes on the same cache lines, which cost 20 us a step). Measured per batch-32
// step in a C++ loop: 42 us on one thread, 24 on two; through model.sgd_step 49 and 37 (before small_matmul.h's
// 6-row tiles, which then took the op's own time, called in a Python loop on one thread, from 104 to 56 us in
// a slow hour). At batch 32 the two threads' hand-offs now cost what they save; from batch 64 two threads win
// (73 against 100-124 us): see kTwoThreadsMinBatch.
template <typename T>
void gather_step(const StepData<T>& d) {
  using Vec = Vectorized<T>;
  const Sizes& s = d.s;
  const int64_t B = s.B, K = s.K, H = s.H, V = s.V, D = s.D;
  // Scratch, kept between calls up to 64 MB (KeptScratch; a fresh buffer is a fresh mmap, page faults
  // included):
  // x (B,K) and its transpose, hT (H,B; xhat with BatchNorm), aT (H,B) and a (B,H), daT (H,B), mean and
  // invstd (H), and per part its share of the logits (V,B), all of them and then their gradient (V,B), and
  // its share of dxT (K,B).
  // Every array starts on a cache line, a's rows too (lda), and the parts meet at a cache line of every
  // array indexed by channel: the two threads never write the same line (which costs far more than the
  // arithmetic: measured, shared lines at the parts' borders made the step 1.8x slower).
  using Carver = LineCarver<T>;
  constexpr int64_t kLine = Carver::kLine;
  const auto lines = Carver::whole_lines;
  const int64_t lda = lines(H);
  const KeptScratch<T, struct GatherStepScratch> scratch;
  Carver carver(scratch.buffer(), lines(B * K) * 2 + lines(H * B) * 3 + B * lda + lines(H) * 2 +
                                      2 * (lines(V * B) * 2 + lines(K * B)));
  const auto take = [&](int64_t n) { return carver.take(n); };
  T* x = take(B * K);
  T* xT = take(K * B);
  T* hT = take(H * B);
  T* aT = take(H * B);
  T* a = take(B * lda);
  T* daT = take(H * B);
  T* mean = take(H);
  T* invstd = take(H);
  T* const share[2] = {take(V * B), take(V * B)};
  T* const lT[2] = {take(V * B), take(V * B)};
  T* const dxT[2] = {take(K * B), take(K * B)};
  const int64_t mid = std::min(H, (H / 2 + kLine / 2) / kLine * kLine);
  const int64_t j0[2] = {0, mid}, j1[2] = {mid, H};

  for (int64_t r = 0; r < B * s.T; ++r) std::memcpy(x + r * D, d.table + d.idx[r] * D, D * sizeof(T));
  transpose(B, K, x, xT);

  const auto forward = [&](int p) {
    const int64_t n = j1[p] - j0[p];
    for (int64_t j = j0[p]; j < j1[p]; ++j) std::fill_n(hT + j * B, B, d.b1[j]);
    add_matmul(n, B, K, d.w1 + j0[p] * K, K, 1, xT, B, hT + j0[p] * B, B);  // hT = W1 xT + b1
    if (d.bn_w) {
      batch_norm_tanh_forward(d, j0[p], j1[p], hT, aT, mean, invstd);
    } else {
      std::copy_n(hT + j0[p] * B, n * B, aT + j0[p] * B);
      tanh_in_place(aT + j0[p] * B, n * B);
    }
    for (int64_t v = 0; v < V; ++v) std::fill_n(share[p] + v * B, B, p == 0 ? d.b2[v] : T(0));
    add_matmul(V, B, n, d.w2 + j0[p], H, 1, aT + j0[p] * B, B, share[p], B);  // this part's share of W2 aT + b2
  };
  const auto backward = [&](int p) {
    const int64_t n = j1[p] - j0[p];
    at::vec::map2([](Vec u, Vec w) { return u + w; }, lT[p], share[0], share[1], V * B);  // the logits
    const T loss = cross_entropy_columns(B, V, lT[p], d.targets);  // lT[p] now holds dlogits^T
    if (p == 0) *d.loss = loss;
    const T* dlT = lT[p];
    at::vec::transpose_mxn<T>(aT + j0[p] * B, B, a + j0[p], lda, n, B);
    for (int64_t v = 0; v < V; ++v) std::fill_n(d.g_w2 + v * H + j0[p], n, T(0));
    add_matmul(V, n, B, dlT, B, 1, a + j0[p], lda, d.g_w2 + j0[p], H);  // dW2 = dlogits^T a, this part's columns
    if (p == 0)
      for (int64_t v = 0; v < V; ++v) d.g_b2[v] = row_sum(dlT + v * B, B);
    T* dh = daT + j0[p] * B;
    std::fill_n(dh, n * B, T(0));
    add_matmul(n, B, V, d.w2 + j0[p], 1, H, dlT, B, dh, B);  // daT = W2^T dlogits^T
    at::vec::map2([](Vec g, Vec y) { return g * (Vec(T(1)) - y * y); }, dh, dh, aT + j0[p] * B, n * B);
    if (d.bn_w) batch_norm_backward(d, j0[p], j1[p], daT, hT, invstd);  // daT now holds dhT
    for (int64_t j = j0[p]; j < j1[p]; ++j) d.g_b1[j] = row_sum(daT + j * B, B);
    std::fill_n(d.g_w1 + j0[p] * K, n * K, T(0));
    add_matmul(n, K, B, dh, B, 1, x, K, d.g_w1 + j0[p] * K, K);  // dW1 = dh^T x, this part's rows
    std::fill_n(dxT[p], K * B, T(0));
    add_matmul(K, B, n, d.w1 + j0[p] * K, 1, K, dh, B, dxT[p], B);  // this part's share of dxT = W1^T dhT
  };
  const auto scatter = [&](int p) {  // d(table) rows of tokens [v0, v1): each position's dx added, in order
    const int64_t v0 = p == 0 ? 0 : s.vocab / 2, v1 = p == 0 ? s.vocab / 2 : s.vocab;
    std::fill(d.g_table + v0 * D, d.g_table + v1 * D, T(0));
    for (int64_t t = 0; t < s.T; ++t)
      for (int64_t r = 0; r < B; ++r) {
        const int64_t v = d.idx[r * s.T + t];
        if (v < v0 || v >= v1) continue;
        for (int64_t j = 0; j < D; ++j) {
          const int64_t k = (t * D + j) * B + r;
          d.g_table[v * D + j] += dxT[0][k] + dxT[1][k];
        }
      }
  };
  using Phase = std::function<void(int)>;
  run_two_parts(std::array<Phase, 3>{forward, backward, scatter}, B);
}

template void gather_step<float>(const StepData<float>&);
template void gather_step<double>(const StepData<double>&);

namespace {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor>;

void check_matrix(const char* op, const at::Tensor& t, const char* name, int64_t rows, int64_t cols,
                  at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "fastlm ", op, ": ", name,
              " must be (", rows, ", ", cols, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "fastlm ", op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
}

void check_vector(const char* op, const std::optional<at::Tensor>& t, const char* name, int64_t n,
                  at::ScalarType dtype) {
  TORCH_CHECK(t.has_value(), "fastlm ", op, ": ", name, " is required");
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "fastlm ", op, ": ", name, " must have ", n,
              " entries, got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == dtype, "fastlm ", op, ": ", name, " must be ", dtype, ", got ",
              t->scalar_type());
}

void check_ids(const char* op, const at::Tensor& ids, int64_t limit, const char* what) {
  const int64_t* p = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < limit, "fastlm ", op, ": ", what, " ", p[i],
                      " is out of range [0, ", limit, ")");
  }
}

// A step's inputs, checked: the sizes, and the ids and targets as contiguous int64.
struct StepInputs {
  Sizes s;
  at::ScalarType dtype;
  bool batchnorm;
  at::Tensor ids, labels;
};

// The checks raise what Python code would: TypeError for ids of the wrong kind, ValueError for an empty batch,
// for a lone BatchNorm parameter and, with torch's message, for a batch of one in BatchNorm; IndexError for an
// id out of range; RuntimeError for parameters that do not fit.
StepInputs check_step(const char* op, const at::Tensor& idx, const at::Tensor& targets, const at::Tensor& table,
                      const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                      const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                      const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                      const std::optional<at::Tensor>& num_batches_tracked) {
  const auto is_id_type = [](const at::Tensor& t) {
    return t.scalar_type() == at::kLong || t.scalar_type() == at::kInt;
  };
  TORCH_CHECK_TYPE(idx.dim() == 2 && is_id_type(idx), "fastlm ", op, ": idx must be (B, T) int64 or int32 ids, got ",
                   idx.scalar_type(), " of shape ", idx.sizes());
  const int64_t B = idx.size(0);
  TORCH_CHECK_TYPE(targets.dim() == 1 && targets.size(0) == B && is_id_type(targets), "fastlm ", op,
                   ": targets must be (", B, ",) int64 or int32 ids, got ", targets.scalar_type(), " of shape ",
                   targets.sizes());
  TORCH_CHECK_VALUE(B > 0, "fastlm ", op, ": empty batch");
  const bool batchnorm = bn_weight.has_value();
  TORCH_CHECK_VALUE(batchnorm == bn_bias.has_value(), "fastlm ", op, ": give both bn_weight and bn_bias, or neither");
  TORCH_CHECK_VALUE(!batchnorm || B > 1, "Expected more than 1 value per channel when training, got input size ",
                    "torch.Size([", B, ", ", w1.size(0), "])");
  TORCH_CHECK(table.dim() == 2, "fastlm ", op, ": table must be (vocab, D), got ", table.sizes());
  const auto dtype = table.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "fastlm ", op, ": parameters must be float32 or float64, got ", dtype);
  const int64_t T = idx.size(1), D = table.size(1);
  const Sizes s{B, T, D, T * D, w1.size(0), w2.size(0), table.size(0)};
  check_matrix(op, w1, "w1", s.H, s.K, dtype);
  check_matrix(op, w2, "w2", s.V, s.H, dtype);
  check_vector(op, b1, "b1", s.H, dtype);
  check_vector(op, b2, "b2", s.V, dtype);
  if (batchnorm) {
    check_vector(op, bn_weight, "bn_weight", s.H, dtype);
    check_vector(op, bn_bias, "bn_bias", s.H, dtype);
    for (const auto* stat : {&running_mean, &running_var}) {
      if (stat->has_value()) check_vector(op, *stat, "running statistics", s.H, dtype);
      TORCH_CHECK(!stat->has_value() || (*stat)->is_contiguous(),
                  "fastlm ", op, ": running statistics must be contiguous (they are updated in place)");
    }
  }
  TORCH_CHECK(!num_batches_tracked.has_value() ||
                  (num_batches_tracked->numel() == 1 && num_batches_tracked->scalar_type() == at::kLong),
              "fastlm ", op, ": num_batches_tracked must be one int64");
  StepInputs in{s, dtype, batchnorm, private_indices(idx), private_indices(targets)};
  check_ids(op, in.ids, s.vocab, "index");
  check_ids(op, in.labels, s.V, "target");
  return in;
}

// The parameters in the order the gradients come back: table, w1, b1, w2, b2[, bn_weight, bn_bias].
std::vector<at::Tensor> parameter_list(const at::Tensor& table, const at::Tensor& w1, const at::Tensor& b1,
                                       const at::Tensor& w2, const at::Tensor& b2,
                                       const std::optional<at::Tensor>& bn_weight,
                                       const std::optional<at::Tensor>& bn_bias) {
  std::vector<at::Tensor> params{table, w1, b1, w2, b2};
  if (bn_weight.has_value()) {
    params.push_back(*bn_weight);
    params.push_back(*bn_bias);
  }
  return params;
}

// Runs the step on contiguous parameters, writing the loss and each parameter's gradient (grads[i] shaped as
// params[i]; the BatchNorm ones only with BatchNorm), and counts the batch in num_batches_tracked as the
// BatchNorm module's forward would (here, where it costs nothing; in Python an add_ is 4% of a batch-32 step).
template <typename S>
void run_step(const StepInputs& in, const std::vector<at::Tensor>& params,
              const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
              const std::optional<at::Tensor>& num_batches_tracked, double momentum, double eps, bool unbiased,
              S* loss, const std::vector<S*>& grads) {
  auto ptr = [&](size_t i) { return i < params.size() ? params[i].data_ptr<S>() : nullptr; };
  auto grad = [&](size_t i) { return i < grads.size() ? grads[i] : nullptr; };
  auto stat = [&](const std::optional<at::Tensor>& t) {
    return in.batchnorm && t.has_value() ? t->data_ptr<S>() : nullptr;
  };
  const StepData<S> d{in.s, in.ids.data_ptr<int64_t>(), in.labels.data_ptr<int64_t>(), ptr(0), ptr(1), ptr(2),
                       ptr(3), ptr(4), ptr(5), ptr(6), stat(running_mean), stat(running_var), momentum, eps,
                       unbiased, loss, grad(0), grad(1), grad(2), grad(3), grad(4), grad(5), grad(6)};
  if (uses_product_tables(in.s)) product_table_step(d); else gather_step(d);
  if (in.batchnorm && num_batches_tracked.has_value()) *num_batches_tracked->data_ptr<int64_t>() += 1;
}

// Returns (loss, d table, d w1, d b1, d w2, d b2, d bn_weight, d bn_bias); the BatchNorm gradients are empty
// without BatchNorm (bn_weight None).
Grads mlp_loss_and_grads(const at::Tensor& idx, const at::Tensor& targets, const at::Tensor& table,
                         const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                         const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                         const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                         const std::optional<at::Tensor>& num_batches_tracked, double momentum, double eps,
                         bool unbiased) {
  const StepInputs in = check_step("mlp_loss_and_grads", idx, targets, table, w1, b1, w2, b2, bn_weight, bn_bias,
                                   running_mean, running_var, num_batches_tracked);
  std::vector<at::Tensor> params = parameter_list(table, w1, b1, w2, b2, bn_weight, bn_bias);
  for (auto& p : params) p = p.contiguous();
  at::Tensor loss = at::empty({}, table.options());
  std::vector<at::Tensor> grads;
  for (const auto& p : params) grads.push_back(at::empty(p.sizes(), p.options()));
  for (size_t i = grads.size(); i < 7; ++i) grads.push_back(at::empty({0}, table.options()));
  AT_DISPATCH_FLOATING_TYPES(in.dtype, "fastlm_mlp_loss_and_grads", [&] {
    std::vector<scalar_t*> out;
    for (const auto& g : grads) out.push_back(g.data_ptr<scalar_t>());
    run_step<scalar_t>(in, params, running_mean, running_var, num_batches_tracked, momentum, eps, unbiased,
                       loss.data_ptr<scalar_t>(), out);
  });
  return {loss, grads[0], grads[1], grads[2], grads[3], grads[4], grads[5], grads[6]};
}

// One plain-SGD step, p -= lr * grad for every parameter, in place; returns the loss. The gradients stay in a
// scratch buffer: the training loop's step without eight gradient tensors, the Python that hands them over and
// a separate update (measured at batch 32, best of 2000: 0.097 ms per step through model.loss_and_grads and
// torch._foreach_add_, 0.049 ms through this op).
at::Tensor mlp_sgd_step(const at::Tensor& idx, const at::Tensor& targets, const at::Tensor& table,
                        const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                        const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                        const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                        const std::optional<at::Tensor>& num_batches_tracked, double momentum, double eps,
                        bool unbiased, double lr) {
  const StepInputs in = check_step("mlp_sgd_step", idx, targets, table, w1, b1, w2, b2, bn_weight, bn_bias,
                                   running_mean, running_var, num_batches_tracked);
  const std::vector<at::Tensor> params = parameter_list(table, w1, b1, w2, b2, bn_weight, bn_bias);
  for (const auto& p : params) {
    TORCH_CHECK(p.is_contiguous(), "fastlm mlp_sgd_step: parameters must be contiguous (they are updated in place)");
  }
  at::Tensor loss = at::empty({}, table.options());
  AT_DISPATCH_FLOATING_TYPES(in.dtype, "fastlm_mlp_sgd_step", [&] {
    using S = scalar_t;
    using Vec = Vectorized<S>;
    // The gradients, one after another, each from a cache line (as fresh tensors would be: the kernel's two
    // threads write the two sides of a line-aligned border of each).
    const KeptScratch<S, struct SgdStepGradients> scratch;
    int64_t values = 0;
    for (const auto& p : params) values += LineCarver<S>::whole_lines(p.numel());
    LineCarver<S> carver(scratch.buffer(), values);
    std::vector<S*> grads;
    for (const auto& p : params) grads.push_back(carver.take(p.numel()));
    run_step<S>(in, params, running_mean, running_var, num_batches_tracked, momentum, eps, unbiased,
                loss.data_ptr<S>(), grads);
    const Vec step_size = Vec(static_cast<S>(lr));
    for (size_t i = 0; i < params.size(); ++i) {
      S* p = params[i].data_ptr<S>();
      at::vec::map2([step_size](Vec v, Vec g) { return v - step_size * g; }, p, p, grads[i], params[i].numel());
    }
  });
  return loss;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def(
      "mlp_loss_and_grads(Tensor idx, Tensor targets, Tensor table, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
      "Tensor? bn_weight, Tensor? bn_bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? num_batches_tracked, float momentum, float eps, bool unbiased) -> (Tensor loss, "
      "Tensor grad_table, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2, Tensor grad_bn_weight, "
      "Tensor grad_bn_bias)");
  m.def(
      "mlp_sgd_step(Tensor idx, Tensor targets, Tensor(a!) table, Tensor(b!) w1, Tensor(c!) b1, Tensor(d!) w2, "
      "Tensor(e!) b2, Tensor(f!)? bn_weight, Tensor(g!)? bn_bias, Tensor(h!)? running_mean, Tensor(i!)? running_var, "
      "Tensor(j!)? num_batches_tracked, float momentum, float eps, bool unbiased, float lr) -> Tensor loss");
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("mlp_loss_and_grads", &mlp_loss_and_grads);
  m.impl("mlp_sgd_step", &mlp_sgd_step);
}

}  // namespace fastlm
