"""Schedules of the outer learning rate: a factor of `outer_lr` from the run's progress.

Progress runs from 0 to 1 over the run: over its meta-steps, or over its time budget when the
budget ends it (the larger of the two when both limit it). MetaOptimizer applies the factor
to every group's base lr; its warmup of body groups (MetaOptimizer.warmup_steps) holds those
at 0 on top of it.
- "constant": 1.
- "cosine": from 1 down to `floor` along half a cosine.
- "step": 1, then 0.1 from half-way, 0.01 from three quarters.
"""
from __future__ import annotations

import math

from anil_fast.config import LR_SCHEDULES as SCHEDULES
from anil_fast.errors import InputError



def lr_factor(schedule: str, progress: float, floor: float = 0.05) -> float:
    if schedule not in SCHEDULES:
        raise InputError(f"lr_schedule must be one of {SCHEDULES}, got {schedule!r}")
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return 1.0 if progress < 0.5 else 0.1 if progress < 0.75 else 0.01
    return 1.0


def progress(step: int, total_steps: int | None, elapsed_s: float,
             budget_s: float | None) -> float:
    """How far a run is, 0..1, by steps and by time (whichever limit is nearer)."""
    parts = []
    if total_steps:
        parts.append(step / total_steps)
    if budget_s:
        parts.append(elapsed_s / budget_s)
    return max(parts) if parts else 0.0
