"""Shared test helpers: random head problems and an explicit per-task loop."""
import torch
import torch.nn.functional as F


def head_problem(tasks, s_rows, q_rows, dim, ways, dtype=torch.float64, seed=0, device="cpu",
                 scale=1.0):
    g = torch.Generator().manual_seed(seed)
    fs = (torch.randn(tasks, s_rows, dim, generator=g, dtype=dtype) * scale).to(device)
    fq = (torch.randn(tasks, q_rows, dim, generator=g, dtype=dtype) * scale).to(device)
    ys = torch.randint(0, ways, (tasks, s_rows), generator=g).to(device)
    yq = torch.randint(0, ways, (tasks, q_rows), generator=g).to(device)
    w = (torch.randn(ways, dim, generator=g, dtype=dtype) / dim ** 0.5).to(device)
    b = (torch.randn(ways, generator=g, dtype=dtype) * 0.1).to(device)
    return fs, ys, fq, yq, w, b


def per_task_loop(fs, ys, fq, yq, w, b, inner_lr, inner_steps, first_order):
    """The ANIL head as the write-ups show it: one task at a time, autograd for each step."""
    losses, logits = [], []
    for t in range(fs.shape[0]):
        wt, bt = w, b
        for _ in range(inner_steps):
            loss = F.cross_entropy(fs[t] @ wt.T + bt, ys[t])
            gw, gb = torch.autograd.grad(loss, (wt, bt), create_graph=not first_order)
            if first_order:
                gw, gb = gw.detach(), gb.detach()
            wt, bt = wt - inner_lr * gw, bt - inner_lr * gb
        q = fq[t] @ wt.T + bt
        logits.append(q)
        losses.append(F.cross_entropy(q, yq[t]))
    return torch.stack(losses), torch.stack(logits)


def grads_of(fn, inputs, seed=0):
    """Gradients of a random linear functional of fn's (losses, logits) w.r.t. inputs."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    losses, logits = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    cl = torch.randn(losses.shape, generator=g, dtype=torch.float64).to(losses)
    cq = torch.randn(logits.shape, generator=g, dtype=torch.float64).to(logits)
    total = (losses * cl).sum() + (logits * cq).sum()
    grads = torch.autograd.grad(total, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(inputs, grads)]
    return losses.detach(), logits.detach(), grads
