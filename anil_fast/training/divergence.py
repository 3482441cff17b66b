"""What stops a training run before it reports a number that is not a result: a loss that is
not finite or beyond any learning (LOSS_LIMIT), weights beyond SANE_WEIGHT_LIMIT, BatchNorm
running statistics beyond SANE_BUFFER_LIMIT (TrainingDiverged, exit code 3), and Ctrl-C
(Interrupted, exit code 130). Either way the last good checkpoint is kept."""
from __future__ import annotations

import math

import torch

from anil_fast.errors import Interrupted, TrainingDiverged

__all__ = ["TrainingDiverged", "Interrupted", "kept_checkpoint", "insane_state", "insane_loss"]

# A checkpoint is only written while every parameter is finite and at most this large: no
# network this toolkit trains has weights near it, a diverging one passes it long before NaN.
SANE_WEIGHT_LIMIT = 1e6
# ... and every float buffer (BatchNorm's running means and variances) at most this large: a
# variance is the square of a scale, so the weights' limit squared.
SANE_BUFFER_LIMIT = 1e12
# A mean query loss above this is divergence, not learning: guessing gives ln(ways) (1.6 at
# 5 ways, 3.0 at 20), and a wrong answer at 99.99% confidence about 9.
LOSS_LIMIT = 1e4

ADVICE = ("Lower --outer-lr or --inner-lr and continue with --resume (learning rates may change "
          "on resume; results.json records it), or start over with --overwrite (inside "
          "torch.compile or a CUDA graph, labels outside 0..ways-1 also give a NaN loss)")


def kept_checkpoint(path, step: int) -> str:
    return (f"the last good checkpoint ({path}, step {step}) is kept" if step
            else "no checkpoint was written yet")


def largest_magnitude(tensors) -> float:
    """The largest |x| over `tensors` (inf or nan when one is not finite; 0 for none). One
    reduction, one host sync."""
    tensors = [t.detach() for t in tensors]
    if not tensors:
        return 0.0
    return torch.stack([t.abs().max().float() for t in tensors]).max().item()


def insane_state(model: torch.nn.Module) -> str | None:
    """What is wrong with a model's parameters or float buffers, or None when all is sane."""
    largest = largest_magnitude(model.parameters())
    if not (math.isfinite(largest) and largest <= SANE_WEIGHT_LIMIT):
        return f"a parameter reached |w| = {largest:.3g} (more than {SANE_WEIGHT_LIMIT:g} or not finite)"
    largest = largest_magnitude(b for b in model.buffers() if b.is_floating_point())
    if not (math.isfinite(largest) and largest <= SANE_BUFFER_LIMIT):
        return (f"a BatchNorm running statistic reached {largest:.3g} (more than "
                f"{SANE_BUFFER_LIMIT:g} or not finite)")
    return None


def insane_loss(loss: float) -> bool:
    return not math.isfinite(loss) or loss > LOSS_LIMIT
