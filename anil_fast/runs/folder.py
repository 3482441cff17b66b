"""A run folder: the files of one training run, and the rules that keep them safe.

- One process at a time: `RunFolder.locked()` takes an exclusive lock (flock on `.lock`, which
  holds the owner's PID); a second run into the same folder gets a clear error naming it.
- A folder that holds a run is never started over by accident: `train` refuses it unless it
  resumes or is told to overwrite (and then deletes only the files a run writes).
- Every file is written under a unique temporary name, then renamed over the old one: a kill
  or a full disk leaves the previous version intact, and a failed write removes its partial file.
- Checkpoints load with `torch.load(weights_only=True)`: tensors and plain containers only, so
  a crafted file cannot run code; the format version and the keys are checked.
- metrics.jsonl is read line by line; a torn last line (a kill mid-write) is skipped with a
  warning that names the file.
"""
from __future__ import annotations

import errno
import io
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from anil_fast.env import atomic_write, parse_json
from anil_fast.errors import AnilFastError, InputError

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
CONFIG = "config.json"
BEST = "best.pt"  # the checkpoint of the best validation score
VALIDATION = "validation.jsonl"
LOCK = ".lock"
RUN_FILES = (CHECKPOINT, METRICS, RESULTS, CONFIG, BEST, VALIDATION)  # a run's (--overwrite deletes)

# 2: the model's state_dict ("model": body.*, head.*) and the MetaOptimizer's ("optimizer":
# the torch optimizer's state and the step count). 1: both under "anil" (read and upgraded).
CHECKPOINT_FORMAT = 2
CHECKPOINT_KEYS = ("format", "config", "model", "optimizer", "sampler", "rng", "step", "elapsed_s")


def _upgrade_format_1(ckpt: dict, path) -> dict:
    """A format-1 checkpoint ("anil": body, head, optimizer, outer_steps) as format 2."""
    old = ckpt.get("anil")
    if not isinstance(old, dict) or not all(k in old for k in ("body", "head", "optimizer", "outer_steps")):
        raise InputError(f"checkpoint: {path} (format 1) lacks the model's state")
    model = {f"body.{k}": v for k, v in old["body"].items()}
    model.update({f"head.{k}": v for k, v in old["head"].items()})
    upgraded = {k: v for k, v in ckpt.items() if k != "anil"}
    upgraded.update(format=CHECKPOINT_FORMAT, model=model,
                    optimizer={"optimizer": old["optimizer"], "steps": old["outer_steps"]})
    return upgraded


class RunFolderError(InputError):
    """A run folder cannot be used as asked (held by another run, holds a run, unwritable)."""


