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

#include <ATen/AccumulateType.h>
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

// Returns {losses [T], query_logits [T,Q,N], z0 [T,S,N], kss [T,S,S], kqs [T,Q,S], h [T,S,N]}.
std::vector<at::Tensor> anil_head_forward(at::Tensor fs, at::Tensor ys, at::Tensor fq,
                                          at::Tensor yq, at::Tensor w, at::Tensor b, double lr,
                                          int64_t steps) {
  check_inputs(fs, ys, fq, yq, w, b);
  TORCH_CHECK(steps >= 0, "anil_head: inner_steps must be >= 0");
  fs = fs.contiguous();
  fq = fq.contiguous();
  ys = ys.to(at::kLong).contiguous();
  yq = yq.to(at::kLong).contiguous();
  const int64_t T = fs.size(0), S = fs.size(1), Q = fq.size(1), N = w.size(0);
  auto wt = w.t();
  auto z0 = at::matmul(fs, wt).add_(b).contiguous();
  auto kss = at::bmm(fs, fs.transpose(1, 2)).add_(1).contiguous();
  auto aq = at::matmul(fq, wt).add_(b).contiguous();
  auto kqs = at::bmm(fq, fs.transpose(1, 2)).add_(1).contiguous();
  auto h = at::zeros({T, S, N}, fs.options());
  auto logits = at::empty({T, Q, N}, fs.options());
  auto losses = at::empty({T}, fs.options());
  AT_DISPATCH_FLOATING_TYPES(fs.scalar_type(), "anil_head_forward", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const scalar_t* z0_p = z0.data_ptr<scalar_t>();
    const scalar_t* kss_p = kss.data_ptr<scalar_t>();
    const scalar_t* aq_p = aq.data_ptr<scalar_t>();
    const scalar_t* kqs_p = kqs.data_ptr<scalar_t>();
    const int64_t* ys_p = ys.data_ptr<int64_t>();
    const int64_t* yq_p = yq.data_ptr<int64_t>();
    scalar_t* h_p = h.data_ptr<scalar_t>();
    scalar_t* logits_p = logits.data_ptr<scalar_t>();
    scalar_t* losses_p = losses.data_ptr<scalar_t>();
    const acc_t alr = static_cast<acc_t>(lr);
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> hh(S * N), p(S * N), z(S * N), row(N);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(hh.begin(), hh.end(), acc_t(0));
        for (int64_t k = 0; k < steps; ++k)
          inner_step<scalar_t, acc_t>(z0_p + t * S * N, kss_p + t * S * S, ys_p + t * S,
                                      hh.data(), p.data(), z.data(), S, N, alr);
        for (int64_t i = 0; i < S * N; ++i) h_p[t * S * N + i] = static_cast<scalar_t>(hh[i]);
        acc_t loss = 0;
        for (int64_t q = 0; q < Q; ++q) {
          const scalar_t* kq = kqs_p + (t * Q + q) * S;
          for (int64_t n = 0; n < N; ++n) row[n] = static_cast<acc_t>(aq_p[(t * Q + q) * N + n]);
          for (int64_t j = 0; j < S; ++j) {
            const acc_t k = alr * static_cast<acc_t>(kq[j]);
            for (int64_t n = 0; n < N; ++n) row[n] -= k * hh[j * N + n];
          }
          acc_t mx = *std::max_element(row.begin(), row.end());
          acc_t sum = 0;
          for (int64_t n = 0; n < N; ++n) {
            sum += std::exp(row[n] - mx);
            logits_p[(t * Q + q) * N + n] = static_cast<scalar_t>(row[n]);
          }
          loss += mx + std::log(sum) - row[yq_p[t * Q + q]];
        }
        losses_p[t] = static_cast<scalar_t>(loss / static_cast<acc_t>(Q));
      }
    });
  });
  return {losses, logits, z0, kss, kqs, h};
}

