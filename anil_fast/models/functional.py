"""The ANIL head loss: adapt a linear head on each task's support features by plain SGD, then
score the query features.

`adapted_query_loss(...)` is the one entry point; its backends compute the same thing:
- "reference": plain PyTorch autograd, batched over tasks (defines the semantics);
- "fused": the custom op `anil_fast::adapted_head` (ops.py), analytic backward; its small loop
  runs in C++ on the CPU and as Triton kernels on CUDA;
- "auto": "fused" where the op has a kernel for the tensors' device (CPU, CUDA), else "reference";
- "per_task": the per-task Python loop of the ANIL write-ups (the benchmarks' baseline).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from anil_fast.config import backend_name
from anil_fast.errors import InputError, InputTypeError, is_int




def _tracing_or_capturing(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def validate_head_inputs(support_features, support_labels, query_features, query_labels,
                         weight, bias, inner_lr, inner_steps) -> None:
    """Clear ValueError/TypeError naming the argument for every malformed input."""
    floats = {"support_features": support_features, "query_features": query_features,
              "weight": weight, "bias": bias}
    for name, t in floats.items():
        if not isinstance(t, torch.Tensor):
            raise InputTypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise InputTypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    for name, t in (("support_labels", support_labels), ("query_labels", query_labels)):
        if not isinstance(t, torch.Tensor):
            raise InputTypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in (torch.int64, torch.int32):
            raise InputTypeError(f"{name} must be an int64 tensor of class indices, got {t.dtype}")
    if support_features.dim() != 3:
        raise InputError(f"support_features must be [tasks, S, D], got shape {tuple(support_features.shape)}")
    if query_features.dim() != 3:
        raise InputError(f"query_features must be [tasks, Q, D], got shape {tuple(query_features.shape)}")
    tasks, s_rows, dim = support_features.shape
    if weight.dim() not in (2, 3) or (weight.dim() == 3 and weight.shape[0] != tasks):
        raise InputError(f"weight must be [ways, D] (shared) or [tasks, ways, D] (per task), got "
                         f"shape {tuple(weight.shape)} for {tasks} tasks")
    ways = weight.shape[-2]
    if query_features.shape[0] != tasks or query_features.shape[2] != dim:
        raise InputError(f"query_features has shape {tuple(query_features.shape)}, which disagrees "
                         f"with support_features {tuple(support_features.shape)} (tasks, D)")
    if support_labels.shape != (tasks, s_rows):
        raise InputError(f"support_labels must have shape {(tasks, s_rows)}, got {tuple(support_labels.shape)}")
    if query_labels.shape != query_features.shape[:2]:
        raise InputError(f"query_labels must have shape {tuple(query_features.shape[:2])}, got "
                         f"{tuple(query_labels.shape)}")
    if weight.shape[-1] != dim:
        raise InputError(f"weight has {weight.shape[-1]} input features, the features have {dim}")
    if bias.shape != weight.shape[:-1]:
        raise InputError(f"bias must have shape {tuple(weight.shape[:-1])} (weight's without D), "
                         f"got {tuple(bias.shape)}")
    if tasks == 0 or s_rows == 0 or query_features.shape[1] == 0 or ways < 1:
        raise InputError("support_features/query_features must hold at least one task, one row "
                         "and one way")
    devices = {t.device for t in (*floats.values(), support_labels, query_labels)}
    if len(devices) != 1:
        raise InputError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    dtypes = {t.dtype for t in (weight, bias)}
    if len(dtypes) != 1:
        raise InputTypeError(f"weight and bias must share a dtype, got {sorted(map(str, dtypes))}")
    if support_features.dtype != query_features.dtype:
        raise InputTypeError(f"support_features ({support_features.dtype}) and query_features "
                             f"({query_features.dtype}) must share a dtype")
    if not is_int(inner_steps):
        raise InputTypeError(f"inner_steps must be an int, got {type(inner_steps).__name__}")
    if inner_steps < 0:
        raise InputError(f"inner_steps must be >= 0, got {inner_steps}")
    if isinstance(inner_lr, torch.Tensor) or not isinstance(inner_lr, (int, float)):
        raise InputTypeError(f"inner_lr must be a Python float, got {type(inner_lr).__name__}")
    if not math.isfinite(inner_lr):
        raise InputError(f"inner_lr must be finite, got {inner_lr}")


def check_label_values(support_labels, query_labels, ways: int) -> None:
    """Labels outside 0..ways-1 would silently index the wrong class: a ValueError, on every
    device (a host sync on CUDA). Skipped where no sync is allowed (torch.compile tracing, CUDA
    graph capture): there the fused op's own contract applies, a NaN loss for the task."""
    if _tracing_or_capturing(support_labels) or support_labels.device.type == "meta":
        return
    for name, labels in (("support_labels", support_labels), ("query_labels", query_labels)):
        if labels.numel() and not bool(((labels >= 0) & (labels < ways)).all()):
            raise InputError(f"{name} must lie in 0..{ways - 1} (ways = the head's outputs)")


