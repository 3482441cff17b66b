"""Data-parallel meta-training and evaluation with torch.distributed (launch with torchrun).

A meta-batch is a bag of independent tasks and BatchNorm statistics never cross tasks, so
ranks split the tasks and only the meta-gradient is shared:
- every rank draws the same task indices from the same seeded sampler (indices are cheap) and
  materialises only its contiguous share of the meta-batch;
- each rank back-propagates sum(its task losses) / M (M = the whole meta-batch), and one
  all-reduce (SUM) of all gradients, plus the loss and accuracy sums in the same buffer, gives
  every rank the mean over all M tasks: `--meta-batch M` on K ranks computes what it computes
  in one process, and every rank takes the same Adam step;
- BatchNorm running statistics are updated by each rank from its own tasks and averaged
  across ranks before every checkpoint and evaluation (in one process they fold the tasks in
  sequence instead: the two agree in expectation, not bit for bit; training-mode BatchNorm
  never reads them, so the weights do agree);
- rank 0 writes checkpoints and logs; a checkpoint holds no per-rank state, so a run resumes
  on any number of ranks.
NCCL on GPUs, gloo on CPUs. Collectives time out (ANIL_FAST_DIST_TIMEOUT seconds, default 300)
so that a rank that dies makes the others stop with an error instead of hanging.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from anil_fast.env import dist_timeout_s
from anil_fast.errors import InputError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return DistInfo()


def timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=dist_timeout_s())


def init_from_env(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR, ...); a no-op
    for a plain single-process run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return current()
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or str(device).startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=timeout())
    return current()


def rank_device(info: DistInfo, device: str) -> str:
    """Each rank's device: cuda:LOCAL_RANK for CUDA runs."""
    if info.active and (device == "cuda" or (device == "auto" and torch.cuda.is_available())):
        return f"cuda:{info.local_rank}"
    return device


def shard(total: int, info: DistInfo) -> slice:
    """This rank's contiguous share of `total` tasks (sizes differ by at most one)."""
    base, extra = divmod(total, info.world_size)
    start = info.rank * base + min(info.rank, extra)
    return slice(start, start + base + (1 if info.rank < extra else 0))


def gradient_all_reduce(parameters):
    """A callback for ANIL.meta_backward (all_reduce=...): one SUM all-reduce of every gradient and of the
    step's extra values (loss and accuracy sums), in a single flat buffer."""
    parameters = list(parameters)

    def reduce(extra_values: torch.Tensor) -> torch.Tensor:
        grads = [p.grad for p in parameters if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads] + [extra_values.to(grads[0].dtype)])
        _checked(dist.all_reduce, flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat[offset:].to(extra_values.dtype)
    return reduce


def _checked(collective, *args, **kwargs):
    try:
        return collective(*args, **kwargs)
    except Exception as exc:  # a peer died or hung: say so instead of a bare backend error
        raise RuntimeError(f"rank {dist.get_rank()}: a collective failed — another rank has "
                           f"probably stopped ({type(exc).__name__}: {exc})") from exc


@torch.no_grad()
def average_running_stats(module: torch.nn.Module) -> None:
    """Make BatchNorm running statistics the mean over ranks (before checkpoints/evaluation)."""
    info = current()
    if not info.active:
        return
    buffers = [b for name, b in module.named_buffers()
               if name.endswith("running_mean") or name.endswith("running_var")]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    _checked(dist.all_reduce, flat)
    flat /= info.world_size
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def gather_tensor(values: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's 1-D tensor (lengths may differ) in rank order."""
    info = current()
    if not info.active:
        return values
    length = torch.tensor([values.numel()], device=values.device)
    lengths = [torch.zeros_like(length) for _ in range(info.world_size)]
    _checked(dist.all_gather, lengths, length)
    longest = int(max(n.item() for n in lengths))
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[:values.numel()] = values
    parts = [torch.zeros_like(padded) for _ in range(info.world_size)]
    _checked(dist.all_gather, parts, padded)
    return torch.cat([p[:int(n.item())] for p, n in zip(parts, lengths)])


def collective_device() -> torch.device:
    """Where the process group's collectives take tensors: this rank's GPU under NCCL (which
    cannot move CPU tensors), the CPU under gloo."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_values(value: float) -> list[float]:
    """Every rank's `value`, gathered on every rank."""
    info = current()
    if not info.active:
        return [value]
    return gather_tensor(torch.tensor([value], dtype=torch.float64,
                                      device=collective_device())).tolist()


def barrier() -> None:
    if current().active:
        _checked(dist.barrier)


def shutdown() -> None:
    """Leave the process group together: a rank tearing down while a peer still talks to it
    can abort the peer (seen with gloo)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # a peer is already gone: nothing left to wait for
            pass
        dist.destroy_process_group()


def check_config(config, info: DistInfo) -> None:
    """What a data-parallel run needs of its settings (nothing when not under torchrun)."""
    if info.active and config.meta_batch < info.world_size:
        raise InputError(f"meta_batch ({config.meta_batch}) must be at least the number of "
                         f"ranks ({info.world_size})")
    if info.active and (config.time_budget is not None or config.val_every_s is not None):
        raise InputError("under torchrun, end runs by --meta-steps and validate by --val-every "
                         "(time-based limits could stop the ranks at different steps)")