// Reverse of the small loop: from hbar (the adjoint of H_K) to the adjoints of Z_0 and Kss.
std::vector<at::Tensor> anil_head_reverse_loop(at::Tensor z0, at::Tensor kss, at::Tensor ys,
                                               at::Tensor hbar, double lr, int64_t steps) {
  z0 = z0.contiguous();
  kss = kss.contiguous();
  ys = ys.to(at::kLong).contiguous();
  hbar = hbar.contiguous();
  const int64_t T = z0.size(0), S = z0.size(1), N = z0.size(2);
  auto z0bar = at::zeros_like(z0);
  auto kssbar = at::zeros_like(kss);
  AT_DISPATCH_FLOATING_TYPES(z0.scalar_type(), "anil_head_reverse_loop", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const scalar_t* z0_p = z0.data_ptr<scalar_t>();
    const scalar_t* kss_p = kss.data_ptr<scalar_t>();
    const int64_t* ys_p = ys.data_ptr<int64_t>();
    const scalar_t* hbar_p = hbar.data_ptr<scalar_t>();
    scalar_t* z0bar_p = z0bar.data_ptr<scalar_t>();
    scalar_t* kssbar_p = kssbar.data_ptr<scalar_t>();
    const acc_t alr = static_cast<acc_t>(lr);
    const acc_t inv_s = acc_t(1) / static_cast<acc_t>(S);
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      // Per-thread history of the heads H_k and probabilities P_k of every step.
      std::vector<acc_t> hist_h(std::max<int64_t>(steps, 1) * S * N);
      std::vector<acc_t> hist_p(std::max<int64_t>(steps, 1) * S * N);
      std::vector<acc_t> hh(S * N), z(S * N), hb(S * N), zb(S * N), z0b(S * N), kb(S * S);
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* kt = kss_p + t * S * S;
        std::fill(hh.begin(), hh.end(), acc_t(0));
        for (int64_t k = 0; k < steps; ++k) {
          std::copy(hh.begin(), hh.end(), hist_h.begin() + k * S * N);
          inner_step<scalar_t, acc_t>(z0_p + t * S * N, kt, ys_p + t * S, hh.data(),
                                      hist_p.data() + k * S * N, z.data(), S, N, alr);
        }
        for (int64_t i = 0; i < S * N; ++i) hb[i] = static_cast<acc_t>(hbar_p[t * S * N + i]);
        std::fill(z0b.begin(), z0b.end(), acc_t(0));
        std::fill(kb.begin(), kb.end(), acc_t(0));
        for (int64_t k = steps - 1; k >= 0; --k) {
          const acc_t* P = hist_p.data() + k * S * N;
          const acc_t* Hk = hist_h.data() + k * S * N;
          // H_{k+1} = H_k + (softmax(Z_k) - Y)/S: the adjoint of Z_k is the softmax JVP.
          for (int64_t i = 0; i < S; ++i) {
            acc_t r = 0;
            for (int64_t n = 0; n < N; ++n) r += P[i * N + n] * hb[i * N + n];
            for (int64_t n = 0; n < N; ++n)
              zb[i * N + n] = P[i * N + n] * (hb[i * N + n] - r) * inv_s;
          }
          for (int64_t i = 0; i < S * N; ++i) z0b[i] += zb[i];
          // Z_k = Z_0 - lr Kss H_k: adjoints of Kss and of H_k.
          for (int64_t i = 0; i < S; ++i)
            for (int64_t j = 0; j < S; ++j) {
              acc_t acc = 0;
              for (int64_t n = 0; n < N; ++n) acc += zb[i * N + n] * Hk[j * N + n];
              kb[i * S + j] -= alr * acc;
            }
          for (int64_t i = 0; i < S; ++i)
            for (int64_t j = 0; j < S; ++j) {
              const acc_t k2 = alr * static_cast<acc_t>(kt[i * S + j]);
              if (k2 == acc_t(0)) continue;
              for (int64_t n = 0; n < N; ++n) hb[i * N + n] -= k2 * zb[j * N + n];
            }
        }
        for (int64_t i = 0; i < S * N; ++i) z0bar_p[t * S * N + i] = static_cast<scalar_t>(z0b[i]);
        for (int64_t i = 0; i < S * S; ++i) kssbar_p[t * S * S + i] = static_cast<scalar_t>(kb[i]);
      }
    });
  });
  return {z0bar, kssbar};
}

// Gradients {support_features, query_features, weight, bias} from the output gradients.
std::vector<at::Tensor> anil_head_backward(at::Tensor grad_losses, at::Tensor grad_logits,
                                           at::Tensor fs, at::Tensor ys, at::Tensor fq,
                                           at::Tensor yq, at::Tensor w, at::Tensor logits,
                                           at::Tensor z0, at::Tensor kss, at::Tensor kqs,
                                           at::Tensor h, double lr, int64_t steps,
                                           bool first_order) {
  const int64_t Q = fq.size(1), N = w.size(0);
  // Adjoint of the query logits: the upstream gradient plus the mean cross-entropy's.
  auto onehot = at::one_hot(yq.to(at::kLong), N).to(logits.scalar_type());
  auto zq_bar = (at::softmax(logits, -1) - onehot)
                    .mul_(grad_losses.view({-1, 1, 1}) / static_cast<double>(Q))
                    .add_(grad_logits);
  // query logits = Fq W^T + b - lr (Fq F^T + 1) H
  auto kqs_bar = at::bmm(zq_bar, h.transpose(1, 2)).mul_(-lr);  // [T,Q,S]
  auto g_fq = at::matmul(zq_bar, w).add_(at::bmm(kqs_bar, fs));
  auto g_w = at::matmul(zq_bar.flatten(0, 1).t(), fq.flatten(0, 1));
  auto g_b = zq_bar.sum({0, 1});
  at::Tensor g_fs;
  if (first_order) {  // the inner loop's gradients are constants: no support-feature gradient
    g_fs = at::zeros_like(fs);
  } else {
    auto hbar = at::bmm(kqs.transpose(1, 2), zq_bar).mul_(-lr);  // adjoint of H_K
    auto adj = anil_head_reverse_loop(z0, kss, ys, hbar, lr, steps);
    auto& z0_bar = adj[0];
    auto& kss_bar = adj[1];
    g_w.add_(at::matmul(z0_bar.flatten(0, 1).t(), fs.flatten(0, 1)));
    g_b.add_(z0_bar.sum({0, 1}));
    g_fs = at::matmul(z0_bar, w)
               .add_(at::bmm(kss_bar + kss_bar.transpose(1, 2), fs))
               .add_(at::bmm(kqs_bar.transpose(1, 2), fq));
  }
  return {g_fs, g_fq, g_w, g_b};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &anil_head_forward, "fused ANIL head: inner loop and query loss");
  m.def("backward", &anil_head_backward, "fused ANIL head: analytic backward");
}