def per_task_head(weight, bias, tasks: int):
    """The initial head as [T, N, D], [T, N]: a shared head expanded (no copy), a per-task
    head as it is."""
    if weight.dim() == 3:
        return weight, bias
    return weight.unsqueeze(0).expand(tasks, -1, -1), bias.unsqueeze(0).expand(tasks, -1)


def reference_adapted_query_loss(support_features, support_labels, query_features, query_labels,
                                 weight, bias, *, inner_lr, inner_steps, first_order):
    """Plain autograd, batched over tasks; exact (every task has its own head copy).
    The inner gradients come from torch.autograd.grad of the support loss, with create_graph
    for second order and detached for first order."""
    tasks, s_rows, _ = support_features.shape
    ways = weight.shape[-2]
    dtype = torch.promote_types(weight.dtype, support_features.dtype)
    fs, fq = support_features.to(dtype), query_features.to(dtype)
    w, b = per_task_head(weight.to(dtype), bias.to(dtype), tasks)
    ys = support_labels.long().reshape(-1)
    outer_grad = torch.is_grad_enabled()
    if not outer_grad:  # views made under no_grad claim requires_grad but have no graph
        w, b, fs = w.detach(), b.detach(), fs.detach()
    for _ in range(inner_steps):
        with torch.enable_grad():  # inner gradients even under torch.no_grad (evaluation)
            w_in = w if w.requires_grad else w.detach().requires_grad_()
            b_in = b if b.requires_grad else b.detach().requires_grad_()
            logits = torch.baddbmm(b_in.unsqueeze(1), fs, w_in.transpose(1, 2))  # [T,S,N]
            # Sum over tasks of each task's mean: task t's gradient is that of its own loss.
            loss = F.cross_entropy(logits.reshape(-1, ways), ys, reduction="sum") / s_rows
            create = not first_order and outer_grad and \
                (w.requires_grad or b.requires_grad or fs.requires_grad)
            gw, gb = torch.autograd.grad(loss, (w_in, b_in), create_graph=create)
        if not create:
            gw, gb = gw.detach(), gb.detach()
        w = w - inner_lr * gw
        b = b - inner_lr * gb
    q_logits = torch.baddbmm(b.unsqueeze(1), fq, w.transpose(1, 2))
    losses = F.cross_entropy(q_logits.reshape(-1, ways), query_labels.long().reshape(-1),
                             reduction="none").view(tasks, -1).mean(dim=1)
    return losses, q_logits


def per_task_adapted_query_loss(support_features, support_labels, query_features, query_labels,
                                weight, bias, *, inner_lr, inner_steps, first_order):
    """The ANIL head as the write-ups show it: a Python loop over tasks, autograd for every
    inner step (create_graph for second order). Slow; the baseline the benchmarks beat."""
    # the same dtype rules as the reference: compute in the promoted dtype, int64 labels
    dtype = torch.promote_types(weight.dtype, support_features.dtype)
    support_features, query_features = support_features.to(dtype), query_features.to(dtype)
    weight, bias = weight.to(dtype), bias.to(dtype)
    support_labels, query_labels = support_labels.long(), query_labels.long()
    losses, logits = [], []
    tasks = support_features.shape[0]
    weights, biases = per_task_head(weight, bias, tasks)
    outer_grad = torch.is_grad_enabled()
    if not outer_grad:  # evaluation: views made under no_grad claim requires_grad, no graph
        weights, biases = weights.detach(), biases.detach()
        support_features = support_features.detach()
    for t in range(tasks):
        w, b = weights[t], biases[t]
        for _ in range(inner_steps):
            with torch.enable_grad():  # inner gradients even under torch.no_grad (evaluation)
                # a head that is no parameter (zero init, or evaluation): a leaf of its own
                w_in = w if w.requires_grad else w.detach().requires_grad_()
                b_in = b if b.requires_grad else b.detach().requires_grad_()
                loss = F.cross_entropy(support_features[t] @ w_in.T + b_in, support_labels[t])
                create = not first_order and outer_grad
                gw, gb = torch.autograd.grad(loss, (w_in, b_in), create_graph=create)
            if not create:
                gw, gb = gw.detach(), gb.detach()
            w, b = w - inner_lr * gw, b - inner_lr * gb
        q = query_features[t] @ w.T + b
        logits.append(q)
        losses.append(F.cross_entropy(q, query_labels[t]))
    return torch.stack(losses), torch.stack(logits)


