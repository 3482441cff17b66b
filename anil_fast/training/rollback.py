"""Loss-spike rollback (`--spike-rollback FACTOR`): a run whose training loss jumps goes back
to its last good checkpoint and carries on at half the outer learning rate.

Why: a meta-step can throw a run into a worse basin it needs hundreds of steps to leave, or
never leaves (std-20w1s with the learned head: the mean loss of 1.0 jumped to 1.75 within 10
steps, the meta-gradient's norm from 1.1 to 3.2, and validation fell from 74% to 68%).
Detection is on the host, where the losses are read back anyway (every --log-every steps):
a logging window's mean loss above FACTOR times the lowest window mean so far is a spike.
The last good checkpoint is best.pt (the best validation score) where the run validates,
else checkpoint.pt; the step count, the schedule's position and the task stream go on. After
MAX_ROLLBACKS rollbacks the run is stopped as diverged (TrainingRun.on_spike)."""
from __future__ import annotations

import math

from anil_fast.runs.build import load_model_state
from anil_fast.runs.folder import load_checkpoint
from anil_fast.runs.load import checkpoint_file

MAX_ROLLBACKS = 5
LR_CUT = 0.5  # the outer lr's factor at each rollback


class LossSpikeGuard:
    """Says whether a logging window's mean loss is a spike: above `factor` times the lowest
    window mean seen so far (spikes are not counted into that lowest)."""

    def __init__(self, factor: float):
        self.factor, self.lowest = float(factor), math.inf

    def spiked(self, window_mean: float) -> bool:
        if window_mean > self.factor * self.lowest:
            return True
        self.lowest = min(self.lowest, window_mean)
        return False


def roll_back(anil, optimizer, run_folder) -> dict | None:
    """Load the last good checkpoint of `run_folder` (best.pt where the run validates, else
    checkpoint.pt) into `anil` and its MetaOptimizer `optimizer`, keeping the optimizer's step
    count (the schedule goes on) and lowering its outer lr by LR_CUT; what it did, or None when
    there is no checkpoint to go back to."""
    path, _ = checkpoint_file(run_folder)
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path)
    load_model_state(anil, ckpt["model"])
    steps, scale = optimizer.steps, optimizer.lr_scale * LR_CUT
    optimizer.load_state_dict(ckpt["optimizer"])
    optimizer.steps, optimizer.lr_scale = steps, scale
    optimizer.set_learning_rates()
    return {"back_to": f"{path.name} (step {ckpt['step']})", "outer_lr_scale": scale}
