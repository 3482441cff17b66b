// The fused ANIL head on the CPU: every inner-loop SGD step of a linear head and the query
// loss, for all tasks of a meta-batch, with an analytic (second-order) backward.
//
// Why it is cheap: after k steps the adapted head is W_k = W - lr * H_k^T F and
// b_k = b - lr * 1^T H_k, where H_k = G_0 + ... + G_{k-1} [S, N] sums the support-logit
// gradients. So the support logits are Z_k = Z_0 - lr * Kss H_k with Kss = F F^T + 1, and the
// whole inner loop runs in the small S x N space after one pass over the features:
//   Z_0 = F W^T + b, Kss = F F^T + 1, Aq = Fq W^T + b, Kqs = Fq F^T + 1   (GEMMs)
//   for k: P = softmax(Z_0 - lr Kss H); H += (P - Y) / S                 (small, per task)
//   query logits = Aq - lr Kqs H; loss = mean cross-entropy.
// The backward reverses the small loop (softmax Jacobian-vector products) and maps the
// adjoints of Z_0, Kss, Kqs and Aq back to W, b, F and Fq with GEMMs.
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

void check_inputs(const at::Tensor& fs, const at::Tensor& ys, const at::Tensor& fq,
                  const at::Tensor& yq, const at::Tensor& w, const at::Tensor& b) {
  TORCH_CHECK(fs.dim() == 3 && fq.dim() == 3 && w.dim() == 2 && b.dim() == 1,
              "anil_head: support_features [T,S,D], query_features [T,Q,D], weight [N,D], bias [N]");
  TORCH_CHECK(fs.size(0) == fq.size(0) && fs.size(2) == fq.size(2) && w.size(1) == fs.size(2) &&
                  b.size(0) == w.size(0),
              "anil_head: shapes disagree");
  TORCH_CHECK(ys.sizes() == fs.sizes().slice(0, 2) && yq.sizes() == fq.sizes().slice(0, 2),
              "anil_head: label shapes disagree with the features");
  TORCH_CHECK(fs.scalar_type() == w.scalar_type() && fq.scalar_type() == w.scalar_type() &&
                  b.scalar_type() == w.scalar_type(),
              "anil_head: all float tensors must share one dtype");
  TORCH_CHECK(fs.device().is_cpu(), "anil_head (C++): CPU tensors only");
  const int64_t n = w.size(0);
  TORCH_CHECK(ys.numel() == 0 || (ys.min().item<int64_t>() >= 0 && ys.max().item<int64_t>() < n),
              "anil_head: support_labels out of range");
  TORCH_CHECK(yq.numel() == 0 || (yq.min().item<int64_t>() >= 0 && yq.max().item<int64_t>() < n),
              "anil_head: query_labels out of range");
}

// One inner step in the small space: Z = Z0 - lr Kss H; P = softmax(Z); H += (P - Y) / S.
// Writes P (the step's probabilities) to `p`; `z` is scratch.
template <typename scalar_t, typename acc_t>
void inner_step(const scalar_t* z0, const scalar_t* kss, const int64_t* y, acc_t* h, acc_t* p,
                acc_t* z, int64_t S, int64_t N, acc_t lr) {
  for (int64_t i = 0; i < S; ++i) {
    for (int64_t n = 0; n < N; ++n) z[i * N + n] = static_cast<acc_t>(z0[i * N + n]);
    for (int64_t j = 0; j < S; ++j) {
      const acc_t k = lr * static_cast<acc_t>(kss[i * S + j]);
      if (k == acc_t(0)) continue;
      for (int64_t n = 0; n < N; ++n) z[i * N + n] -= k * h[j * N + n];
    }
  }
  const acc_t inv_s = acc_t(1) / static_cast<acc_t>(S);
  for (int64_t i = 0; i < S; ++i) {
    acc_t* zi = z + i * N;
    acc_t* pi = p + i * N;
    acc_t mx = *std::max_element(zi, zi + N);
    acc_t sum = 0;
    for (int64_t n = 0; n < N; ++n) {
      pi[n] = std::exp(zi[n] - mx);
      sum += pi[n];
    }
    for (int64_t n = 0; n < N; ++n) {
      pi[n] /= sum;
      h[i * N + n] += (pi[n] - (n == y[i] ? acc_t(1) : acc_t(0))) * inv_s;
    }
  }
}

}  // namespace

// Forward and backward work task by task (parallel over tasks): each task's features are
// read once per pass while they are in cache, through small GEMMs against R = [W; F] (the
// head's rows and the task's support rows), instead of several whole-batch GEMMs that each
// stream every feature from memory.

// R = [W; F_t] into `r` [N+S, D].
static void stack_rows(at::Tensor& r, const at::Tensor& w, const at::Tensor& fs_t) {
  const int64_t N = w.size(0);
  r.narrow(0, 0, N).copy_(w);
  r.narrow(0, N, fs_t.size(0)).copy_(fs_t);
}

