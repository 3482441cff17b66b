"""End-to-end meta-steps: the fast path (batched body with per-task BatchNorm, fused head,
bf16 and a whole-step CUDA graph on a GPU) against the per-task loop of the ANIL write-ups,
in the same run: it/s, ratio, peak memory, and the body's own forward+backward beside them."""
from __future__ import annotations

import torch

from anil_fast import ANIL, MetaOptimizer, models
from anil_fast.anil import prefers_channels_last
from anil_fast.capture import MetaStepRunner
from anil_fast.data import TaskBatch
from anil_fast.env import cpu_has_native_bf16
from common import time_call

# name -> (model, image size, first_order, freeze_body)
CASES = {
    "s2 conv4 28px": ("conv4", 28, True, False),
    "s1 conv4 28px": ("conv4", 28, False, False),
    "s2 conv4 105px": ("conv4", 105, True, False),
    "s1 conv4 105px": ("conv4", 105, False, False),
    "s4 pretrained 105px": (None, 105, True, True),
}


def random_tasks(tasks, ways, shots, queries, size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, q = ways * shots, ways * queries
    return TaskBatch(torch.rand(tasks, s, 1, size, size, generator=g).to(device),
                     torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous().to(device),
                     torch.rand(tasks, q, 1, size, size, generator=g).to(device),
                     torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous().to(device))


def pretrained_name() -> str:
    return "resnet18" if models.torchvision_weights_available("resnet18") else "efficientnet_lite0"


def build(case, method, device, precision="fp32"):
    model, size, first_order, freeze = CASES[case]
    model = model or pretrained_name()
    torch.manual_seed(0)
    body, head = models.build(model, 5, size)
    if method == "per_task":
        kwargs = dict(backend="per_task", batched_body=False)
    else:
        kwargs = dict(backend="fused", batched_body=torch.device(device).type == "cuda",
                      precision=precision,
                      channels_last=prefers_channels_last(device, precision, "fused"))
    return ANIL(body.to(device), head.to(device), inner_lr=0.01, inner_steps=5,
                first_order=first_order, freeze_body=freeze, **kwargs)


def step_callable(case, method, device, tasks=16, precision="fp32", capture=False):
    anil = build(case, method, device, precision)
    batch = random_tasks(tasks, 5, 1, 5, CASES[case][1], device)
    runner = MetaStepRunner(MetaOptimizer(anil, lr=0.001), capture=capture)
    return lambda: runner(batch), anil, batch


def body_alone_peak(case, device, tasks=16):
    """Peak memory of the body's own forward+backward over the same images."""
    anil = build(case, "fast", device)
    batch = random_tasks(tasks, 5, 1, 5, CASES[case][1], device)
    images = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    anil.body(images).sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def time_meta_steps(device, quick=False):
    device = torch.device(device)
    cuda = device.type == "cuda"
    cases = ["s2 conv4 28px"] if quick else list(CASES)
    variants = [("fast fp32", "fp32", False)]
    if cuda or cpu_has_native_bf16():  # elsewhere bf16 is emulated (training falls back to fp32)
        variants += [("fast bf16", "bf16", False)]
    if cuda:
        variants += [("fast bf16+graph", "bf16", True)]
    rows = []
    for case in cases:
        min_time = 0.05 if quick else 1.0
        fn, _, _ = step_callable(case, "per_task", device)
        per_task_s = time_call(fn, device, min_time, max_iters=20)
        row = {"case": case, "per-task it/s": 1 / per_task_s}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            row["per-task peak MB"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        for name, precision, capture in variants:
            try:  # one failing variant (e.g. capture on an unusual setup) must not end the run
                fn, _, _ = step_callable(case, "fast", device, precision=precision, capture=capture)
                fast_s = time_call(fn, device, min_time, max_iters=500)
            except Exception as exc:
                row[f"{name} it/s"] = f"error: {type(exc).__name__}: {str(exc)[:80]}"
                continue
            row[f"{name} it/s"] = 1 / fast_s
            row[f"{name} x per-task"] = per_task_s / fast_s
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn()
                row[f"{name} peak MB"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        if cuda:
            row["body alone peak MB"] = body_alone_peak(case, device) / 2 ** 20
        rows.append(row)
    return rows
