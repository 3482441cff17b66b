"""A training run's life cycle as one object, `TrainingRun`: set up (model, data, a fresh
folder or a resumed checkpoint), meta-steps with logging, validation and checkpoints, loss-
spike rollback, the summary, then the test of the selected checkpoint. `train()` drives one.

The settings come resolved (runs/settings.py), the objects from runs/build.py, the folder's
rules (lock, atomic checkpoints, refusal to clobber) from runs/folder.py, the scores from
evaluation.py."""
from __future__ import annotations

import json
import os
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from anil_fast import distributed
from anil_fast.config import Config
from anil_fast.data import TaskSampler
from anil_fast.errors import InputError
from anil_fast.evaluation import evaluate, score_selected
from anil_fast.metrics import GPUMonitor, peak_memory, reset_peak_memory
from anil_fast.models.anil import ANIL
from anil_fast.runs.build import (build_anil, default_split, load_model_state, own_rng,
                                  rng_state, set_rng_state, task_sampler)
from anil_fast.runs.folder import (BEST, CHECKPOINT, CHECKPOINT_FORMAT, CONFIG, METRICS, RESULTS,
                                   VALIDATION, RunFolder, RunFolderError, load_checkpoint,
                                   loss_summary, read_metrics, truncate_metrics)
from anil_fast.runs.settings import Settings, resolve
from anil_fast.training import rollback, tensorboard_log
from anil_fast.training.capture import MetaStepRunner
from anil_fast.training.divergence import (ADVICE, LOSS_LIMIT, Interrupted, TrainingDiverged,
                                           insane_loss, insane_state, kept_checkpoint)
from anil_fast.training.optim import MetaOptimizer, meta_optimizer
from anil_fast.training.schedules import lr_factor
from anil_fast.training.schedules import progress as schedule_progress
from anil_fast.training.summary import run_summary

# Fields that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"meta_steps", "device", "checkpoint_every", "log_every", "notes", "backend",
                     "compile", "capture", "inner_lr", "outer_lr", "test_tasks",
                     "eval_inner_steps", "bn_mode", "time_budget", "lr_schedule", "lr_floor",
                     "val_every", "val_every_s", "clip_grad_norm", "precision", "spike_rollback"}
# Of those, the ones that change what is computed: a resume records them (results.json).
RECORDED_CHANGES = RESUMABLE_CHANGES - {"device", "checkpoint_every", "log_every", "notes",
                                        "compile", "capture"}
__all__ = ["train", "TrainingRun", "TrainingDiverged", "Interrupted",
           "RunFolderError", "load_checkpoint"]