class RunFolder:
    def __init__(self, path):
        if not isinstance(path, (str, os.PathLike)) or not str(os.fspath(path)).strip():
            raise RunFolderError(f"--out must name a folder, got {path!r} (an empty name would "
                                 f"write the run into the current folder)")
        self.path = Path(path)

    def create(self) -> bool:
        """Make the folder (and its parents), with a clear error where that is impossible.
        Returns whether it was made here (it did not exist before)."""
        if self.path.is_symlink() and not self.path.exists():
            raise RunFolderError(f"--out {self.path} is a symbolic link to nowhere "
                                 f"({os.readlink(self.path)}); remove it or point it at a folder")
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"--out {self.path} is a file, not a folder")
        existed = self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a parent is a file, read-only file system, permissions
            raise RunFolderError(f"--out {self.path} cannot be created ({exc.strerror or exc})") from exc
        return not existed

    @contextmanager
    def removed_if_refused(self, created: bool):
        """A folder made for a run that is refused before it writes anything (bad data, a
        setting found wrong at set-up) is removed again, its lock file with it: no empty
        --out is left behind."""
        try:
            yield
        except AnilFastError:
            if created and {p.name for p in self.path.iterdir()} <= {LOCK}:
                (self.path / LOCK).unlink(missing_ok=True)
                try:
                    self.path.rmdir()
                except OSError:
                    pass
            raise

    def holds_run(self) -> list[str]:
        """The run files present in the folder (empty: no run here)."""
        return [name for name in RUN_FILES if (self.path / name).exists()]

    def clear(self) -> None:
        """Delete the files a run writes (--overwrite), each only when its content shows that
        anil-fast wrote it; a file of that name that is not ours (a user's own config.json)
        stops the deletion before anything is deleted. Nothing else in the folder is touched."""
        present = [name for name in RUN_FILES if (self.path / name).exists()]
        foreign = [name for name in present if not is_our_file(self.path / name)]
        if foreign:
            raise RunFolderError(
                f"--overwrite: {self.path} holds {', '.join(foreign)}, which anil-fast did not "
                f"write (anil-fast deletes only its own run files); move "
                f"{'it' if len(foreign) == 1 else 'them'} or use another --out")
        for name in present:
            (self.path / name).unlink(missing_ok=True)

    @contextmanager
    def locked(self, enabled: bool = True):
        """Hold the folder's exclusive lock for the block (no-op when not enabled, e.g. on the
        ranks other than 0, which write nothing)."""
        if not enabled:
            yield
            return
        import fcntl
        lock_path = self.path / LOCK
        try:  # O_NOFOLLOW: a .lock that is a symlink must not make us write into its target
            handle = os.fdopen(os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666),
                               "r+")
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RunFolderError(f"--out {self.path}: {LOCK} is a symbolic link; anil-fast "
                                     f"writes its lock only into a plain file (remove the link)") from exc
            raise RunFolderError(f"--out {self.path} is not writable ({exc.strerror or exc})") from exc
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "unknown"
                raise RunFolderError(f"run folder {self.path} is in use by another anil-fast run "
                                     f"(PID {owner}); wait for it to finish or use another --out") from None
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            for name in RUN_FILES:  # temporary files of a writer killed mid-write: ours now
                for stale in self.path.glob(f".{name}.*.tmp"):
                    stale.unlink(missing_ok=True)
            yield
        finally:
            handle.close()  # closing releases the lock

    # -- writing -------------------------------------------------------------------------------
    def write_atomic(self, name: str, write) -> None:
        """write(file) into a unique temporary file beside `name`, then rename it over `name`."""
        target = self.path / name
        try:
            atomic_write(target, write)  # a killed process leaves the previous file intact
        except OSError as exc:
            full = " (the disk is full)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            raise RunFolderError(f"could not write {target}{full}: {exc.strerror or exc}; "
                                 f"the partial file was removed and the previous "
                                 f"{name} (if any) is kept") from exc

    def write_json(self, name: str, value) -> None:
        self.write_atomic(name, lambda f: f.write(json.dumps(value, indent=1).encode()))

    def save_checkpoint(self, checkpoint: dict, name: str = CHECKPOINT) -> None:
        # serialised in memory first: torch.save turns a failed write (a full disk) into a
        # RuntimeError ("unexpected pos"); a plain write gives the OSError that names it
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        self.write_atomic(name, lambda f: f.write(buffer.getbuffer()))


def is_our_file(path: Path) -> bool:
    """Whether a run file's content is anil-fast's: config.json a Config, results.json a
    run's summary, the .jsonl files metrics records, the .pt files checkpoints."""
    name = path.name
    try:
        if name in (CHECKPOINT, BEST):
            return isinstance(torch.load(path, map_location="cpu", weights_only=True), dict)
        if name in (METRICS, VALIDATION):
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            records = [parse_json(ln) for ln in lines[:-1]]  # the last may be torn by a kill
            return all(isinstance(r, dict) and isinstance(r.get("step"), int) for r in records) \
                and (not lines or lines[-1].startswith('{"step": '))
        value = parse_json(path.read_text())
        keys = {CONFIG: {"scenario", "ways", "shots", "inner_lr", "meta_batch"},
                RESULTS: {"scenario", "meta_steps", "train_time_s"}}[name]
        return isinstance(value, dict) and keys <= set(value)
    except Exception:  # unreadable or not ours
        return False


