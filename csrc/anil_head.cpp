// The fused ANIL head on the CPU: every inner-loop SGD step of a linear head and the query
// loss, for all tasks of a meta-batch, with an analytic (second-order) backward.
//
// Why it is cheap: after k steps the adapted head is W_k = W - lr * H_k^T F and
// b_k = b - lr * 1^T H_k, where H_k = G_0 + ... + G_{k-1} [S, N] sums the support-logit
// gradients. So the support logits are Z_k = Z_0 - lr * Kss H_k with Kss = F F^T + 1, and the
// whole inner loop runs in the small S x N space after one pass over the features:
//   Z_0 = F W^T + b, Kss = F F^T + 1, Aq = Fq W^T + b, Kqs = Fq F^T + 1   (GEMMs)
//   for k: P = softmax(Z_0 - lr Kss H); H += (P - Y) / S                 (small: S x N per task)
//   query logits = Aq - lr Kqs H; loss = mean cross-entropy.
// The backward reverses the small loop (softmax Jacobian-vector products) and maps the
// adjoints of Z_0, Kss, Kqs and Aq back to W, b, F and Fq with GEMMs.
//
// Every operation is batched over the tasks (one ATen call for all tasks, parallel inside):
// per-task calls cost more in dispatch than small tasks cost in arithmetic. The feature GEMMs
// use R = [W; F] per task as one operand, so each pass reads the query features once.
#include <torch/extension.h>

#include <utility>
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
  TORCH_CHECK(fs.scalar_type() == at::kFloat || fs.scalar_type() == at::kDouble,
              "anil_head (C++): float32 or float64");
  TORCH_CHECK(fs.device().is_cpu(), "anil_head (C++): CPU tensors only");
  const int64_t n = w.size(0);
  TORCH_CHECK(ys.numel() == 0 || (ys.min().item<int64_t>() >= 0 && ys.max().item<int64_t>() < n),
              "anil_head: support_labels out of range");
  TORCH_CHECK(yq.numel() == 0 || (yq.min().item<int64_t>() >= 0 && yq.max().item<int64_t>() < n),
              "anil_head: query_labels out of range");
}

// R = [W; F_t] for every task: [T, N+S, D].
at::Tensor stacked_rows(const at::Tensor& fs, const at::Tensor& w) {
  return at::cat({w.unsqueeze(0).expand({fs.size(0), w.size(0), w.size(1)}), fs}, 1);
}

at::Tensor one_hot(const at::Tensor& labels, int64_t ways, const at::Tensor& like) {
  return labels.unsqueeze(-1).eq(at::arange(ways, labels.options())).to(like.scalar_type());
}

// One inner step for all tasks: H + (softmax(Z0 - lr Kss H) - Y) / S. Also returns P.
std::pair<at::Tensor, at::Tensor> inner_step(const at::Tensor& z0, const at::Tensor& kss,
                                             const at::Tensor& y, const at::Tensor& h, double lr) {
  auto p = at::softmax(at::baddbmm(z0, kss, h, 1.0, -lr), -1);
  return {h + (p - y) / static_cast<double>(z0.size(1)), p};
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
  const int64_t N = w.size(0);
  auto rows_t = stacked_rows(fs, w).transpose(1, 2);
  auto zs = at::bmm(fs, rows_t);  // [F W^T | F F^T]
  auto zq = at::bmm(fq, rows_t);  // [Fq W^T | Fq F^T]
  auto z0 = zs.narrow(2, 0, N) + b;
  auto kss = zs.narrow(2, N, fs.size(1)) + 1;
  auto aq = zq.narrow(2, 0, N) + b;
  auto kqs = zq.narrow(2, N, fs.size(1)) + 1;
  auto y = one_hot(ys, N, z0);
  auto h = at::zeros_like(z0);
  for (int64_t k = 0; k < steps; ++k) h = inner_step(z0, kss, y, h, lr).first;
  auto logits = at::baddbmm(aq, kqs, h, 1.0, -lr);
  auto losses = at::cross_entropy_loss(logits.flatten(0, 1), yq.flatten().to(at::kLong), {},
                                       at::Reduction::None)
                    .view({fq.size(0), fq.size(1)})
                    .mean(1);
  return {losses, logits, z0, kss, kqs, h};
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
  const int64_t Q = fq.size(1), N = w.size(0);
  // Adjoint of the query logits: the upstream gradient plus the mean cross-entropy's.
  auto zq_bar = (at::softmax(logits, -1) - one_hot(yq, N, logits)) *
                    (grad_losses.view({-1, 1, 1}) / static_cast<double>(Q)) + grad_logits;
  // query logits = Fq W^T + b - lr (Fq F^T + 1) H
  auto kqs_bar = at::bmm(zq_bar, h.transpose(1, 2)).mul_(-lr);  // adjoint of Kqs
  auto rows = stacked_rows(fs, w);
  auto adj_q = at::cat({zq_bar, kqs_bar}, -1);
  auto g_fq = at::bmm(adj_q, rows);  // Zq_bar W + Kqs_bar F
  auto g_b = zq_bar.sum({0, 1});
  if (first_order) {  // the inner loop's gradients are constants: no support-feature gradient
    return {at::zeros_like(fs), g_fq, at::mm(zq_bar.flatten(0, 1).t(), fq.flatten(0, 1)), g_b};
  }
  // One read of Fq for both [Zq_bar | Kqs_bar]^T Fq products: the weight's and the support's.
  auto fq_products = at::bmm(adj_q.transpose(1, 2), fq);  // [T, N+S, D]
  // Reverse the small loop. H_k and P_k of every step are recomputed (cheap: S x N per task).
  auto y = one_hot(ys, N, z0);
  std::vector<at::Tensor> hs, ps;
  auto hk = at::zeros_like(z0);
  for (int64_t k = 0; k < steps; ++k) {
    auto next = inner_step(z0, kss, y, hk, lr);
    hs.push_back(hk);
    ps.push_back(next.second);
    hk = next.first;
  }
  auto hbar = at::bmm(kqs.transpose(1, 2), zq_bar).mul_(-lr);  // adjoint of H_K
  auto z0_bar = at::zeros_like(z0);
  auto kss_bar = at::zeros_like(kss);
  const double inv_s = 1.0 / static_cast<double>(fs.size(1));
  for (int64_t k = steps - 1; k >= 0; --k) {
    // H_{k+1} = H_k + (softmax(Z_k) - Y)/S: the adjoint of Z_k is the softmax JVP ...
    auto& p = ps[k];
    auto zb = p * (hbar - (p * hbar).sum(-1, true)) * inv_s;
    z0_bar.add_(zb);
    // ... and Z_k = Z_0 - lr Kss H_k passes it on to Kss and to H_k.
    kss_bar.baddbmm_(zb, hs[k].transpose(1, 2), 1.0, -lr);
    hbar.baddbmm_(kss, zb, 1.0, -lr);  // Kss is symmetric
  }
  auto g_w = fq_products.narrow(1, 0, N).sum(0).addmm_(z0_bar.flatten(0, 1).t(), fs.flatten(0, 1));
  g_b.add_(z0_bar.sum({0, 1}));
  // Z0_bar W + (Kss_bar + Kss_bar^T) F + Kqs_bar^T Fq
  auto g_fs = at::baddbmm(fq_products.narrow(1, N, fs.size(1)),
                          at::cat({z0_bar, kss_bar + kss_bar.transpose(1, 2)}, -1), rows);
  return {g_fs, g_fq, g_w, g_b};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &anil_head_forward, "fused ANIL head: inner loop and query loss");
  m.def("backward", &anil_head_backward, "fused ANIL head: analytic backward");
}
