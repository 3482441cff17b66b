"""Loading a run back, the one home for it: which checkpoint file of a run folder to use
(best validation or last weights), its checked loading (folder.load_checkpoint), its
settings resolved on this machine and its model rebuilt with the checkpoint's weights. eval,
predict, export, Lake's runs and a run's rollback all load through here."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from anil_fast import distributed
from anil_fast.config import config_from_dict
from anil_fast.errors import InputError
from anil_fast.models.anil import ANIL
from anil_fast.runs.build import build_anil, load_model_state, own_rng
from anil_fast.runs.folder import BEST, CHECKPOINT, load_checkpoint
from anil_fast.runs.settings import Settings, resolve, resolve_device

__all__ = ["WEIGHTS", "LoadedRun", "checkpoint_file", "load_run"]


WEIGHTS = ("best", "last")


def checkpoint_file(path, weights: str | None = None) -> tuple[Path, str]:
    """The checkpoint file to score and which weights it holds. A run folder: `weights`
    "best" is best.pt (the best-validation weights train reported), "last" checkpoint.pt;
    None: best.pt when the run has one, else checkpoint.pt. A file is scored as it is."""
    if weights is not None and weights not in WEIGHTS:
        raise InputError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    path = Path(path)
    if not path.is_dir():
        if weights is not None:
            raise InputError(f"weights: --weights chooses a file of a run folder; {path} is a "
                             f"file (pass its run folder, or leave --weights out)")
        return path, "the file given"
    best = path / BEST
    if weights == "best" and not best.is_file():
        raise InputError(f"weights: {path} has no {BEST} (the run did not validate); use "
                         f"--weights last")
    if weights == "best" or (weights is None and best.is_file()):
        return best, "best validation"
    return path / CHECKPOINT, "last"


@dataclass(frozen=True)
class LoadedRun:
    """A run loaded back: its model with the checkpoint's weights, its settings (resolved on
    this machine), the checkpoint (a checked dict), its file and which weights it holds."""
    anil: ANIL
    settings: Settings
    checkpoint: dict
    file: Path
    weights: str


def load_run(path, weights: str | None = None, device: str = "auto") -> LoadedRun:
    """A run folder or checkpoint file loaded (`checkpoint_file` picks the file). Built
    without downloading anything: the weights come from the checkpoint, and the caller's
    RNG is left as it was."""
    dev = resolve_device(distributed.rank_device(distributed.current(), device))  # before any file
    file, which = checkpoint_file(path, weights)
    ckpt = load_checkpoint(file)
    # every recorded key and type checked, then resolved here (an earlier version's names
    # in today's terms); its pretrained weights are the checkpoint's own
    config = config_from_dict({**ckpt["config"], "device": device}, f"checkpoint: {file}")
    settings = resolve(dataclasses.replace(config, pretrained=False), dev)
    lost = [k for k, v in ckpt["model"].items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if lost:
        raise InputError(f"checkpoint: {file}: its weights hold NaN or infinite values ("
                         f"{', '.join(lost[:3])}{' ...' if len(lost) > 3 else ''}); a diverged "
                         f"run's: nothing it predicts would mean anything")
    with own_rng(settings.device):  # building seeds the model's init
        anil = build_anil(settings)
    load_model_state(anil, ckpt["model"])
    return LoadedRun(anil, settings, ckpt, file, f"{which} (step {ckpt['step']})")
