// The makemore MLP's training step (the network is in mlp_step.cpp) for a batch large against the vocabulary,
// on every thread.
//
// The first layer goes through product tables, as embedding_linear's strategy 1 does: P[v, t] = W_t table[v]
// (Vt x T x H, with b1 folded into t = 0), so a row's h is the sum of T rows of P. P is small enough to stay
// in cache, so h is made again wherever a pass needs it instead of being stored, and the backward only adds
// dh's rows into G[v, t] by token: dW_t = G_t^T table, d(table) = sum_t G_t W_t, db1 = sum_v G[v, 0].
// At batch 4096, embedding 64, hidden 1024 that replaces 2.4 G multiply-adds of the first layer's three
// products by 16 M, and no (B, H) array is ever written to memory.
// With BatchNorm, dh = c1 dz + c2 xhat + c3 per channel (c1 = w invstd, c2 = -c1 sum(dz xhat) / (B - 1 or B),
// c3 = -c1 sum(dz) / B), and those sums are only known once every row's dz is. Rather than a second pass over
// dz, the rows of dz and of xhat are added into tables of their own by token, Gdz and Gx, and at the end
// G[v, t] = c1 Gdz[v, t] + c2 Gx[v, t] + c3 count[v, t], with count[v, t] the rows whose token t is v.
//
// The batch is split into a fixed number of parts (set by the batch size alone), each run by one thread in
// blocks of rows small enough for L2. Every sum over rows is made per part in row order and the parts are
// added in order, so results do not depend on the thread count and two runs are bitwise equal.
// Passes over each part's blocks:
//   1. (BatchNorm) mean and M2 of h per channel: each block's in two passes over it in cache, merged with
//      Chan's formula;
//   2. h, a = tanh(BN(h)) (or tanh(h)), logits = a W2^T + b2, the cross-entropy turning them into dlogits,
//      dW2 += dlogits^T a, db2 += sum dlogits, da = dlogits W2, dz = da (1 - a^2) into G (Gdz); with
//      BatchNorm also xhat into Gx, and the sums of dz and dz xhat.

#include "mlp_step.h"
#include "moments_merge.h"

#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

namespace fastlm {
namespace {

// Parts of the batch: one per 256 rows, at most 8, and fewer where the parts' own token tables (G and Gx, of
// table_size values each) would pass 8 M values.
int64_t parts_of(int64_t B, int64_t table_size) {
  return std::clamp<int64_t>(std::min(B / 256, (int64_t(8) << 20) / (2 * table_size)), 1, 8);
}

// Rows per block: about 128 KiB of one (rows, H) fp32 buffer, a multiple of the matmul's 6-row tiles, so a
// block's three buffers stay in L2 beside a part's dW2 and token tables.
int64_t rows_per_block(int64_t H) { return std::clamp<int64_t>(32768 / std::max<int64_t>(1, H) / 6 * 6, 6, 252); }

// Every row of m (rows x n) set to v (or zero without v).
template <typename T>
void fill_rows(int64_t rows, int64_t n, const T* v, T* m) {
  for (int64_t r = 0; r < rows; ++r) {
    if (v) std::memcpy(m + r * n, v, n * sizeof(T)); else std::fill_n(m + r * n, n, T(0));
  }
}

// sums[j] += sum over rows of m[r, j], rows in order.
template <typename T>
void add_column_sums(int64_t rows, int64_t n, const T* m, T* sums) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) sums[j] += m[r * n + j];
}

// Sum over `rows` rows of logits (rows x V) of cross_entropy(logits, target); the logits are overwritten by
// the gradient of the mean loss over a batch of `batch` rows.
template <typename T>
T cross_entropy_rows(int64_t rows, int64_t V, int64_t batch, T* logits, const int64_t* targets) {
  using Vec = at::vec::Vectorized<T>;
  T total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    T* l = logits + r * V;
    const T max = at::vec::reduce_all<T>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, l, V);
    const T target_logit = l[targets[r]] - max;
    Vec sums(T(0));
    for_each_vector<T>(V, [&](int64_t k, int64_t n) {
      const Vec e = exp_nonpositive(load(l + k, n) - Vec(max));
      e.store(l + k, n);
      sums += Vec::set(Vec(T(0)), e, n);  // a short tail's other lanes are exp(0 - max), not part of the row
    });
    const T sum = at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return a + b; }, sums);
    total += std::log(sum) - target_logit;  // -log softmax[target]
    at::vec::map([scale = Vec(T(1) / (sum * T(batch)))](Vec v) { return v * scale; }, l, l, V);
    l[targets[r]] -= T(1) / T(batch);
  }
  return total;
}