def load_checkpoint(path) -> dict:
    """A checkpoint (a run folder or the file itself), loaded without unpickling code."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise InputError(f"checkpoint: no checkpoint file at {path}")
    try:
        # weights_only: tensors, dicts, lists, numbers and strings only; a pickle that would
        # build other objects (or run a command) is refused.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's weights_only refusal wraps its reason in paragraphs of advice: keep the reason
        advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [ln.strip() for ln in str(exc).splitlines()
                 if ln.strip() and not ln.strip().startswith(advice)]
        reason = (lines or [type(exc).__name__])[0][:300]
        raise InputError(f"checkpoint: {path} is unreadable or not a plain checkpoint "
                         f"({reason})") from exc
    if not isinstance(ckpt, dict):
        raise InputError(f"checkpoint: {path} holds a {type(ckpt).__name__}, not an anil-fast "
                         f"checkpoint")
    if ckpt.get("format") == 1:
        ckpt = _upgrade_format_1(ckpt, path)
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        hint = (" It looks like a plain state_dict: load it with module.load_state_dict()."
                if all(isinstance(v, torch.Tensor) for v in ckpt.values()) else "")
        raise InputError(f"checkpoint: {path} is not an anil-fast checkpoint: it lacks "
                         f"{', '.join(missing)}.{hint}")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise InputError(f"checkpoint: {path} has format version {ckpt['format']!r}; this "
                         f"anil-fast reads version {CHECKPOINT_FORMAT}")
    if not isinstance(ckpt["model"], dict) or not all(isinstance(v, torch.Tensor)
                                                       for v in ckpt["model"].values()):
        raise InputError(f"checkpoint: {path}: its 'model' is not a state_dict of tensors")
    if not isinstance(ckpt["optimizer"], dict) or not {"optimizer", "steps"} <= set(ckpt["optimizer"]):
        raise InputError(f"checkpoint: {path} lacks the optimizer's state or step count")
    _check_checkpoint_values(ckpt, path)
    return ckpt


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_checkpoint_values(ckpt: dict, path: Path) -> None:
    """The types of the values a resume reads (a checkpoint is a user's file too)."""
    def bad(what):
        raise InputError(f"checkpoint: {path}: {what} (a damaged or edited checkpoint)")
    if not isinstance(ckpt["step"], int) or isinstance(ckpt["step"], bool) or ckpt["step"] < 0:
        bad(f"its step is {ckpt['step']!r}, not an int >= 0")
    if not _is_number(ckpt["elapsed_s"]) or not ckpt["elapsed_s"] >= 0:
        bad(f"its elapsed_s is {ckpt['elapsed_s']!r}, not a number >= 0")
    if not isinstance(ckpt["config"], dict):
        bad("its config is not a dict of settings")
    sampler, rng = ckpt["sampler"], ckpt["rng"]
    if not (isinstance(sampler, dict) and isinstance(sampler.get("generator"), torch.Tensor)
            and isinstance(sampler.get("position"), int)
            and (sampler.get("order") is None or isinstance(sampler.get("order"), torch.Tensor))):
        bad("its sampler state is not a task sampler's (generator, position, order)")
    if not (isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)):
        bad("its RNG state is not torch's")
    for key in ("steady_steps",):
        if key in ckpt and not (isinstance(ckpt[key], int) and not isinstance(ckpt[key], bool)):
            bad(f"its {key} is {ckpt[key]!r}, not an int")
    for key in ("history", "rollbacks"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], list):
            bad(f"its {key} is not a list")
    best = ckpt.get("best")
    if best is not None and not (isinstance(best, dict) and isinstance(best.get("step"), int)
                                 and _is_number(best.get("accuracy"))):
        bad("its best validation record is not a record (step, accuracy)")
    classes = ckpt.get("classes")
    if classes is not None and not (isinstance(classes, dict) and all(
            isinstance(v, list) and all(isinstance(n, str) for n in v) for v in classes.values())):
        bad("its recorded classes are not lists of class names")
    if ckpt.get("spike_lowest") is not None and not _is_number(ckpt["spike_lowest"]):
        bad(f"its spike_lowest is {ckpt['spike_lowest']!r}, not a number")


# The numbers each record of a run's .jsonl files must hold (by file name)
RECORD_NUMBERS = {METRICS: ("loss", "accuracy", "elapsed_s"), VALIDATION: ("accuracy", "elapsed_s")}


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl or validation.jsonl; lines that do not parse (a torn
    last line after a kill) are skipped with a warning naming the file and line. A record that
    parses but lacks a number it must hold (RECORD_NUMBERS; an optional grad_norm is a number
    or absent) is an InputError naming the file, line and field: the file was edited or
    damaged, and a summary or a resume read from it would be wrong."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    required = RECORD_NUMBERS.get(path.name, ())
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = parse_json(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise InputError("no step")
        except ValueError:
            warnings.warn(f"{path}:{number}: skipped a line that is not a metrics record "
                          f"(torn by a kill?): {line[:80]!r}", stacklevel=2)
            continue
        for key in required + ("grad_norm",):
            if (key in required or record.get(key) is not None) and not _is_number(record.get(key)):
                raise InputError(f"{path}:{number}: its {key} is {record.get(key)!r}, not a "
                                 f"number (an edited or damaged run file; move the file away "
                                 f"or start the run over)")
        records.append(record)
    return records


def truncate_metrics(path, step: int) -> None:
    """Keep the records up to `step` (those a resumed run's checkpoint covers)."""
    path = Path(path)
    if path.exists():
        kept = [r for r in read_metrics(path) if r["step"] <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def loss_summary(path) -> dict:
    """The first, last and smallest meta-training loss in a metrics.jsonl (None when empty)."""
    losses = [r["loss"] for r in read_metrics(path)]
    if not losses:
        return {"initial_loss": None, "final_loss": None, "min_loss": None}
    return {"initial_loss": losses[0], "final_loss": losses[-1], "min_loss": min(losses)}
