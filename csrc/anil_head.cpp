// The CPU kernel of the fused ANIL head's small loop: every inner SGD step of a linear head and
// the query logits and loss, for each task, in the S x N space, and the loop's reverse.
//
// After one pass over the features (GEMMs, done once in torch by anil_fast/ops.py for every
// device), the adapted head after k steps is W_k = W - lr H_k^T F, b_k = b - lr 1^T H_k with
// H_k = G_0 + ... + G_{k-1} [S, N] the sum of the support-logit gradients, so
//   for k: P_k = softmax(Z0 - lr Kss H_k);  H_{k+1} = H_k + (P_k - Y) / S
//   query logits = Aq - lr Kqs H_K;  loss = mean cross-entropy.
// (Z0 = F W^T + b [S,N], Kss = F F^T + 1 [S,S], Aq = Fq W^T + b [Q,N], Kqs = Fq F^T + 1 [Q,S].)
// The same loop runs on CUDA as Triton kernels (kernels/anil_head.py), and in batched torch as
// their test oracle; this file is its CPU form.
//
// Why C++: per task these are a few small matrices (5-way 1-shot: S = N = 5) that stay in
// the L1 cache for the whole loop. Batched ATen calls pay dispatch and a temporary per step
// and per operation; here one at::parallel_for over tasks runs each task's loop start to end
// with no per-step allocation.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

void check(const at::Tensor& z0, const at::Tensor& kss, const at::Tensor& ys) {
  TORCH_CHECK(z0.dim() == 3 && kss.dim() == 3 && ys.dim() == 2, "small loop: z0 [T,S,N], kss [T,S,S], ys [T,S]");
  TORCH_CHECK(kss.size(0) == z0.size(0) && kss.size(1) == z0.size(1) && kss.size(2) == z0.size(1) &&
                  ys.size(0) == z0.size(0) && ys.size(1) == z0.size(1),
              "small loop: shapes disagree");
  TORCH_CHECK(z0.device().is_cpu() && z0.is_contiguous() && kss.is_contiguous() && ys.is_contiguous(),
              "small loop: contiguous CPU tensors");
  TORCH_CHECK(kss.scalar_type() == z0.scalar_type(), "small loop: one float dtype");
  TORCH_CHECK(ys.scalar_type() == at::kLong, "small loop: int64 labels");
}

// Inside a task every S x N matrix is held transposed, [N, S] (one row per class): Kss is
// symmetric, so every product with it runs along contiguous rows of length S, and the softmax
// over classes is elementwise across rows. Every inner loop is over S, and the compiler
// vectorises it.

// A^T [N, S] -> out [S, N], or back.
template <typename T>
void transpose(const T* a, T* out, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[j * rows + i] = a[i * cols + j];
}

// out -= c * Xt Kss for Xt [N, S], Kss [S, S] symmetric: out[j, :] -= c sum_m Xt[j, m] Kss[m, :].
// Row m of Kss is read once for all N rows of out (Kss may not fit the L1 cache; out does).
template <typename T>
void minus_times_kss(const T* __restrict__ xt, const T* __restrict__ kss, T* __restrict__ out,
                     int64_t s, int64_t n, T c) {
  for (int64_t m = 0; m < s; ++m) {
    const T* __restrict__ km = kss + m * s;
    for (int64_t j = 0; j < n; ++j) {
      const T x = c * xt[j * s + m];
      T* __restrict__ oj = out + j * s;
      for (int64_t i = 0; i < s; ++i) oj[i] -= x * km[i];
    }
  }
}

// One inner step for one task, transposed: Pt = softmax over classes of Z0t - lr Ht Kss, then
// Ht += (Pt - Yt) / S. colmax/colsum: scratch of S values. Labels outside 0..N-1 match no class
// (the host turns that task's loss into NaN).
template <typename T>
void inner_step(const T* z0t, const T* kss, const int64_t* ys, T* ht, T* pt, T* colmax,
                T* colsum, int64_t s, int64_t n, T lr) {
  std::copy(z0t, z0t + n * s, pt);
  minus_times_kss(ht, kss, pt, s, n, lr);
  std::copy(pt, pt + s, colmax);
  std::fill(colsum, colsum + s, T(0));
  for (int64_t j = 1; j < n; ++j)
    for (int64_t i = 0; i < s; ++i) colmax[i] = std::max(colmax[i], pt[j * s + i]);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < s; ++i) colsum[i] += (pt[j * s + i] = std::exp(pt[j * s + i] - colmax[i]));
  const T inv_s = T(1) / static_cast<T>(s);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < s; ++i) {
      pt[j * s + i] /= colsum[i];
      ht[j * s + i] += (pt[j * s + i] - T(ys[i] == j)) * inv_s;
    }
}

// H_K [S, N] of one task. scratch: 3 * S * N + 2 * S values.
template <typename T>
void forward_task(const T* z0, const T* kss, const int64_t* ys, T* h, T* scratch, int64_t s,
                  int64_t n, int64_t steps, T lr) {
  T *z0t = scratch, *ht = z0t + n * s, *pt = ht + n * s, *colmax = pt + n * s, *colsum = colmax + s;
  transpose(z0, z0t, s, n);
  std::fill(ht, ht + n * s, T(0));
  for (int64_t k = 0; k < steps; ++k) inner_step(z0t, kss, ys, ht, pt, colmax, colsum, s, n, lr);
  transpose(ht, h, n, s);
}

