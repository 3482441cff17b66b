"""Loss-spike rollback (`--spike-rollback FACTOR`): a run whose training loss jumps goes back
to its last good checkpoint and carries on at half the outer learning rate.

Why: a meta-step can throw a run into a worse basin it needs hundreds of steps to leave, or
never leaves (std-20w1s with the learned head: the mean loss of 1.0 jumped to 1.75 within 10
steps, the meta-gradient's norm from 1.1 to 3.2, and validation fell from 74% to 68%).
Detection is on the host, where the losses are read back anyway (every --log-every steps):
a logging window's mean loss above FACTOR times the lowest window mean so far is a spike.
The last good checkpoint is best.pt (the best validation score) where the run validates,
else checkpoint.pt; the step count, the schedule's position and the task stream go on. After
MAX_ROLLBACKS rollbacks the run is stopped as diverged."""
from __future__ import annotations

import math

from tqdm.auto import tqdm

from .build import load_model_state
from .divergence import ADVICE, TrainingDiverged, kept_checkpoint
from .evaluation import checkpoint_file
from .runfolder import CHECKPOINT, load_checkpoint

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


def roll_back(run, window_mean: float) -> dict | None:
    """Load the last good checkpoint's weights and optimizer state into trainer._Run `run`,
    keep its step count, lower the outer lr by LR_CUT; the record of it (None when there is no
    checkpoint to go back to: the run carries on)."""
    path, _ = checkpoint_file(run.folder.path)  # best.pt when there is one, else checkpoint.pt
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path)
    load_model_state(run.anil, ckpt["model"])
    steps, scale = run.optimizer.steps, run.optimizer.lr_scale * LR_CUT
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.optimizer.steps, run.optimizer.lr_scale = steps, scale
    run.optimizer.set_learning_rates()
    return {"step": run.step, "window_loss": round(window_mean, 4),
            "lowest_window_loss": round(run.spike_guard.lowest, 4),
            "back_to": f"{path.name} (step {ckpt['step']})", "outer_lr_scale": scale}


def on_spike(run, window_mean: float) -> None:
    """A spike in trainer._Run `run`: roll back and say so, or stop the run as diverged after
    MAX_ROLLBACKS rollbacks."""
    if len(run.rollbacks) >= MAX_ROLLBACKS:
        kept = kept_checkpoint(run.folder.path / CHECKPOINT, run.checkpoint_step)
        raise TrainingDiverged(f"the training loss spiked again at step {run.step} (mean "
                               f"{window_mean:.3g}, lowest {run.spike_guard.lowest:.3g}) after "
                               f"{MAX_ROLLBACKS} rollbacks; training stopped and {kept}. {ADVICE}")
    record = roll_back(run, window_mean)
    if record is not None:
        run.rollbacks.append(record)
        if run.info.is_main:
            tqdm.write(f"loss spike at step {run.step} (mean {window_mean:.3g}, lowest "
                       f"{record['lowest_window_loss']:.3g}): back to {record['back_to']}, "
                       f"outer lr x{record['outer_lr_scale']:g}")