// Returns {losses [T], query_logits [T,Q,N], z0 [T,S,N], kss [T,S,S], kqs [T,Q,S], h [T,S,N]}.
std::vector<at::Tensor> anil_head_forward(at::Tensor fs, at::Tensor ys, at::Tensor fq,
                                          at::Tensor yq, at::Tensor w, at::Tensor b, double lr,
                                          int64_t steps) {
  check_inputs(fs, ys, fq, yq, w, b);
  TORCH_CHECK(steps >= 0, "anil_head: inner_steps must be >= 0");
  fs = fs.contiguous();
  fq = fq.contiguous();
  w = w.contiguous();
  b = b.contiguous();
  ys = ys.to(at::kLong).contiguous();
  yq = yq.to(at::kLong).contiguous();
  const int64_t T = fs.size(0), S = fs.size(1), Q = fq.size(1), D = fs.size(2), N = w.size(0);
  auto z0 = at::empty({T, S, N}, fs.options());
  auto kss = at::empty({T, S, S}, fs.options());
  auto kqs = at::empty({T, Q, S}, fs.options());
  auto h = at::empty({T, S, N}, fs.options());
  auto logits = at::empty({T, Q, N}, fs.options());
  auto losses = at::empty({T}, fs.options());
  AT_DISPATCH_FLOATING_TYPES(fs.scalar_type(), "anil_head_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // fp32 accumulation for fp32, fp64 for fp64
    const int64_t* ys_p = ys.data_ptr<int64_t>();
    const int64_t* yq_p = yq.data_ptr<int64_t>();
    const scalar_t* b_p = b.data_ptr<scalar_t>();
    const acc_t alr = static_cast<acc_t>(lr);
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      auto r = at::empty({N + S, D}, fs.options());
      auto zs = at::empty({S, N + S}, fs.options());
      auto zq = at::empty({Q, N + S}, fs.options());
      std::vector<acc_t> hh(S * N), p(S * N), z(S * N), row(N);
      for (int64_t t = begin; t < end; ++t) {
        stack_rows(r, w, fs[t]);
        at::mm_out(zs, fs[t], r.t());  // [F W^T | F F^T]
        at::mm_out(zq, fq[t], r.t());  // [Fq W^T | Fq F^T]
        const scalar_t* zs_p = zs.data_ptr<scalar_t>();
        const scalar_t* zq_p = zq.data_ptr<scalar_t>();
        scalar_t* z0_t = z0.data_ptr<scalar_t>() + t * S * N;
        scalar_t* kss_t = kss.data_ptr<scalar_t>() + t * S * S;
        scalar_t* kqs_t = kqs.data_ptr<scalar_t>() + t * Q * S;
        for (int64_t i = 0; i < S; ++i) {
          for (int64_t n = 0; n < N; ++n) z0_t[i * N + n] = zs_p[i * (N + S) + n] + b_p[n];
          for (int64_t j = 0; j < S; ++j) kss_t[i * S + j] = zs_p[i * (N + S) + N + j] + scalar_t(1);
        }
        for (int64_t q = 0; q < Q; ++q)
          for (int64_t j = 0; j < S; ++j) kqs_t[q * S + j] = zq_p[q * (N + S) + N + j] + scalar_t(1);
        std::fill(hh.begin(), hh.end(), acc_t(0));
        for (int64_t k = 0; k < steps; ++k)
          inner_step<scalar_t, acc_t>(z0_t, kss_t, ys_p + t * S, hh.data(), p.data(), z.data(),
                                      S, N, alr);
        scalar_t* h_t = h.data_ptr<scalar_t>() + t * S * N;
        for (int64_t i = 0; i < S * N; ++i) h_t[i] = static_cast<scalar_t>(hh[i]);
        scalar_t* logits_t = logits.data_ptr<scalar_t>() + t * Q * N;
        acc_t loss = 0;
        for (int64_t q = 0; q < Q; ++q) {  // query logits = Aq - lr Kqs H, and the loss
          for (int64_t n = 0; n < N; ++n)
            row[n] = static_cast<acc_t>(zq_p[q * (N + S) + n]) + static_cast<acc_t>(b_p[n]);
          for (int64_t j = 0; j < S; ++j) {
            const acc_t k = alr * static_cast<acc_t>(kqs_t[q * S + j]);
            for (int64_t n = 0; n < N; ++n) row[n] -= k * hh[j * N + n];
          }
          acc_t mx = *std::max_element(row.begin(), row.end());
          acc_t sum = 0;
          for (int64_t n = 0; n < N; ++n) {
            sum += std::exp(row[n] - mx);
            logits_t[q * N + n] = static_cast<scalar_t>(row[n]);
          }
          loss += mx + std::log(sum) - row[yq_p[t * Q + q]];
        }
        losses.data_ptr<scalar_t>()[t] = static_cast<scalar_t>(loss / static_cast<acc_t>(Q));
      }
    });
  });
  return {losses, logits, z0, kss, kqs, h};
}

