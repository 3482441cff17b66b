"""The one timing harness: `anil-fast bench` (bench.py), the pytest-benchmark suites and the
GPU check in benches/ measure with it. Problems (random episodes), timed callables (median
seconds per call, calls per second), memory (peak above a baseline, bytes saved for the
backward) and bandwidth. Timings are reported, never asserted; tables come from table.py."""
from __future__ import annotations

import time

import torch

from anil_fast.metrics import peak_rss_bytes
from anil_fast.models.functional import adapted_query_loss

# (ways, shots, queries per class) of the benchmarked task shapes
TASK_SHAPES = {"5w1s": (5, 1, 5), "20w5s": (20, 5, 5)}


def episode_problem(tasks, ways, shots, queries, dim, device="cpu", dtype=torch.float32, seed=0):
    """Random features of `tasks` N-way K-shot episodes (labels in class order), a head for
    them. (tests/helpers.head_problem takes row counts instead.)"""
    g = torch.Generator(device="cpu").manual_seed(seed)
    s_rows, q_rows = ways * shots, ways * queries
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float32).to(device, dtype)  # noqa: E731
    fs, fq = make(tasks, s_rows, dim), make(tasks, q_rows, dim)
    ys = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous().to(device)
    yq = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous().to(device)
    w = (torch.randn(ways, dim, generator=g) / dim ** 0.5).to(device)
    b = torch.zeros(ways, device=device)
    return fs, ys, fq, yq, w, b


def forward_backward(method: str, problem, first_order: bool, inner_lr=0.01, inner_steps=5):
    """A callable running the head's forward and backward with `method`: a backend of
    adapted_query_loss ("per_task": the per-task loop of the ANIL write-ups)."""
    fs, ys, fq, yq, w, b = problem
    leaves = [x.detach().clone().requires_grad_() for x in (fs, fq, w, b)]

    def run():
        f, q, ww, bb = leaves
        losses, _ = adapted_query_loss(f, ys, q, yq, ww, bb, inner_lr=inner_lr,
                                       inner_steps=inner_steps, first_order=first_order,
                                       backend=method)
        return torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
    return run


def median_seconds(benchmark) -> float | None:
    """A pytest-benchmark fixture's median seconds; None under --benchmark-disable (the
    function ran once, untimed: the smoke run)."""
    return benchmark.stats.stats.median if benchmark.stats is not None else None


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calls_per_second(fn, device, target_s: float) -> float:
    """Calls per second of fn over about target_s (at least one call)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    once = time.perf_counter() - start
    n = max(1, int(target_s / max(once, 1e-6)))
    start = time.perf_counter()
    for _ in range(n):
        fn()
    synchronize(device)
    return n / (time.perf_counter() - start)


class PeakMemory:
    """Peak memory of a block: CUDA max_memory_allocated above what was allocated before, or
    on the CPU the growth of the process's peak RSS (it only shows a new peak)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = peak_rss_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = peak_rss_bytes() - self.base
        return False


def time_call(fn, device, min_time=0.2, max_iters=200) -> float:
    """Median seconds per call (after one warm-up call)."""
    fn()
    synchronize(device)
    times = []
    start_all = time.perf_counter()
    while (time.perf_counter() - start_all < min_time or len(times) < 3) and len(times) < max_iters:
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for the backward while `fn` runs its forward."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def peak_memory_bytes(fn, device) -> int | None:
    """Peak GPU memory allocated during one call (None on the CPU)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth_gbs(device, megabytes=512) -> float | None:
    """Device-to-device copy bandwidth (read + write bytes / time), measured now."""
    if torch.device(device).type != "cuda":
        return None
    src = torch.empty(megabytes * 2 ** 20 // 4, device=device)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / seconds / 1e9


def traffic_floor_bytes(problem, first_order: bool) -> int:
    """What must move at least: every feature read once, every feature gradient written once
    (support gradients only for second order)."""
    fs, _, fq, _, _, _ = problem
    read = (fs.numel() + fq.numel()) * fs.element_size()
    write = (fq.numel() + (0 if first_order else fs.numel())) * fs.element_size()
    return read + write