// One part's sums over its rows, and its block buffers.
template <typename T>
struct Part {
  T *g_w2, *g_b2, *sum_dz, *sum_dz_xhat, *tables, *xhat_tables, *mean, *m2, *block_mean, *block_m2, *h, *a, *da;
  T loss;
  int64_t count;
};

template <typename T>
class ProductTableStep {
 public:
  explicit ProductTableStep(const StepData<T>& d)
      : d_(d),
        s_(d.s),
        table_size_(d.s.vocab * d.s.T * d.s.H),
        parts_(parts_of(d.s.B, table_size_)),
        block_(rows_per_block(d.s.H)) {}

  void run() {
    allocate();
    for_each_part([&](Part<T>& p, int64_t, int64_t) { clear(p); });
    build_product_tables();
    if (d_.bn_w) {
      for_each_part([&](Part<T>& p, int64_t r0, int64_t r1) { moments(p, r0, r1); });
      merge_moments();
    }
    for_each_part([&](Part<T>& p, int64_t r0, int64_t r1) { forward_backward(p, r0, r1); });
    finish();
  }

 private:
  const StepData<T>& d_;
  const Sizes& s_;
  const int64_t table_size_, parts_, block_;
  T *w1t_, *w2t_, *P_, *logits_, *mean_, *invstd_;
  std::vector<Part<T>> part_;
  const KeptScratch<T, ProductTableStep> scratch_;

  // Scratch, kept between calls up to 64 MB (KeptScratch; a fresh buffer is a fresh mmap, page faults
  // included).
  void allocate() {
    const int64_t B = s_.B, H = s_.H, V = s_.V;
    const auto padded = LineCarver<T>::whole_lines;  // each piece on its own cache lines
    const int64_t shared = padded(s_.K * H) + padded(H * V) + padded(table_size_) + padded(B * V) + 2 * padded(H);
    const int64_t per_part =
        padded(V * H) + padded(V) + 2 * padded(table_size_) + 6 * padded(H) + 3 * padded(block_ * H);
    LineCarver<T> carver(scratch_.buffer(), shared + parts_ * per_part);
    auto take = [&](int64_t n) { return carver.take(n); };
    w1t_ = take(s_.K * H);
    w2t_ = take(H * V);
    P_ = take(table_size_);
    logits_ = take(B * V);
    mean_ = take(H);
    invstd_ = take(H);
    part_.resize(parts_);
    for (auto& p : part_) {
      p = Part<T>{take(V * H), take(V), take(H), take(H), take(table_size_), take(table_size_), take(H), take(H),
                  take(H), take(H), take(block_ * H), take(block_ * H), take(block_ * H), T(0), 0};
    }
  }

  // A part's sums set to zero (by the thread that runs the part).
  void clear(Part<T>& p) const {
    std::fill_n(p.g_w2, s_.V * s_.H, T(0));
    std::fill_n(p.g_b2, s_.V, T(0));
    std::fill_n(p.tables, table_size_, T(0));
    if (d_.bn_w) std::fill_n(p.xhat_tables, table_size_, T(0));
    for (T* v : {p.sum_dz, p.sum_dz_xhat, p.mean, p.m2}) std::fill_n(v, s_.H, T(0));
  }