// Reverse of one task's small loop: from hb (the adjoint of H_K, overwritten) to the adjoints
// of Z_0 (z0b [S,N]) and of Kss (kb [S,S]). hist_h/hist_p: scratch for every step's H_k, P_k.
template <typename scalar_t, typename acc_t>
void reverse_loop(const scalar_t* z0, const scalar_t* kss, const int64_t* y, acc_t* hb,
                  acc_t* z0b, acc_t* kb, std::vector<acc_t>& hist_h, std::vector<acc_t>& hist_p,
                  std::vector<acc_t>& hh, std::vector<acc_t>& z, std::vector<acc_t>& zb,
                  int64_t S, int64_t N, int64_t steps, acc_t lr) {
  const acc_t inv_s = acc_t(1) / static_cast<acc_t>(S);
  std::fill(hh.begin(), hh.end(), acc_t(0));
  for (int64_t k = 0; k < steps; ++k) {  // recompute the forward, keeping H_k and P_k
    std::copy(hh.begin(), hh.end(), hist_h.begin() + k * S * N);
    inner_step<scalar_t, acc_t>(z0, kss, y, hh.data(), hist_p.data() + k * S * N, z.data(), S,
                                N, lr);
  }
  std::fill(z0b, z0b + S * N, acc_t(0));
  std::fill(kb, kb + S * S, acc_t(0));
  for (int64_t k = steps - 1; k >= 0; --k) {
    const acc_t* P = hist_p.data() + k * S * N;
    const acc_t* Hk = hist_h.data() + k * S * N;
    // H_{k+1} = H_k + (softmax(Z_k) - Y)/S: the adjoint of Z_k is the softmax JVP.
    for (int64_t i = 0; i < S; ++i) {
      acc_t r = 0;
      for (int64_t n = 0; n < N; ++n) r += P[i * N + n] * hb[i * N + n];
      for (int64_t n = 0; n < N; ++n) zb[i * N + n] = P[i * N + n] * (hb[i * N + n] - r) * inv_s;
    }
    for (int64_t i = 0; i < S * N; ++i) z0b[i] += zb[i];
    // Z_k = Z_0 - lr Kss H_k: adjoints of Kss and of H_k.
    for (int64_t i = 0; i < S; ++i)
      for (int64_t j = 0; j < S; ++j) {
        acc_t acc = 0;
        for (int64_t n = 0; n < N; ++n) acc += zb[i * N + n] * Hk[j * N + n];
        kb[i * S + j] -= lr * acc;
      }
    for (int64_t i = 0; i < S; ++i)
      for (int64_t j = 0; j < S; ++j) {
        const acc_t k2 = lr * static_cast<acc_t>(kss[i * S + j]);
        if (k2 == acc_t(0)) continue;
        for (int64_t n = 0; n < N; ++n) hb[i * N + n] -= k2 * zb[j * N + n];
      }
  }
}