def adapted_head(weight, bias, support_features, support_labels, *, inner_lr, inner_steps):
    """One task's head after the inner loop, as the reference computes it: `inner_steps` SGD
    steps of (weight [N, D], bias [N]) on the mean cross-entropy of support_features [S, D]
    with support_labels [S]. Returns detached (weight, bias): what an exported classifier
    keeps (export.py)."""
    w, b = weight.detach(), bias.detach()
    fs = support_features.detach().to(w.dtype)
    for _ in range(inner_steps):
        with torch.enable_grad():
            w_in, b_in = w.requires_grad_(), b.requires_grad_()
            loss = F.cross_entropy(fs @ w_in.T + b_in, support_labels.long())
            gw, gb = torch.autograd.grad(loss, (w_in, b_in))
        w, b = (w - inner_lr * gw).detach(), (b - inner_lr * gb).detach()
    return w, b


def auto_prefers_reference(support_features) -> bool:
    """Where "auto" runs the reference instead of the fused op: on the CPU when a task has more
    support rows than feature dimensions (the op's loop works on S x S Gram matrices, the
    reference's on S x D features). Measured on the CPU (benches/test_bench_head.py prints which
    was faster and what auto picked): 20-way 5-shot at D = 64, fused 0.6x of the reference;
    at D = 512, 1.0-1.7x; 5-way 1-shot, 1.9-5x. Not measured on a GPU yet: CUDA always fuses."""
    tasks, s_rows, dim = support_features.shape
    return support_features.device.type == "cpu" and s_rows > dim


def adapted_query_loss(support_features, support_labels, query_features, query_labels, weight,
                       bias, *, inner_lr, inner_steps, first_order, backend="auto",
                       check_labels=True):
    """Per task: `inner_steps` SGD steps of the head (weight [N,D], bias [N] shared by every
    task, or [T,N,D], [T,N]: each task's own initial head, e.g. from its prototypes) on the
    mean cross-entropy of the support logits F Wᵀ + b, then the query logits [T,Q,N] and the
    mean query cross-entropy [T]. Returns (losses, query_logits).

    second order (first_order=False): differentiable through the inner loop w.r.t. all four
    float tensors. First order: inner-loop gradients are constants, so the support features get
    no gradient and weight/bias get the query loss's gradient at the adapted head.

    Labels outside 0..ways-1: a ValueError, on every device. check_labels=False skips that host
    check (a sync on CUDA) where the fused op runs, whose own contract then applies on every
    device: a NaN loss for the task (ANIL's meta-steps do this); the reference paths always
    check, since they would index out of bounds.
    """
    backend = backend_name(backend)
    validate_head_inputs(support_features, support_labels, query_features, query_labels,
                         weight, bias, inner_lr, inner_steps)
    if not isinstance(first_order, bool):
        raise InputTypeError(f"first_order must be a bool, got {type(first_order).__name__}")
    from anil_fast.models import ops  # the fused op; imported lazily (triton and the C++ build are optional)
    device = support_features.device
    if backend == "fused" and not ops.fused_device(device):
        raise InputError(f"backend 'fused' has kernels for CPU and CUDA tensors, got {device}")
    fused = backend == "fused" or backend == "auto" and ops.fused_device(device) and not \
        auto_prefers_reference(support_features)
    if check_labels or not fused:
        check_label_values(support_labels, query_labels, weight.shape[-2])
    args = (support_features, support_labels, query_features, query_labels, weight, bias)
    kwargs = dict(inner_lr=float(inner_lr), inner_steps=inner_steps, first_order=first_order)
    if fused:
        return ops.fused_adapted_query_loss(*args, **kwargs)
    if backend == "per_task":
        return per_task_adapted_query_loss(*args, **kwargs)
    return reference_adapted_query_loss(*args, **kwargs)
