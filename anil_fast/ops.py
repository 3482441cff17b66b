"""The fused ANIL head as torch.library custom ops, with analytic backward.

Two implementations of one op (see csrc/anil_head.cpp and kernels/anil_head.py for the math):
- anil_fast::head_cpp: the C++ CPU op (ATen GEMMs + a parallel-over-tasks small loop),
  built at first use with torch.utils.cpp_extension into a cache folder;
- anil_fast::head_triton: torch GEMMs for the feature projections + one Triton launch for all
  inner steps and the query loss (forward), one for the reversed loop (backward).
Both are registered with fake (meta) implementations and `register_autograd`, so they run
under torch.compile(fullgraph=True) and inside CUDA graph capture without graph breaks.
Their backward ops are not themselves differentiable (no Hessian-vector products).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

_cpp_module = None
_cpp_error: str | None = None


def _extension_dir() -> Path:
    from .data.omniglot import user_cache_dir
    version = torch.__version__.replace("+", "_")
    return Path(os.environ.get("ANIL_FAST_EXTENSIONS", user_cache_dir() / "extensions")) / version


def cpp_extension():
    """The compiled C++ op (built once per torch version), or None with one warning."""
    global _cpp_module, _cpp_error
    if _cpp_module is not None or _cpp_error is not None:
        return _cpp_module
    try:
        from importlib.resources import files
        from torch.utils.cpp_extension import load
        source = Path(str(files("anil_fast.csrc") / "anil_head.cpp"))
        build = _extension_dir()
        build.mkdir(parents=True, exist_ok=True)
        _cpp_module = load(name="anil_fast_head", sources=[str(source)], build_directory=str(build),
                           extra_cflags=["-O3"], verbose=False)
    except Exception as exc:  # no compiler, no headers, no ninja: fall back, warn once
        _cpp_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        warnings.warn(f"anil_fast: the C++ head op could not be built ({_cpp_error}); the CPU "
                      f"falls back to the reference backend", RuntimeWarning, stacklevel=2)
    return _cpp_module


def triton_available(device: torch.device) -> bool:
    try:
        from .kernels import anil_head
    except ImportError:
        return False
    if not anil_head.HAVE_TRITON:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device) -> str:
    """The concrete backend ("reference", "cpp" or "triton") for tensors on `device`."""
    device = torch.device(device)
    if backend == "reference":
        return "reference"
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpp' needs CPU tensors, got {device}")
        if cpp_extension() is None:
            raise ValueError(f"backend 'cpp' is unavailable: {_cpp_error}")
        return "cpp"
    if backend == "triton":
        if not triton_available(device):
            raise ValueError("backend 'triton' needs triton and CUDA tensors (or TRITON_INTERPRET=1 "
                             f"for CPU tensors); got {device}")
        return "triton"
    # "fused" and "auto": the fused op for the device when it is available, else the reference
    if device.type == "cuda" and triton_available(device):
        return "triton"
    if device.type == "cpu" and cpp_extension() is not None:
        return "cpp"
    return "reference"


# -- shared pieces of the op -------------------------------------------------------------------
def _query_logit_adjoint(grad_losses, grad_logits, logits, yq):
    """Adjoint of the query logits: upstream gradient plus that of the mean cross-entropy."""
    q_rows, ways = logits.shape[1], logits.shape[2]
    # one-hot by comparison: F.one_hot checks its input on the host (a sync under CUDA graphs)
    onehot = (yq.unsqueeze(-1) == torch.arange(ways, device=yq.device)).to(logits.dtype)
    zq_bar = (logits.softmax(-1) - onehot) * (grad_losses.view(-1, 1, 1) / q_rows)
    return zq_bar + grad_logits


def _fake_outputs(fs, fq, w):
    tasks, s_rows, _ = fs.shape
    q_rows, ways = fq.shape[1], w.shape[0]
    return (fs.new_empty(tasks), fs.new_empty(tasks, q_rows, ways), fs.new_empty(tasks, s_rows, ways),
            fs.new_empty(tasks, s_rows, s_rows), fs.new_empty(tasks, q_rows, s_rows),
            fs.new_empty(tasks, s_rows, ways))


def _setup_context(ctx, inputs, output):
    fs, ys, fq, yq, w, b, lr, steps, first_order = inputs
    _, logits, z0, kss, kqs, h = output
    ctx.save_for_backward(fs, ys, fq, yq, w, logits, z0, kss, kqs, h)
    ctx.lr, ctx.steps, ctx.first_order = lr, steps, first_order


def _grads_or_zeros(ctx, grad_losses, grad_logits):
    fs, ys, fq, yq, w, logits = ctx.saved_tensors[:6]
    if grad_losses is None:
        grad_losses = logits.new_zeros(logits.shape[0])
    if grad_logits is None:
        grad_logits = torch.zeros_like(logits)
    return grad_losses, grad_logits


# -- C++ ---------------------------------------------------------------------------------------
@torch.library.custom_op("anil_fast::head_cpp", mutates_args=())
def head_cpp(fs: Tensor, ys: Tensor, fq: Tensor, yq: Tensor, w: Tensor, b: Tensor, lr: float,
             steps: int, first_order: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(losses, query logits, z0, kss, kqs, h); the last four are saved for the backward."""
    return tuple(cpp_extension().forward(fs, ys, fq, yq, w, b, lr, steps))