// Gradients {support_features, query_features, weight, bias} from the output gradients.
std::vector<at::Tensor> anil_head_backward(at::Tensor grad_losses, at::Tensor grad_logits,
                                           at::Tensor fs, at::Tensor ys, at::Tensor fq,
                                           at::Tensor yq, at::Tensor w, at::Tensor logits,
                                           at::Tensor z0, at::Tensor kss, at::Tensor kqs,
                                           at::Tensor h, double lr, int64_t steps,
                                           bool first_order) {
  fs = fs.contiguous();
  fq = fq.contiguous();
  w = w.contiguous();
  ys = ys.to(at::kLong).contiguous();
  yq = yq.to(at::kLong).contiguous();
  grad_losses = grad_losses.contiguous();
  grad_logits = grad_logits.contiguous();
  logits = logits.contiguous();
  z0 = z0.contiguous();
  kss = kss.contiguous();
  kqs = kqs.contiguous();
  h = h.contiguous();
  const int64_t T = fs.size(0), S = fs.size(1), Q = fq.size(1), D = fs.size(2), N = w.size(0);
  auto g_fs = first_order ? at::zeros_like(fs) : at::empty_like(fs);
  auto g_fq = at::empty_like(fq);
  // Per-thread partial sums of the weight and bias gradients, added up at the end in a fixed
  // order (deterministic for a given thread count).
  const int64_t threads = at::get_num_threads();
  auto g_w_parts = at::zeros({threads, N, D}, fs.options());
  auto g_b_parts = at::zeros({threads, N}, fs.options());
  AT_DISPATCH_FLOATING_TYPES(fs.scalar_type(), "anil_head_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // fp32 accumulation for fp32, fp64 for fp64
    const acc_t alr = static_cast<acc_t>(lr);
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      const int64_t tid = at::get_thread_num();
      auto g_w = g_w_parts[tid];
      auto g_b = g_b_parts[tid];
      auto r = at::empty({N + S, D}, fs.options());
      auto zq_bar = at::empty({Q, N}, fs.options());
      auto kqs_bar = at::empty({Q, S}, fs.options());
      auto hbar = at::empty({S, N}, fs.options());
      auto adj_s = at::empty({S, N + S}, fs.options());  // [z0_bar | kss_bar + kss_bar^T]
      std::vector<acc_t> hist_h(std::max<int64_t>(steps, 1) * S * N);
      std::vector<acc_t> hist_p(std::max<int64_t>(steps, 1) * S * N);
      std::vector<acc_t> hh(S * N), z(S * N), zb(S * N), hb(S * N), z0b(S * N), kb(S * S), pq(N);
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* logits_t = logits.data_ptr<scalar_t>() + t * Q * N;
        const scalar_t* gz_t = grad_logits.data_ptr<scalar_t>() + t * Q * N;
        const int64_t* yq_t = yq.data_ptr<int64_t>() + t * Q;
        const acc_t gl = static_cast<acc_t>(grad_losses.data_ptr<scalar_t>()[t]) / static_cast<acc_t>(Q);
        scalar_t* zq_p = zq_bar.data_ptr<scalar_t>();
        for (int64_t q = 0; q < Q; ++q) {
          // Adjoint of the query logits: upstream plus the mean cross-entropy's gradient.
          const scalar_t* lq = logits_t + q * N;
          acc_t mx = static_cast<acc_t>(*std::max_element(lq, lq + N));
          acc_t sum = 0;
          for (int64_t n = 0; n < N; ++n) sum += (pq[n] = std::exp(static_cast<acc_t>(lq[n]) - mx));
          for (int64_t n = 0; n < N; ++n)
            zq_p[q * N + n] = static_cast<scalar_t>(
                static_cast<acc_t>(gz_t[q * N + n]) +
                gl * (pq[n] / sum - (n == yq_t[q] ? acc_t(1) : acc_t(0))));
        }
        // query logits = Aq - lr Kqs H: the adjoint of Kqs is -lr Zq_bar H^T
        at::mm_out(kqs_bar, zq_bar, h[t].t()).mul_(-lr);
        stack_rows(r, w, fs[t]);
        auto g_fq_t = g_fq[t];
        at::mm_out(g_fq_t, zq_bar, w);           // Zq_bar W
        g_fq_t.addmm_(kqs_bar, fs[t]);           // + Kqs_bar F
        g_w.addmm_(zq_bar.t(), fq[t]);           // + Zq_bar^T Fq
        g_b.add_(zq_bar.sum(0));
        if (first_order) continue;               // support features get no gradient
        // ... and the adjoint of H_K is -lr Kqs^T Zq_bar
        at::mm_out(hbar, kqs[t].t(), zq_bar).mul_(-lr);
        const scalar_t* hbar_p = hbar.data_ptr<scalar_t>();
        for (int64_t i = 0; i < S * N; ++i) hb[i] = static_cast<acc_t>(hbar_p[i]);
        reverse_loop<scalar_t, acc_t>(z0.data_ptr<scalar_t>() + t * S * N,
                                      kss.data_ptr<scalar_t>() + t * S * S,
                                      ys.data_ptr<int64_t>() + t * S, hb.data(), z0b.data(),
                                      kb.data(), hist_h, hist_p, hh, z, zb, S, N, steps, alr);
        scalar_t* as_p = adj_s.data_ptr<scalar_t>();
        for (int64_t i = 0; i < S; ++i) {
          for (int64_t n = 0; n < N; ++n) as_p[i * (N + S) + n] = static_cast<scalar_t>(z0b[i * N + n]);
          for (int64_t j = 0; j < S; ++j)
            as_p[i * (N + S) + N + j] = static_cast<scalar_t>(kb[i * S + j] + kb[j * S + i]);
        }
        auto z0_bar = adj_s.narrow(1, 0, N);
        auto g_fs_t = g_fs[t];
        at::mm_out(g_fs_t, adj_s, r);               // Z0_bar W + (Kb + Kb^T) F
        g_fs_t.addmm_(kqs_bar.t(), fq[t]);          // + Kqs_bar^T Fq
        g_w.addmm_(z0_bar.t(), fs[t]);
        g_b.add_(z0_bar.sum(0));
      }
    });
  });
  return {g_fs, g_fq, g_w_parts.sum(0), g_b_parts.sum(0)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &anil_head_forward, "fused ANIL head: inner loop and query loss");
  m.def("backward", &anil_head_backward, "fused ANIL head: analytic backward");
}
