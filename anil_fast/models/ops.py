"""The fused ANIL head: one torch.library custom op, `anil_fast::adapted_head`, and its analytic
backward op `anil_fast::adapted_head_backward`, with their fake (meta) implementations and
autograd registered once, so they run under torch.compile(fullgraph=True) and inside CUDA-graph
capture without graph breaks. The backward op is not itself differentiable.

One host function per pass, written once in torch for every device, does the feature GEMMs:
    Z0 = F Wᵀ + b, Kss = F Fᵀ + 1, Aq = Fq Wᵀ + b, Kqs = Fq Fᵀ + 1      (forward)
and maps the adjoints of Z0, Kss, Kqs and the query logits back to W, b, F and Fq (backward).
Between them runs the *small loop* in the S x N space (every inner SGD step, the query loss, and
the loop's reverse), the only part with a kernel per device:
- CPU:  the C++ loop in csrc/anil_head.cpp (at::parallel_for over tasks, cache-resident),
        built at first use with torch.utils.cpp_extension into a cache folder;
- CUDA: the Triton kernels in kernels/anil_head.py (one launch per pass for all tasks).
The same loop in batched torch (kernels/anil_head.py, `torch_inner_loop_*`) is both kernels' test
oracle and the fallback where neither can run (no compiler; CUDA without triton; more than 64
ways or float64 on CUDA).

Out-of-range labels, the op's one contract on every device: the task's loss is NaN (the kernels
never read out of bounds and the op never syncs with the host). `functional.adapted_query_loss`
checks labels on the host first and raises ValueError wherever a check can run.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from anil_fast.env import cpu_key, extensions_dir
from anil_fast.errors import InputError
from anil_fast.kernels import anil_head

_cpp_module = None
_cpp_error: str | None = None


def _extension_dir() -> Path:
    """The C++ build folder: per torch version and per CPU (the build uses -march=native)."""
    return extensions_dir() / torch.__version__.replace("+", "_") / cpu_key()


def cpp_extension():
    """The compiled C++ small loop (built once per torch version and CPU), or None with one
    warning."""
    global _cpp_module, _cpp_error
    if _cpp_module is not None or _cpp_error is not None:
        return _cpp_module
    try:
        from importlib.resources import files
        from torch.utils.cpp_extension import load
        source = Path(str(files("anil_fast.csrc") / "anil_head.cpp"))
        build = _extension_dir()
        build.mkdir(parents=True, exist_ok=True)
        # -ffast-math lets the compiler call libmvec's vector exp in the softmax loops (the loop
        # tests no inf/NaN); -march=native is why the build folder is keyed by the CPU
        _cpp_module = load(name="anil_fast_small_loop", sources=[str(source)],
                           build_directory=str(build),
                           extra_cflags=["-O3", "-march=native", "-ffast-math"], verbose=False)
    except Exception as exc:  # no compiler, no headers, no ninja: fall back, warn once
        _cpp_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        warnings.warn(f"anil_fast: the C++ small loop could not be built ({_cpp_error}); the CPU "
                      f"runs the fused op's loop in batched torch instead", RuntimeWarning,
                      stacklevel=2)
    return _cpp_module


# -- the small loop, one implementation per device ----------------------------------------------
@dataclass(frozen=True)
class SmallLoop:
    """forward(z0, kss, ys, aq, kqs, yq, lr, steps) -> (H_K, query logits, losses);
    reverse(z0, kss, ys, hbar, lr, steps) -> (adjoint of Z0, adjoint of Kss).
    Inputs contiguous, labels int64, floats float32 or float64."""
    name: str
    forward: Callable
    reverse: Callable


TORCH_LOOP = SmallLoop("torch", anil_head.torch_inner_loop_forward, anil_head.torch_inner_loop_reverse)
TRITON_LOOP = SmallLoop("triton", anil_head.inner_loop_forward, anil_head.inner_loop_reverse)


def _cpp_forward(z0, kss, ys, aq, kqs, yq, lr, steps):
    h = cpp_extension().small_loop_forward(z0, kss, ys, lr, steps)
    return (h, *anil_head.query_logits_and_losses(h, aq, kqs, yq, lr))


def _cpp_reverse(z0, kss, ys, hbar, lr, steps):
    zb, hist = cpp_extension().small_loop_reverse(z0, kss, ys, hbar, lr, steps)
    # the C++ loop keeps each task's matrices transposed: [T, steps, N, S] -> [T, S, steps, N]
    return anil_head.adjoints_from_history(zb.permute(0, 3, 1, 2), hist.permute(0, 3, 1, 2),
                                           z0.shape[1], z0.shape[2], lr)


CPP_LOOP = SmallLoop("cpp", _cpp_forward, _cpp_reverse)

# The CPU's small loop: None picks C++ (batched torch where it cannot be built). "triton" runs
# the Triton kernels on CPU tensors under TRITON_INTERPRET=1: how the tests check them here.
CPU_LOOP: str | None = None


def small_loop(device: torch.device) -> SmallLoop:
    """The small-loop kernel the op runs for tensors on `device`."""
    if device.type == "cuda":
        return TRITON_LOOP if anil_head.HAVE_TRITON else TORCH_LOOP
    choice = CPU_LOOP or ("cpp" if cpp_extension() is not None else "torch")
    if choice == "triton" and not triton_interpreter():
        raise InputError("CPU_LOOP = 'triton' needs triton and TRITON_INTERPRET=1")
    return {"cpp": CPP_LOOP, "triton": TRITON_LOOP, "torch": TORCH_LOOP}[choice]


def triton_interpreter() -> bool:
    return anil_head.HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1"


def fused_device(device) -> bool:
    """Whether the fused op has a kernel for tensors on `device`."""
    return torch.device(device).type in ("cpu", "cuda")


# -- the host side, one function per pass for every device --------------------------------------
def _stacked_rows(fs, w):
    """R = [W; F_t] for every task, [T, N+S, D]: one GEMM operand for the head's rows and the
    support rows, so each pass reads the (large) query features once. W: [N, D] shared by the
    tasks, or [T, N, D], each task's own (a per-task initial head)."""
    head = w if w.dim() == 3 else w.unsqueeze(0).expand(fs.shape[0], -1, -1)
    return torch.cat([head, fs], dim=1)