@dataclass
class TrainingRun:
    """One training run while it runs: its settings, folder, model, optimizer and task
    samplers, and where it stands. `set_up` makes one (fresh or resumed); `train_steps` runs
    it to its step limit or time budget, validating, checkpointing and rolling back on loss
    spikes as it goes; `summary` and `test` report it."""
    settings: Settings
    folder: RunFolder
    info: distributed.DistInfo
    anil: ANIL
    sampler: TaskSampler
    test_tasks: TaskSampler | None
    val_tasks: TaskSampler | None
    optimizer: MetaOptimizer | None = None
    step: int = 0
    elapsed: float = 0.0  # training seconds over every session; one-time costs excluded
    steady_steps: int = 0  # the steps those seconds cover (a session's first step is not one)
    checkpoint_step: int = 0  # the step of the last checkpoint written (kept on divergence)
    history: list = field(default_factory=list)  # resumes that changed settings
    pending: list = field(default_factory=list)  # (step, elapsed, loss, accuracy, grad norm)
    best: dict | None = None  # the best validation record so far (its weights: best.pt)
    val_records: list = field(default_factory=list)
    one_time: dict = field(default_factory=dict)  # seconds of set-up, build, first step
    validation_s: float = 0.0
    board: object = None  # tensorboard_log.TensorBoardLog, when asked for (rank 0)
    spike_guard: rollback.LossSpikeGuard | None = None  # --spike-rollback
    rollbacks: list = field(default_factory=list)  # what each loss-spike rollback did
    classes: dict | None = None  # a folder dataset's default split as first drawn (its names)

    @property
    def config(self) -> Config:
        return self.settings.config

    @property
    def device(self) -> torch.device:
        return self.settings.device

    # -- set up ------------------------------------------------------------------------------
    @classmethod
    def set_up(cls, settings: Settings, folder: RunFolder, info, resume: bool = False,
               overwrite: bool = False, evaluate_at_end: bool = True) -> TrainingRun:
        """Everything that can fail before the first step fails here, before the folder
        changes."""
        config, device = settings.config, settings.device
        present = folder.holds_run() if info.is_main else []
        if present and not (resume or overwrite):
            raise RunFolderError(f"--out {folder.path} already holds a run ({', '.join(present)}); "
                                 f"pass --resume to continue it or --overwrite to start it over")
        checkpoint = folder.path / CHECKPOINT
        ckpt = load_checkpoint(checkpoint) if resume and checkpoint.exists() else None
        # a folder dataset's default split as the run first drew it: a class added since
        # reshuffles it
        classes = (ckpt or {}).get("classes") or default_split(config)
        start = time.perf_counter()
        anil = build_anil(settings)
        sampler = task_sampler(config, "train", device, classes=classes)
        # the test split is checked now (ways, shots + queries), not after training
        test = task_sampler(config, "test", device, classes=classes) if evaluate_at_end else None
        val = (task_sampler(config, "validation", device, classes=classes)
               if config.validates else None)
        one_time = {"data_and_model_s": time.perf_counter() - start}
        if anil.uses_fused_head() and device.type == "cpu":  # the C++ build now, not in step 1
            from anil_fast.models import ops
            start = time.perf_counter()
            ops.small_loop(device)
            one_time["backend_build_s"] = time.perf_counter() - start
        run = cls(settings, folder, info, anil, sampler, test, val, one_time=one_time,
                  classes=classes)
        if config.spike_rollback is not None:
            run.spike_guard = rollback.LossSpikeGuard(config.spike_rollback)
        total, budget = config.total_meta_steps, config.time_budget
        run.optimizer = meta_optimizer(config, anil, schedule=lambda step: lr_factor(
            config.lr_schedule, schedule_progress(step, total, run.elapsed, budget),
            config.lr_floor))
        if ckpt is not None:
            run.resume_from(ckpt)
        elif resume and present:  # never delete what --resume did not ask to delete
            raise RunFolderError(f"--resume: {folder.path} has no {CHECKPOINT} to resume from, "
                                 f"but holds {', '.join(present)}; point --out at the run's "
                                 f"folder, put its {CHECKPOINT} back, or start over with "
                                 f"--overwrite")
        elif info.is_main:
            if resume:
                warnings.warn(f"--resume: {folder.path} holds no run to resume; starting at step 0")
            folder.clear()  # --overwrite, or --resume in an empty folder: start from step 0
        distributed.barrier()  # nobody starts before rank 0 has tidied the run folder
        if info.is_main:
            folder.write_json(CONFIG, config.to_dict())
        return run

    def resume_from(self, ckpt: dict) -> None:
        """Continue from a checkpoint of this run: weights, optimizer, task stream, RNG,
        clock, validation and rollback records; refused when it was made with settings that
        may not change."""
        # settings an earlier version did not record take their defaults (what it used)
        stored, config = {**Config().to_dict(), **ckpt["config"]}, self.config
        for key in ("data", "split_file"):  # recorded relative by earlier versions
            if stored.get(key) is not None:
                stored[key] = os.path.abspath(stored[key])
        wanted = config.to_dict()
        differ = {k for k, v in wanted.items() if k not in RESUMABLE_CHANGES and stored.get(k) != v}
        if differ:
            raise InputError(f"resume: the checkpoint in {self.folder.path} was made with other "
                             f"settings ({', '.join(sorted(differ))}); use another --out or the "
                             f"same settings (these may change: "
                             f"{', '.join(sorted(RESUMABLE_CHANGES))})")
        total = config.total_meta_steps
        if total is not None and ckpt["step"] > total:
            raise InputError(f"resume: the checkpoint in {self.folder.path} is at step "
                             f"{ckpt['step']}, past the {total} meta-steps asked for; ask for at "
                             f"least {ckpt['step']} (or evaluate it with anil-fast eval)")
        load_model_state(self.anil, ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.sampler.load_state_dict(ckpt["sampler"])
        set_rng_state(ckpt["rng"])
        self.step = self.checkpoint_step = ckpt["step"]
        self.elapsed = ckpt["elapsed_s"]
        self.steady_steps = ckpt.get("steady_steps", self.step)
        self.best = ckpt.get("best")
        self.rollbacks = list(ckpt.get("rollbacks", []))
        if self.spike_guard is not None and ckpt.get("spike_lowest") is not None:
            self.spike_guard.lowest = ckpt["spike_lowest"]
        changes = {k: [stored.get(k), v] for k, v in wanted.items()
                   if k in RECORDED_CHANGES and stored.get(k) != v}
        self.history = list(ckpt.get("history", [])) + (
            [{"step": self.step, "changes": changes}] if changes else [])
        if changes and self.info.is_main:  # said now, not only in results.json at the end
            warnings.warn(f"--resume: continuing from step {self.step} with changed settings: "
                          + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in sorted(changes.items()))
                          + " (recorded in results.json, resumes_with_changes)")
        if self.info.is_main:
            truncate_metrics(self.folder.path / METRICS, self.step)
            truncate_metrics(self.folder.path / VALIDATION, self.step)
        self.val_records = read_metrics(self.folder.path / VALIDATION)

    # -- while it runs -----------------------------------------------------------------------
    def log(self, metrics_file, bar) -> None:
        """Read the pending metrics back (one host sync) and append them to metrics.jsonl; a
        NaN or inf loss stops the run, a loss spike rolls it back (--spike-rollback)."""
        if not self.pending:
            return
        values = torch.stack([torch.stack(p[2:]).float() for p in self.pending]).tolist()
        for (step, elapsed, *_), (loss, acc, grad_norm) in zip(self.pending, values):
            if insane_loss(loss):
                self.diverged(f"the meta-loss became {loss:.3g} at step {step} (more than "
                              f"{LOSS_LIMIT:g} or not finite)")
            if metrics_file:
                metrics_file.write(json.dumps({"step": step, "loss": loss, "accuracy": acc,
                                               "grad_norm": grad_norm,
                                               "elapsed_s": round(elapsed, 4)}) + "\n")
            if self.board:
                self.board.scalars(step, {"train/loss": loss, "train/accuracy": acc,
                                          "train/grad_norm": grad_norm})
        if metrics_file:
            metrics_file.flush()
        if self.board:
            self.board.progress(self.step, self.optimizer.learning_rates(), self.device,
                                self.steady_steps / self.elapsed if self.elapsed else None)
        bar.set_postfix(loss=f"{values[-1][0]:.3f}", acc=f"{values[-1][1]:.3f}")
        self.pending.clear()
        window = sum(v[0] for v in values) / len(values)
        if self.spike_guard is not None and self.spike_guard.spiked(window):
            self.on_spike(window)

    def diverged(self, what: str):
        kept = kept_checkpoint(self.folder.path / CHECKPOINT, self.checkpoint_step)
        raise TrainingDiverged(f"{what}; training stopped and {kept}. {ADVICE}")

    def checkpoint(self, best: bool = False) -> None:
        """checkpoint.pt (and best.pt, the same content, for a new best validation score)."""
        distributed.average_running_stats(self.anil.body)  # one set of BatchNorm statistics
        wrong = insane_state(self.anil)  # finite losses can hide weights that are already lost
        if wrong:
            self.diverged(f"{wrong} at step {self.step}")
        if self.info.is_main:
            state = {
                "format": CHECKPOINT_FORMAT, "config": self.config.to_dict(),
                "model": self.anil.state_dict(), "optimizer": self.optimizer.state_dict(),
                "sampler": self.sampler.state_dict(), "rng": rng_state(), "step": self.step,
                "elapsed_s": self.elapsed, "steady_steps": self.steady_steps,
                "world_size": self.info.world_size, "history": self.history, "best": self.best,
                "rollbacks": self.rollbacks, "classes": self.classes,
                "spike_lowest": self.spike_guard.lowest if self.spike_guard else None}
            if best:  # best.pt first: a kill between the two leaves best.pt <= checkpoint.pt
                self.folder.save_checkpoint(state, BEST)
            self.folder.save_checkpoint(state)
        self.checkpoint_step = self.step

    def validate(self) -> None:
        """Score the validation tasks; a new best is saved as best.pt (with checkpoint.pt, so a
        resumed run never starts before its best). Its time is left out of the training
        clock."""
        paused, config = time.perf_counter(), self.config
        result = evaluate(self.anil, self.val_tasks, config.val_tasks, config.bn_mode,
                          config.eval_inner_steps)
        record = {"step": self.step, "elapsed_s": round(self.elapsed, 4),
                  "accuracy": result["accuracy_after"], "ci95": result["ci95_after"]}
        self.val_records.append(record)
        if self.board:
            self.board.scalars(self.step, {"validation/accuracy": record["accuracy"]})
        if self.info.is_main:
            with open(self.folder.path / VALIDATION, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.best is None or record["accuracy"] > self.best["accuracy"]:
            self.best = record
            self.checkpoint(best=True)
        self.validation_s += time.perf_counter() - paused

    def validation_due(self) -> bool:
        config = self.config
        if not config.validates:
            return False
        if config.val_every and self.step % config.val_every == 0:
            return True
        last = self.val_records[-1]["elapsed_s"] if self.val_records else 0.0
        return config.val_every_s is not None and self.elapsed - last >= config.val_every_s

    def on_spike(self, window_mean: float) -> None:
        """A loss spike: back to the last good checkpoint at a lower outer lr (rollback.py),
        said on the console; stopped as diverged after rollback.MAX_ROLLBACKS of them."""
        if len(self.rollbacks) >= rollback.MAX_ROLLBACKS:
            kept = kept_checkpoint(self.folder.path / CHECKPOINT, self.checkpoint_step)
            raise TrainingDiverged(f"the training loss spiked again at step {self.step} (mean "
                                   f"{window_mean:.3g}, lowest {self.spike_guard.lowest:.3g}) "
                                   f"after {rollback.MAX_ROLLBACKS} rollbacks; training "
                                   f"stopped and {kept}. {ADVICE}")
        record = rollback.roll_back(self.anil, self.optimizer, self.folder.path)
        if record is None:  # nothing to go back to yet: the run carries on
            return
        record = {"step": self.step, "window_loss": round(window_mean, 4),
                  "lowest_window_loss": round(self.spike_guard.lowest, 4), **record}
        self.rollbacks.append(record)
        if self.info.is_main:
            tqdm.write(f"loss spike at step {self.step} (mean {window_mean:.3g}, lowest "
                       f"{record['lowest_window_loss']:.3g}): back to {record['back_to']}, "
                       f"outer lr x{record['outer_lr_scale']:g}")

    def _step_once(self, runner, share, first: bool, clock, base) -> None:
        started = time.perf_counter()
        # every rank draws the same indices and materialises only its share
        batch = self.sampler.materialise(self.sampler.next_indices()[share])
        result = runner(batch)
        self.step += 1
        if first:  # one-time costs: synchronise once to time them honestly
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.one_time["first_step_s"] = time.perf_counter() - started
        else:
            self.steady_steps += 1
            self.elapsed = base + time.perf_counter() - clock - self.validation_s
        self.pending.append((self.step, self.elapsed, result["loss"], result["accuracy"],
                             result["grad_norm"]))

    def train_steps(self, progress: bool = True) -> None:
        """Meta-steps until the step limit or the time budget. The session's first step
        carries the one-time costs (first-call compilation, CUDA-graph capture): it is timed
        apart and left out of the training clock, as validation is."""
        config, info = self.config, self.info
        total, budget = config.total_meta_steps, config.time_budget
        share = distributed.shard(config.meta_batch, info)
        all_reduce = distributed.gradient_all_reduce(self.anil.parameters()) if info.active else None
        runner = MetaStepRunner(self.optimizer, capture=config.capture,
                                total_tasks=config.meta_batch, all_reduce=all_reduce)
        bar = tqdm(total=total, initial=self.step, desc=f"train {config.scenario}", unit="it",
                   disable=not (progress and info.is_main), dynamic_ncols=True)
        base, clock = self.elapsed, None
        with ExitStack() as stack:
            stack.callback(bar.close)
            metrics_file = (stack.enter_context(open(self.folder.path / METRICS, "a"))
                            if info.is_main else None)
            while (total is None or self.step < total) and (budget is None or self.elapsed < budget):
                self._step_once(runner, share, clock is None, clock, base)
                clock = clock or time.perf_counter()
                bar.update(1)
                due_checkpoint = self.step % config.checkpoint_every == 0
                if self.step % config.log_every == 0 or due_checkpoint:
                    self.log(metrics_file, bar)
                if self.validation_due():
                    self.validate()
                if due_checkpoint and self.checkpoint_step != self.step:
                    self.checkpoint()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if clock is not None:
                self.elapsed = base + time.perf_counter() - clock - self.validation_s
            self.log(metrics_file, bar)
        if config.validates and (not self.val_records or self.val_records[-1]["step"] != self.step):
            self.validate()  # the final weights are a candidate too
        if self.checkpoint_step != self.step:
            self.checkpoint()

    # -- reports -----------------------------------------------------------------------------
    def summary(self, session_steps: int) -> dict:
        """results.json's training part (training/summary.py)."""
        return run_summary(self, session_steps)

    def test(self) -> dict:
        """The test of the selected weights: the best validation's where the run validated,
        else the last (evaluation.score_selected)."""
        return score_selected(self.anil, self.config, self.test_tasks, self.step, self.best,
                              self.folder.path / BEST)


def train(config: Config | Settings, out_dir, resume: bool = False, progress: bool = True,
          evaluate_at_end: bool = True, overwrite: bool = False, tensorboard=None) -> dict:
    """Meta-train one scenario into the run folder `out_dir`; return its summary (also
    results.json). `config`: a Config (resolved here, runs.settings.resolve) or Settings
    resolved already. A folder that already holds a run is refused unless `resume` (continue
    from its checkpoint) or `overwrite` (delete its run files and start over). The run ends
    at config.meta_steps or after config.time_budget seconds of training; with validation
    (standard protocol) the test accuracy reported is the best-validation checkpoint's.

    Under torchrun (torch.distributed initialised) every rank runs this with the same
    config: ranks share each meta-batch's tasks, rank 0 writes the files (distributed.py).
    `tensorboard`: a folder for TensorBoard scalars (tensorboard_log.py)."""
    settings = config if isinstance(config, Settings) else resolve(config)
    if tensorboard is not None:
        tensorboard_log.require(tensorboard)
    if resume and overwrite:
        raise InputError("resume and overwrite exclude each other")
    info, folder = distributed.current(), RunFolder(out_dir)
    created = info.is_main and folder.create()
    with folder.removed_if_refused(created), folder.locked(info.is_main), own_rng(settings.device):
        run = TrainingRun.set_up(settings, folder, info, resume, overwrite, evaluate_at_end)
        reset_peak_memory(settings.device)
        start_steps = run.steady_steps
        with GPUMonitor(settings.device) as monitor, ExitStack() as boards:
            if tensorboard is not None and info.is_main:
                run.board = boards.enter_context(tensorboard_log.TensorBoardLog(tensorboard))
            try:
                run.train_steps(progress)
            except KeyboardInterrupt:
                kept = kept_checkpoint(folder.path / CHECKPOINT, run.checkpoint_step)
                raise Interrupted(f"interrupted at step {run.step}; {kept}: continue with "
                                  f"--resume") from None
        summary = run.summary(run.steady_steps - start_steps)
        summary.update({"gpu_utilization": monitor.average_utilization,
                        **peak_memory(settings.device)})
        distributed.barrier()
        summary.update(loss_summary(folder.path / METRICS))
        if evaluate_at_end:
            summary.update(run.test())
        if info.is_main:
            folder.write_json(RESULTS, summary)
    return summary