  // f(part, first row, end row) for every part, parts spread over the threads.
  template <typename F>
  void for_each_part(const F& f) {
    at::parallel_for(0, parts_, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) f(part_[p], p * s_.B / parts_, (p + 1) * s_.B / parts_);
    });
  }

  // out[0:n] = sum over parts, in order, of field(part)[0:n].
  template <typename F>
  void sum_parts(const F& field, int64_t n, T* out) {
    std::copy_n(field(part_[0]), n, out);
    for (int64_t p = 1; p < parts_; ++p) add_row(out, field(part_[p]), n);
  }

  // P[v, t] = W_t table[v] (+ b1 at t = 0), as (Vt, T*H) = table (Vt, D) times W1^T's rows of position t;
  // threads take strips of hidden columns.
  void build_product_tables() {
    const int64_t T_ = s_.T, D = s_.D, H = s_.H;
    transpose(H, s_.K, d_.w1, w1t_);
    transpose(s_.V, H, d_.w2, w2t_);
    for (int64_t v = 0; v < s_.vocab; ++v) {
      std::copy_n(d_.b1, H, P_ + v * T_ * H);
      std::fill_n(P_ + v * T_ * H + H, (T_ - 1) * H, T(0));
    }
    at::parallel_for(0, H, 128, [&](int64_t j0, int64_t j1) {
      for (int64_t t = 0; t < T_; ++t)
        add_matmul(s_.vocab, j1 - j0, D, d_.table, D, 1, w1t_ + t * D * H + j0, H, P_ + t * H + j0, T_ * H);
    });
  }

  // h (rows x H) of batch rows [r0, r0 + rows): the sum of each row's T product-table rows.
  void hidden_rows(int64_t r0, int64_t rows, T* h) const {
    const int64_t T_ = s_.T, H = s_.H;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t* ids = d_.idx + (r0 + r) * T_;
      T* hr = h + r * H;
      std::copy_n(P_ + ids[0] * T_ * H, H, hr);
      for (int64_t t = 1; t < T_; ++t) add_row(hr, P_ + (ids[t] * T_ + t) * H, H);
    }
  }

  // The part's per-channel count, mean and M2 of h: block by block, merged with Chan's formula.
  void moments(Part<T>& p, int64_t r0, int64_t r1) {
    const int64_t H = s_.H;
    for (int64_t b = r0; b < r1; b += block_) {
      const int64_t n = std::min(block_, r1 - b);
      hidden_rows(b, n, p.h);
      std::fill_n(p.block_mean, H, T(0));
      add_column_sums(n, H, p.h, p.block_mean);
      for (int64_t j = 0; j < H; ++j) p.block_mean[j] /= T(n);
      std::fill_n(p.block_m2, H, T(0));
      for (int64_t r = 0; r < n; ++r)
        for (int64_t j = 0; j < H; ++j) {
          const T dev = p.h[r * H + j] - p.block_mean[j];
          p.block_m2[j] += dev * dev;
        }
      chan_merge(p.count, p.mean, p.m2, n, p.block_mean, p.block_m2, H);
      p.count += n;
    }
  }

  // The batch's mean and invstd from the parts', in order; the running stats moved.
  void merge_moments() {
    const int64_t B = s_.B, H = s_.H;
    T* m2 = invstd_;  // first M2
    std::fill_n(mean_, H, T(0));
    std::fill_n(m2, H, T(0));
    int64_t count = 0;
    for (auto& p : part_) {
      chan_merge(count, mean_, m2, p.count, p.mean, p.m2, H);
      count += p.count;
    }
    for (int64_t j = 0; j < H; ++j) {
      if (d_.running_mean) d_.running_mean[j] = T((1 - d_.momentum) * d_.running_mean[j] + d_.momentum * mean_[j]);
      if (d_.running_var) {
        d_.running_var[j] = T((1 - d_.momentum) * d_.running_var[j] + d_.momentum * (m2[j] / T(B - 1)));
      }
      invstd_[j] = T(1) / std::sqrt(m2[j] / T(d_.unbiased ? B - 1 : B) + T(d_.eps));
    }
  }

  // h of a block into xhat, in place (BatchNorm).
  void normalize(int64_t rows, T* h) const {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < s_.H; ++j) h[r * s_.H + j] = (h[r * s_.H + j] - mean_[j]) * invstd_[j];
  }

  // The rows of m (rows x H) of batch rows [r0, r0 + rows) added into tables[idx[r, t], t].
  void scatter(int64_t r0, int64_t rows, const T* m, T* tables) const {
    const int64_t T_ = s_.T, H = s_.H;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t* ids = d_.idx + (r0 + r) * T_;
      for (int64_t t = 0; t < T_; ++t) add_row(tables + (ids[t] * T_ + t) * H, m + r * H, H);
    }
  }

  void forward_backward(Part<T>& p, int64_t r0, int64_t r1) {
    const int64_t H = s_.H, V = s_.V;
    for (int64_t b = r0; b < r1; b += block_) {
      const int64_t n = std::min(block_, r1 - b);
      hidden_rows(b, n, p.h);
      if (d_.bn_w) {
        normalize(n, p.h);  // p.h holds xhat
        for (int64_t r = 0; r < n; ++r)
          for (int64_t j = 0; j < H; ++j) p.a[r * H + j] = d_.bn_w[j] * p.h[r * H + j] + d_.bn_b[j];
      } else {
        std::copy_n(p.h, n * H, p.a);
      }
      tanh_in_place(p.a, n * H);
      T* logits = logits_ + b * V;
      fill_rows(n, V, d_.b2, logits);
      add_matmul(n, V, H, p.a, H, 1, w2t_, V, logits, V);
      p.loss += cross_entropy_rows(n, V, s_.B, logits, d_.targets + b);  // logits now hold dlogits
      add_matmul(V, H, n, logits, 1, V, p.a, H, p.g_w2, H);  // dW2 += dlogits^T a
      add_column_sums(n, V, logits, p.g_b2);
      std::fill_n(p.da, n * H, T(0));
      add_matmul(n, H, V, logits, V, 1, d_.w2, H, p.da, H);  // da = dlogits W2
      for (int64_t i = 0; i < n * H; ++i) p.da[i] *= T(1) - p.a[i] * p.a[i];  // through the tanh: dz
      scatter(b, n, p.da, p.tables);
      if (d_.bn_w) {
        scatter(b, n, p.h, p.xhat_tables);
        add_column_sums(n, H, p.da, p.sum_dz);
        for (int64_t r = 0; r < n; ++r)
          for (int64_t j = 0; j < H; ++j) p.sum_dz_xhat[j] += p.da[r * H + j] * p.h[r * H + j];
      }
    }
  }

  // With BatchNorm, G = c1 Gdz + c2 Gx + c3 count from the summed tables (see the top of the file).
  void batch_norm_backward(T* G, const T* Gx) {
    const int64_t T_ = s_.T, H = s_.H;
    sum_parts([](Part<T>& p) { return p.sum_dz; }, H, d_.g_bn_b);
    sum_parts([](Part<T>& p) { return p.sum_dz_xhat; }, H, d_.g_bn_w);
    std::vector<int64_t> count(s_.vocab * T_, 0);
    for (int64_t i = 0; i < s_.B * T_; ++i) ++count[d_.idx[i] * T_ + i % T_];
    std::vector<T> c1(H), c2(H), c3(H);
    const T mean_scale = T(1) / T(s_.B), xhat_scale = T(1) / T(d_.unbiased ? s_.B - 1 : s_.B);
    for (int64_t j = 0; j < H; ++j) {
      c1[j] = d_.bn_w[j] * invstd_[j];
      c2[j] = -c1[j] * xhat_scale * d_.g_bn_w[j];
      c3[j] = -c1[j] * mean_scale * d_.g_bn_b[j];
    }
    for (int64_t q = 0; q < s_.vocab * T_; ++q) {
      const T n = T(count[q]);
      for (int64_t j = 0; j < H; ++j) G[q * H + j] = c1[j] * G[q * H + j] + c2[j] * Gx[q * H + j] + n * c3[j];
    }
  }

  // The parts' sums added in order; the first layer's gradients from G.
  void finish() {
    const int64_t T_ = s_.T, D = s_.D, H = s_.H, V = s_.V, K = s_.K;
    T loss = 0;
    for (const auto& p : part_) loss += p.loss;
    *d_.loss = loss / T(s_.B);
    sum_parts([](Part<T>& p) { return p.g_w2; }, V * H, d_.g_w2);
    sum_parts([](Part<T>& p) { return p.g_b2; }, V, d_.g_b2);
    T* G = part_[0].tables;
    for (int64_t p = 1; p < parts_; ++p) add_row(G, part_[p].tables, table_size_);
    if (d_.bn_w) {
      T* Gx = part_[0].xhat_tables;
      for (int64_t p = 1; p < parts_; ++p) add_row(Gx, part_[p].xhat_tables, table_size_);
      batch_norm_backward(G, Gx);
    }
    std::fill_n(d_.g_b1, H, T(0));
    for (int64_t v = 0; v < s_.vocab; ++v) add_row(d_.g_b1, G + v * T_ * H, H);  // every row is in one G[v, 0]
    std::fill_n(d_.g_w1, H * K, T(0));
    at::parallel_for(0, H, 64, [&](int64_t o0, int64_t o1) {  // dW_t = G_t^T table, rows of W1 per thread
      for (int64_t t = 0; t < T_; ++t)
        add_matmul(o1 - o0, D, s_.vocab, G + t * H + o0, 1, T_ * H, d_.table, D, d_.g_w1 + o0 * K + t * D, K);
    });
    std::fill_n(d_.g_table, s_.vocab * D, T(0));
    at::parallel_for(0, D, 32, [&](int64_t c0, int64_t c1) {  // d(table) = sum_t G_t W_t, column strips
      for (int64_t t = 0; t < T_; ++t)
        add_matmul(s_.vocab, c1 - c0, H, G + t * H, T_ * H, 1, d_.w1 + t * D + c0, K, d_.g_table + c0, D);
    });
  }
};

}  // namespace

template <typename T>
void product_table_step(const StepData<T>& d) {
  ProductTableStep<T>(d).run();
}

template void product_table_step<float>(const StepData<float>&);
template void product_table_step<double>(const StepData<double>&);

}  // namespace fastlm