// The reverse of one task's loop given the adjoint of H_K. Writes the history the host turns
// into the adjoints of Z0 and Kss (kernels/anil_head.py, adjoints_from_history): per step the
// head H_k and the support-logit adjoint ZB_k, both transposed, [steps, N, S].
// scratch: 3 * S * N + 2 * S values.
template <typename T>
void reverse_task(const T* z0, const T* kss, const int64_t* ys, const T* hbar, T* hist, T* zb,
                  T* scratch, int64_t s, int64_t n, int64_t steps, T lr) {
  const int64_t sn = s * n;
  T *z0t = scratch, *hbt = z0t + sn, *ht = hbt + sn, *colmax = ht + sn, *colsum = colmax + s;
  transpose(z0, z0t, s, n);
  transpose(hbar, hbt, s, n);
  // recompute the steps: H_k into hist[k], P_k into zb[k] (overwritten by ZB_k below)
  std::fill(ht, ht + sn, T(0));
  for (int64_t k = 0; k < steps; ++k) {
    std::copy(ht, ht + sn, hist + k * sn);
    inner_step(z0t, kss, ys, ht, zb + k * sn, colmax, colsum, s, n, lr);
  }
  const T inv_s = T(1) / static_cast<T>(s);
  for (int64_t k = steps - 1; k >= 0; --k) {
    T* zbk = zb + k * sn;  // holds P_k
    // H_{k+1} = H_k + (softmax(Z_k) - Y)/S: the adjoint of Z_k is the softmax JVP ...
    std::fill(colsum, colsum + s, T(0));
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < s; ++i) colsum[i] += zbk[j * s + i] * hbt[j * s + i];
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < s; ++i) zbk[j * s + i] *= (hbt[j * s + i] - colsum[i]) * inv_s;
    // ... and Z_k = Z0 - lr Kss H_k passes it on to H_k (Kss's share is the host's GEMM)
    minus_times_kss(zbk, kss, hbt, s, n, lr);
  }
}

}  // namespace

// H_K [T,S,N], the summed support-logit gradients after `steps` steps; labels int64, floats
// float32 or float64. (The query logits and loss are GEMM-shaped: the host does them.)
at::Tensor small_loop_forward(at::Tensor z0, at::Tensor kss, at::Tensor ys, double lr, int64_t steps) {
  check(z0, kss, ys);
  TORCH_CHECK(steps >= 0, "small loop: steps >= 0");
  const int64_t T_ = z0.size(0), S = z0.size(1), N = z0.size(2);
  auto h = at::empty_like(z0);
  AT_DISPATCH_FLOATING_TYPES(z0.scalar_type(), "small_loop_forward", [&] {
    const scalar_t r = static_cast<scalar_t>(lr);
    at::parallel_for(0, T_, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(3 * S * N + 2 * S);  // one per thread, reused by its tasks
      for (int64_t t = begin; t < end; ++t)
        forward_task(z0.data_ptr<scalar_t>() + t * S * N, kss.data_ptr<scalar_t>() + t * S * S,
                     ys.data_ptr<int64_t>() + t * S, h.data_ptr<scalar_t>() + t * S * N,
                     scratch.data(), S, N, steps, r);
    });
  });
  return h;
}

// {ZB history [T, steps, N, S], H history [T, steps, N, S]} given the adjoint of H_K.
std::vector<at::Tensor> small_loop_reverse(at::Tensor z0, at::Tensor kss, at::Tensor ys,
                                           at::Tensor hbar, double lr, int64_t steps) {
  check(z0, kss, ys);
  TORCH_CHECK(hbar.sizes() == z0.sizes() && hbar.scalar_type() == z0.scalar_type() && hbar.is_contiguous(),
              "small loop: hbar like z0");
  TORCH_CHECK(steps >= 0, "small loop: steps >= 0");
  const int64_t T_ = z0.size(0), S = z0.size(1), N = z0.size(2);
  auto zb = at::empty({T_, steps, N, S}, z0.options());
  auto hist = at::empty({T_, steps, N, S}, z0.options());
  AT_DISPATCH_FLOATING_TYPES(z0.scalar_type(), "small_loop_reverse", [&] {
    const scalar_t r = static_cast<scalar_t>(lr);
    at::parallel_for(0, T_, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(3 * S * N + 2 * S);
      for (int64_t t = begin; t < end; ++t)
        reverse_task(z0.data_ptr<scalar_t>() + t * S * N, kss.data_ptr<scalar_t>() + t * S * S,
                     ys.data_ptr<int64_t>() + t * S, hbar.data_ptr<scalar_t>() + t * S * N,
                     hist.data_ptr<scalar_t>() + t * steps * S * N,
                     zb.data_ptr<scalar_t>() + t * steps * S * N, scratch.data(), S, N, steps, r);
    });
  });
  return {zb, hist};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("small_loop_forward", &small_loop_forward, "ANIL head small loop: the inner steps");
  m.def("small_loop_reverse", &small_loop_reverse, "ANIL head small loop: its reverse");
}