@torch.library.custom_op("anil_fast::head_cpp_backward", mutates_args=())
def head_cpp_backward(grad_losses: Tensor, grad_logits: Tensor, fs: Tensor, ys: Tensor,
                      fq: Tensor, yq: Tensor, w: Tensor, logits: Tensor, z0: Tensor, kss: Tensor,
                      kqs: Tensor, h: Tensor, lr: float, steps: int,
                      first_order: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(cpp_extension().backward(grad_losses, grad_logits, fs, ys, fq, yq, w, logits,
                                          z0, kss, kqs, h, lr, steps, first_order))




# -- Triton ------------------------------------------------------------------------------------
def _stacked_rows(fs, w):
    """R = [W; F_t] for every task, [T, N+S, D]: one GEMM operand for the head's rows and the
    support rows, so each pass reads the (large) query features once."""
    return torch.cat([w.unsqueeze(0).expand(fs.shape[0], -1, -1), fs], dim=1)


def _projections(fs, fq, w, b):
    """Z0 = F Wᵀ + b, Kss = F Fᵀ + 1, Aq = Fq Wᵀ + b, Kqs = Fq Fᵀ + 1, from two GEMMs."""
    ways = w.shape[0]
    rows_t = _stacked_rows(fs, w).transpose(1, 2)
    zs, zq = torch.bmm(fs, rows_t), torch.bmm(fq, rows_t)
    return zs[..., :ways] + b, zs[..., ways:] + 1, zq[..., :ways] + b, zq[..., ways:] + 1


@torch.library.custom_op("anil_fast::head_triton", mutates_args=())
def head_triton(fs: Tensor, ys: Tensor, fq: Tensor, yq: Tensor, w: Tensor, b: Tensor, lr: float,
                steps: int, first_order: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .kernels.anil_head import inner_loop_forward
    z0, kss, aq, kqs = _projections(fs, fq, w, b)
    h, logits, losses = inner_loop_forward(z0, kss, ys.contiguous(), aq, kqs, yq.contiguous(),
                                           lr, steps)
    # Out-of-range labels (not checked on the host on CUDA: no sync) make the loss NaN, never a
    # silently wrong number; the kernels mask them, so nothing is read out of bounds.
    ways = w.shape[0]
    bad = ((ys < 0) | (ys >= ways)).any() | ((yq < 0) | (yq >= ways)).any()
    losses = torch.where(bad, torch.full_like(losses, float("nan")), losses)
    return losses, logits, z0, kss, kqs, h


@torch.library.custom_op("anil_fast::head_triton_backward", mutates_args=())
def head_triton_backward(grad_losses: Tensor, grad_logits: Tensor, fs: Tensor, ys: Tensor,
                         fq: Tensor, yq: Tensor, w: Tensor, logits: Tensor, z0: Tensor,
                         kss: Tensor, kqs: Tensor, h: Tensor, lr: float, steps: int,
                         first_order: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .kernels.anil_head import inner_loop_reverse
    zq_bar = _query_logit_adjoint(grad_losses, grad_logits, logits, yq)
    # query logits = Fq W^T + b - lr (Fq F^T + 1) H
    kqs_bar = -lr * torch.bmm(zq_bar, h.transpose(1, 2))
    rows = _stacked_rows(fs, w)
    adj_q = torch.cat([zq_bar, kqs_bar], -1)
    g_fq = torch.bmm(adj_q, rows)  # Zq_bar W + Kqs_bar F, one pass
    g_b = zq_bar.sum((0, 1))
    if first_order:  # the inner loop's gradients are constants: no support-feature gradient
        return torch.zeros_like(fs), g_fq, zq_bar.flatten(0, 1).t() @ fq.flatten(0, 1), g_b
    # one read of Fq for both [Zq_bar | Kqs_bar]ᵀ Fq products: the weight's and the support's
    fq_products = torch.bmm(adj_q.transpose(1, 2), fq)  # [T, N+S, D]
    hbar = -lr * torch.bmm(kqs.transpose(1, 2), zq_bar)
    z0_bar, kss_bar = inner_loop_reverse(z0, kss, ys.contiguous(), hbar.contiguous(), lr, steps)
    ways = w.shape[0]
    g_w = fq_products[:, :ways].sum(0) + z0_bar.flatten(0, 1).t() @ fs.flatten(0, 1)
    g_b = g_b + z0_bar.sum((0, 1))
    # Z0_bar W + (Kss_bar + Kss_barᵀ) F + Kqs_barᵀ Fq
    g_fs = torch.baddbmm(fq_products[:, ways:],
                         torch.cat([z0_bar, kss_bar + kss_bar.transpose(1, 2)], -1), rows)
    return g_fs, g_fq, g_w, g_b


def _register(forward_op, backward_op) -> None:
    """Fake (meta) implementations and autograd for a (forward, backward) pair of ops."""
    @forward_op.register_fake
    def _(fs, ys, fq, yq, w, b, lr, steps, first_order):
        return _fake_outputs(fs, fq, w)

    @backward_op.register_fake
    def _(grad_losses, grad_logits, fs, ys, fq, yq, w, logits, z0, kss, kqs, h, lr, steps,
          first_order):
        return torch.empty_like(fs), torch.empty_like(fq), torch.empty_like(w), w.new_empty(w.shape[0])

    def backward(ctx, grad_losses, grad_logits, *_):
        grad_losses, grad_logits = _grads_or_zeros(ctx, grad_losses, grad_logits)
        g_fs, g_fq, g_w, g_b = backward_op(grad_losses, grad_logits, *ctx.saved_tensors,
                                           ctx.lr, ctx.steps, ctx.first_order)
        return g_fs, None, g_fq, None, g_w, g_b, None, None, None

    forward_op.register_autograd(backward, setup_context=_setup_context)


_register(head_cpp, head_cpp_backward)
_register(head_triton, head_triton_backward)
_OPS = {"cpp": head_cpp, "triton": head_triton}


def fused_adapted_query_loss(fs, ys, fq, yq, w, b, *, inner_lr, inner_steps, first_order, backend):
    """Run the fused op: computes in the promoted dtype (at least fp32: bf16/fp16 features are
    read as fp32), returns losses/logits in that dtype, gradients in each input's dtype."""
    dtype = torch.promote_types(torch.promote_types(fs.dtype, w.dtype), torch.float32)
    if backend == "cpp" and dtype not in (torch.float32, torch.float64):
        raise TypeError(f"backend 'cpp' takes float32 or float64, got {dtype}")
    cast = [x.to(dtype).contiguous() for x in (fs, fq, w, b)]
    losses, logits, *_ = _OPS[backend](cast[0], ys, cast[1], yq, cast[2], cast[3],
                                       float(inner_lr), int(inner_steps), bool(first_order))
    return losses, logits