def _row_bias(b):
    """b broadcast over a task's rows: [N] as it is, per-task [T, N] as [T, 1, N]."""
    return b if b.dim() == 1 else b.unsqueeze(1)


def projections(fs, fq, w, b):
    """Z0 = F Wᵀ + b, Kss = F Fᵀ + 1, Aq = Fq Wᵀ + b, Kqs = Fq Fᵀ + 1, from two GEMMs."""
    ways = w.shape[-2]
    rows_t = _stacked_rows(fs, w).transpose(1, 2)
    zs, zq = torch.bmm(fs, rows_t), torch.bmm(fq, rows_t)
    bias = _row_bias(b)
    return zs[..., :ways] + bias, zs[..., ways:] + 1, zq[..., :ways] + bias, zq[..., ways:] + 1


def _tasks_with_bad_labels(ys, yq, ways):
    return ((ys < 0) | (ys >= ways)).any(1) | ((yq < 0) | (yq >= ways)).any(1)


def host_forward(fs, ys, fq, yq, w, b, lr: float, steps: int, loop: SmallLoop):
    """(losses, query logits, z0, kss, kqs, h); the last four are saved for the backward."""
    z0, kss, aq, kqs = projections(fs, fq, w, b)
    ys, yq = ys.long().contiguous(), yq.long().contiguous()
    h, logits, losses = loop.forward(z0, kss, ys, aq, kqs, yq, lr, steps)
    losses = losses.masked_fill(_tasks_with_bad_labels(ys, yq, w.shape[-2]), float("nan"))
    return losses, logits, z0, kss, kqs, h


def host_backward(grad_losses, grad_logits, fs, ys, fq, yq, w, logits, z0, kss, kqs, h,
                  lr: float, steps: int, first_order: bool, loop: SmallLoop):
    """Gradients (support features, query features, weight, bias); a per-task head ([T, N, D])
    gets per-task gradients, a shared one their sum over tasks."""
    per_task = w.dim() == 3
    q_rows, ways = logits.shape[1], logits.shape[2]
    # Adjoint of the query logits: the upstream gradient plus the mean cross-entropy's
    onehot = anil_head.one_hot(yq, ways, logits.dtype)
    zq_bar = (logits.softmax(-1) - onehot) * (grad_losses.view(-1, 1, 1) / q_rows) + grad_logits
    # query logits = Fq Wᵀ + b - lr (Fq Fᵀ + 1) H
    kqs_bar = -lr * torch.bmm(zq_bar, h.transpose(1, 2))
    rows = _stacked_rows(fs, w)
    adj_q = torch.cat([zq_bar, kqs_bar], -1)
    g_fq = torch.bmm(adj_q, rows)  # Zq_bar W + Kqs_bar F, one pass
    g_b = zq_bar.sum(1) if per_task else zq_bar.sum((0, 1))
    if first_order:  # the inner loop's gradients are constants: no support-feature gradient
        g_w = torch.bmm(zq_bar.transpose(1, 2), fq) if per_task else \
            zq_bar.flatten(0, 1).t() @ fq.flatten(0, 1)
        return torch.zeros_like(fs), g_fq, g_w, g_b
    # one read of Fq for both [Zq_bar | Kqs_bar]ᵀ Fq products: the weight's and the support's
    fq_products = torch.bmm(adj_q.transpose(1, 2), fq)  # [T, N+S, D]
    hbar = -lr * torch.bmm(kqs.transpose(1, 2), zq_bar)
    z0_bar, kss_bar = loop.reverse(z0, kss, ys.long().contiguous(), hbar.contiguous(), lr, steps)
    if per_task:
        g_w = fq_products[:, :ways] + torch.bmm(z0_bar.transpose(1, 2), fs)
        g_b = g_b + z0_bar.sum(1)
    else:
        g_w = fq_products[:, :ways].sum(0) + z0_bar.flatten(0, 1).t() @ fs.flatten(0, 1)
        g_b = g_b + z0_bar.sum((0, 1))
    # Z0_bar W + (Kss_bar + Kss_barᵀ) F + Kqs_barᵀ Fq
    g_fs = torch.baddbmm(fq_products[:, ways:],
                         torch.cat([z0_bar, kss_bar + kss_bar.transpose(1, 2)], -1), rows)
    return g_fs, g_fq, g_w, g_b


# -- the op: registered once, a kernel per device -----------------------------------------------
@torch.library.custom_op("anil_fast::adapted_head", mutates_args=(), device_types="cpu")
def adapted_head(fs: Tensor, ys: Tensor, fq: Tensor, yq: Tensor, w: Tensor, b: Tensor, lr: float,
                 steps: int, first_order: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(losses [T], query logits [T,Q,N], z0, kss, kqs, h): `steps` SGD steps of the head (w, b)
    on each task's support set, then its query logits and mean query cross-entropy.
    `first_order` only changes the backward."""
    return host_forward(fs, ys, fq, yq, w, b, lr, steps, small_loop(fs.device))


@adapted_head.register_kernel("cuda")
def _(fs, ys, fq, yq, w, b, lr, steps, first_order):
    return host_forward(fs, ys, fq, yq, w, b, lr, steps, small_loop(fs.device))


@torch.library.custom_op("anil_fast::adapted_head_backward", mutates_args=(), device_types="cpu")
def adapted_head_backward(grad_losses: Tensor, grad_logits: Tensor, fs: Tensor, ys: Tensor,
                          fq: Tensor, yq: Tensor, w: Tensor, logits: Tensor, z0: Tensor,
                          kss: Tensor, kqs: Tensor, h: Tensor, lr: float, steps: int,
                          first_order: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return host_backward(grad_losses, grad_logits, fs, ys, fq, yq, w, logits, z0, kss, kqs, h,
                         lr, steps, first_order, small_loop(fs.device))


@adapted_head_backward.register_kernel("cuda")
def _(grad_losses, grad_logits, fs, ys, fq, yq, w, logits, z0, kss, kqs, h, lr, steps, first_order):
    return host_backward(grad_losses, grad_logits, fs, ys, fq, yq, w, logits, z0, kss, kqs, h,
                         lr, steps, first_order, small_loop(fs.device))


@adapted_head.register_fake
def _(fs, ys, fq, yq, w, b, lr, steps, first_order):
    tasks, s_rows, _ = fs.shape
    q_rows, ways = fq.shape[1], w.shape[-2]
    return (fs.new_empty(tasks), fs.new_empty(tasks, q_rows, ways), fs.new_empty(tasks, s_rows, ways),
            fs.new_empty(tasks, s_rows, s_rows), fs.new_empty(tasks, q_rows, s_rows),
            fs.new_empty(tasks, s_rows, ways))


@adapted_head_backward.register_fake
def _(grad_losses, grad_logits, fs, ys, fq, yq, w, logits, z0, kss, kqs, h, lr, steps, first_order):
    return torch.empty_like(fs), torch.empty_like(fq), torch.empty_like(w), w.new_empty(w.shape[:-1])


def _setup_context(ctx, inputs, output):
    fs, ys, fq, yq, w, b, lr, steps, first_order = inputs
    _, logits, z0, kss, kqs, h = output
    ctx.save_for_backward(fs, ys, fq, yq, w, logits, z0, kss, kqs, h)
    ctx.lr, ctx.steps, ctx.first_order = lr, steps, first_order


def _backward(ctx, grad_losses, grad_logits, *_):
    logits = ctx.saved_tensors[5]
    if grad_losses is None:
        grad_losses = logits.new_zeros(logits.shape[0])
    if grad_logits is None:
        grad_logits = torch.zeros_like(logits)
    g_fs, g_fq, g_w, g_b = adapted_head_backward(grad_losses, grad_logits, *ctx.saved_tensors,
                                                 ctx.lr, ctx.steps, ctx.first_order)
    return g_fs, None, g_fq, None, g_w, g_b, None, None, None


adapted_head.register_autograd(_backward, setup_context=_setup_context)


def fused_adapted_query_loss(fs, ys, fq, yq, w, b, *, inner_lr, inner_steps, first_order):
    """Run the op: computes in the promoted dtype (at least fp32: bf16/fp16 features are read as
    fp32), returns losses/logits in that dtype, gradients in each input's dtype."""
    dtype = torch.promote_types(torch.promote_types(fs.dtype, w.dtype), torch.float32)
    cast = [x.to(dtype).contiguous() for x in (fs, fq, w, b)]
    losses, logits, *_ = adapted_head(cast[0], ys, cast[1], yq, cast[2], cast[3],
                                      float(inner_lr), int(inner_steps), bool(first_order))
    return losses, logits
