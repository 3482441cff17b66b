"""A training run's life cycle: set up (model, data, a fresh folder or a resumed checkpoint),
meta-steps with logging, checkpoints and validation, the summary, then the test of the
selected checkpoint. The objects come from build.py, the evaluation from evaluation.py, the
run folder's rules (lock, atomic checkpoints, refusal to clobber) from runfolder.py.

train() is a short sequence of named steps: _set_up, _train_steps (with _log, _validate and
_checkpoint), summary.run_summary, then evaluation.score_selected."""
from __future__ import annotations

import json
import os
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import distributed, tensorboard_log
from .anil import ANIL
from .build import (build_anil, build_meta_optimizer, default_split, load_model_state, own_rng,
                    resolve_device, resolve_model, rng_state, set_rng_state, task_sampler)
from .capture import MetaStepRunner
from .data import TaskSampler
from .divergence import (ADVICE, LOSS_LIMIT, Interrupted, TrainingDiverged, insane_loss,
                         insane_state, kept_checkpoint)
from .errors import InputError
from .evaluation import evaluate, score_selected
from .metrics import GPUMonitor, peak_memory, reset_peak_memory
from .optim import MetaOptimizer
from .rollback import LossSpikeGuard, on_spike
from .runfolder import (BEST, CHECKPOINT, CHECKPOINT_FORMAT, CONFIG, METRICS, RESULTS, VALIDATION,
                        RunFolder, RunFolderError, load_checkpoint, loss_summary,
                        read_metrics, truncate_metrics)
from .scenarios import Config, normalized_config, validate_config
from .schedules import lr_factor
from .schedules import progress as schedule_progress
from .summary import run_summary

# Fields that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"meta_steps", "device", "checkpoint_every", "log_every", "notes", "backend",
                     "compile", "capture", "inner_lr", "outer_lr", "test_tasks",
                     "eval_inner_steps", "bn_mode", "time_budget", "lr_schedule", "lr_floor",
                     "val_every", "val_every_s", "clip_grad_norm", "precision", "spike_rollback"}
# Of those, the ones that change what is computed: a resume records them (results.json).
RECORDED_CHANGES = RESUMABLE_CHANGES - {"device", "checkpoint_every", "log_every", "notes",
                                        "compile", "capture"}
__all__ = ["train", "TrainingDiverged", "Interrupted", "RunFolderError", "load_checkpoint"]


@dataclass
class _Run:
    """What one training run holds while it runs (train() drives it step by step)."""
    config: Config
    folder: RunFolder
    info: distributed.DistInfo
    device: torch.device
    anil: ANIL
    optimizer: MetaOptimizer
    sampler: TaskSampler
    test: TaskSampler | None
    val: TaskSampler | None
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
    spike_guard: LossSpikeGuard | None = None  # --spike-rollback (rollback.py)
    rollbacks: list = field(default_factory=list)  # what each loss-spike rollback did
    classes: dict | None = None  # a folder dataset's default split as first drawn (its names)


def _set_up(config: Config, folder: RunFolder, device, info, resume: bool, overwrite: bool,
            evaluate_at_end: bool) -> _Run:
    """Everything that can fail before the first step fails here, before the folder changes."""
    present = folder.holds_run() if info.is_main else []
    if present and not (resume or overwrite):
        raise RunFolderError(f"--out {folder.path} already holds a run ({', '.join(present)}); "
                             f"pass --resume to continue it or --overwrite to start it over")
    checkpoint = folder.path / CHECKPOINT
    ckpt = load_checkpoint(checkpoint) if resume and checkpoint.exists() else None
    # a folder dataset's default split as the run first drew it: a class added since reshuffles it
    classes = (ckpt or {}).get("classes") or default_split(config)
    start = time.perf_counter()
    anil = build_anil(config, device)
    sampler = task_sampler(config, "train", device, classes=classes)
    # the test split is checked now (ways, shots + queries), not after training
    test = task_sampler(config, "test", device, classes=classes) if evaluate_at_end else None
    val = task_sampler(config, "validation", device, classes=classes) if config.validates else None
    one_time = {"data_and_model_s": time.perf_counter() - start}
    if anil.uses_fused_head() and device.type == "cpu":  # the C++ build happens here, not in step 1
        from . import ops
        start = time.perf_counter()
        ops.small_loop(device)
        one_time["backend_build_s"] = time.perf_counter() - start
    run = _Run(config, folder, info, device, anil, None, sampler, test, val, one_time=one_time,
               classes=classes)
    if config.spike_rollback is not None:
        run.spike_guard = LossSpikeGuard(config.spike_rollback)
    total, budget = config.total_meta_steps, config.time_budget
    run.optimizer = build_meta_optimizer(config, anil, schedule=lambda step: lr_factor(
        config.lr_schedule, schedule_progress(step, total, run.elapsed, budget), config.lr_floor))
    if ckpt is not None:
        _resume(run, ckpt)
    elif resume and present:  # never delete what --resume did not ask to delete
        raise RunFolderError(f"--resume: {folder.path} has no {CHECKPOINT} to resume from, but "
                             f"holds {', '.join(present)}; point --out at the run's folder, put "
                             f"its {CHECKPOINT} back, or start over with --overwrite")
    elif info.is_main:
        if resume:
            warnings.warn(f"--resume: {folder.path} holds no run to resume; starting at step 0")
        folder.clear()  # --overwrite, or --resume in an empty folder: start from step 0
    distributed.barrier()  # nobody starts before rank 0 has tidied the run folder
    if info.is_main:
        folder.write_json(CONFIG, config.to_dict())
    return run


def _resume(run: _Run, ckpt: dict) -> None:
    # settings an earlier version did not record take their defaults (what it used)
    stored, config = {**Config().to_dict(), **ckpt["config"]}, run.config
    for key in ("data", "split_file"):  # recorded relative by earlier versions
        if stored.get(key) is not None:
            stored[key] = os.path.abspath(stored[key])
    wanted = config.to_dict()
    differ = {k for k, v in wanted.items() if k not in RESUMABLE_CHANGES and stored.get(k) != v}
    if differ:
        raise InputError(f"resume: the checkpoint in {run.folder.path} was made with other "
                         f"settings ({', '.join(sorted(differ))}); use another --out or the same "
                         f"settings (these may change: {', '.join(sorted(RESUMABLE_CHANGES))})")
    total = config.total_meta_steps
    if total is not None and ckpt["step"] > total:
        raise InputError(f"resume: the checkpoint in {run.folder.path} is at step {ckpt['step']}, "
                         f"past the {total} meta-steps asked for; ask for at least "
                         f"{ckpt['step']} (or evaluate it with anil-fast eval)")
    load_model_state(run.anil, ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.sampler.load_state_dict(ckpt["sampler"])
    set_rng_state(ckpt["rng"])
    run.step = run.checkpoint_step = ckpt["step"]
    run.elapsed = ckpt["elapsed_s"]
    run.steady_steps = ckpt.get("steady_steps", run.step)
    run.best = ckpt.get("best")
    run.rollbacks = list(ckpt.get("rollbacks", []))
    if run.spike_guard is not None and ckpt.get("spike_lowest") is not None:
        run.spike_guard.lowest = ckpt["spike_lowest"]
    changes = {k: [stored.get(k), v] for k, v in wanted.items()
               if k in RECORDED_CHANGES and stored.get(k) != v}
    run.history = list(ckpt.get("history", [])) + (
        [{"step": run.step, "changes": changes}] if changes else [])
    if run.info.is_main:
        truncate_metrics(run.folder.path / METRICS, run.step)
        truncate_metrics(run.folder.path / VALIDATION, run.step)
    run.val_records = read_metrics(run.folder.path / VALIDATION)


def _log(run: _Run, metrics_file, bar) -> None:
    """Read the pending metrics back (one host sync) and append them to metrics.jsonl; a NaN
    or inf loss stops the run."""
    if not run.pending:
        return
    values = torch.stack([torch.stack(p[2:]).float() for p in run.pending]).tolist()
    for (step, elapsed, *_), (loss, acc, grad_norm) in zip(run.pending, values):
        if insane_loss(loss):
            _diverged(run, f"the meta-loss became {loss:.3g} at step {step} (more than "
                           f"{LOSS_LIMIT:g} or not finite)")
        if metrics_file:
            metrics_file.write(json.dumps({"step": step, "loss": loss, "accuracy": acc,
                                           "grad_norm": grad_norm,
                                           "elapsed_s": round(elapsed, 4)}) + "\n")
        if run.board:
            run.board.scalars(step, {"train/loss": loss, "train/accuracy": acc,
                                     "train/grad_norm": grad_norm})
    if metrics_file:
        metrics_file.flush()
    if run.board:
        run.board.progress(run.step, run.optimizer.learning_rates(), run.device,
                           run.steady_steps / run.elapsed if run.elapsed else None)
    bar.set_postfix(loss=f"{values[-1][0]:.3f}", acc=f"{values[-1][1]:.3f}")
    run.pending.clear()
    window = sum(v[0] for v in values) / len(values)
    if run.spike_guard is not None and run.spike_guard.spiked(window):
        on_spike(run, window)


def _diverged(run: _Run, what: str):
    kept = kept_checkpoint(run.folder.path / CHECKPOINT, run.checkpoint_step)
    raise TrainingDiverged(f"{what}; training stopped and {kept}. {ADVICE}")


def _checkpoint(run: _Run, best: bool = False) -> None:
    """checkpoint.pt (and best.pt, the same content, for a new best validation score)."""
    distributed.average_running_stats(run.anil.body)  # one set of BatchNorm statistics
    wrong = insane_state(run.anil)  # finite losses can hide weights that are already lost
    if wrong:
        _diverged(run, f"{wrong} at step {run.step}")
    if run.info.is_main:
        state = {
            "format": CHECKPOINT_FORMAT, "config": run.config.to_dict(),
            "model": run.anil.state_dict(), "optimizer": run.optimizer.state_dict(),
            "sampler": run.sampler.state_dict(), "rng": rng_state(), "step": run.step,
            "elapsed_s": run.elapsed, "steady_steps": run.steady_steps,
            "world_size": run.info.world_size, "history": run.history, "best": run.best,
            "rollbacks": run.rollbacks, "classes": run.classes,
            "spike_lowest": run.spike_guard.lowest if run.spike_guard else None}
        if best:  # best.pt first: a kill between the two leaves best.pt <= checkpoint.pt
            run.folder.save_checkpoint(state, BEST)
        run.folder.save_checkpoint(state)
    run.checkpoint_step = run.step


def _validate(run: _Run) -> None:
    """Score the validation tasks; a new best is saved as best.pt (with checkpoint.pt, so a
    resumed run never starts before its best)."""
    config = run.config
    result = evaluate(run.anil, run.val, config.val_tasks, config.bn_mode, config.eval_inner_steps)
    record = {"step": run.step, "elapsed_s": round(run.elapsed, 4),
              "accuracy": result["accuracy_after"], "ci95": result["ci95_after"]}
    run.val_records.append(record)
    if run.board:
        run.board.scalars(run.step, {"validation/accuracy": record["accuracy"]})
    if run.info.is_main:
        with open(run.folder.path / VALIDATION, "a") as f:
            f.write(json.dumps(record) + "\n")
    if run.best is None or record["accuracy"] > run.best["accuracy"]:
        run.best = record
        _checkpoint(run, best=True)


def _validation_due(run: _Run) -> bool:
    config = run.config
    if not config.validates:
        return False
    if config.val_every and run.step % config.val_every == 0:
        return True
    last = run.val_records[-1]["elapsed_s"] if run.val_records else 0.0
    return config.val_every_s is not None and run.elapsed - last >= config.val_every_s


def _train_steps(run: _Run, progress: bool) -> None:
    """Meta-steps until the step limit or the time budget. The session's first step carries
    the one-time costs (first-call compilation, CUDA-graph capture): it is timed apart and
    left out of the training clock, as validation is."""
    config, info = run.config, run.info
    total, budget = config.total_meta_steps, config.time_budget
    share = distributed.shard(config.meta_batch, info)
    all_reduce = distributed.gradient_all_reduce(run.anil.parameters()) if info.active else None
    runner = MetaStepRunner(run.optimizer, capture=config.capture, total_tasks=config.meta_batch,
                            all_reduce=all_reduce)
    bar = tqdm(total=total, initial=run.step, desc=f"train {config.scenario}", unit="it",
               disable=not (progress and info.is_main), dynamic_ncols=True)
    base, clock, first = run.elapsed, None, True
    with ExitStack() as stack:
        stack.callback(bar.close)
        metrics_file = (stack.enter_context(open(run.folder.path / METRICS, "a"))
                        if info.is_main else None)
        while (total is None or run.step < total) and (budget is None or run.elapsed < budget):
            started = time.perf_counter()
            # every rank draws the same indices and materialises only its share
            batch = run.sampler.materialise(run.sampler.next_indices()[share])
            result = runner(batch)
            run.step += 1
            if first:  # one-time costs: synchronise once to time them honestly
                if run.device.type == "cuda":
                    torch.cuda.synchronize(run.device)
                run.one_time["first_step_s"] = time.perf_counter() - started
                clock, first = time.perf_counter(), False
            else:
                run.steady_steps += 1
                run.elapsed = base + time.perf_counter() - clock - run.validation_s
            run.pending.append((run.step, run.elapsed, result["loss"], result["accuracy"],
                                result["grad_norm"]))
            bar.update(1)
            due_checkpoint = run.step % config.checkpoint_every == 0
            if run.step % config.log_every == 0 or due_checkpoint:
                _log(run, metrics_file, bar)
            if _validation_due(run):
                paused = time.perf_counter()
                _validate(run)
                run.validation_s += time.perf_counter() - paused
            if due_checkpoint and run.checkpoint_step != run.step:
                _checkpoint(run)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        if clock is not None:
            run.elapsed = base + time.perf_counter() - clock - run.validation_s
        _log(run, metrics_file, bar)
    if config.validates and (not run.val_records or run.val_records[-1]["step"] != run.step):
        paused = time.perf_counter()
        _validate(run)  # the final weights are a candidate too
        run.validation_s += time.perf_counter() - paused
    if run.checkpoint_step != run.step:
        _checkpoint(run)


def train(config: Config, out_dir, resume: bool = False, progress: bool = True,
          evaluate_at_end: bool = True, overwrite: bool = False, tensorboard=None) -> dict:
    """Meta-train one scenario into the run folder `out_dir`; return its summary (also
    results.json). A folder that already holds a run is refused unless `resume` (continue
    from its checkpoint) or `overwrite` (delete its run files and start over). The run ends at
    config.meta_steps or after config.time_budget seconds of training; with validation
    (standard protocol) the test accuracy reported is the best-validation checkpoint's.

    Under torchrun (torch.distributed initialised) every rank runs this with the same
    config: ranks share each meta-batch's tasks, rank 0 writes the files (distributed.py).
    `tensorboard`: a folder for TensorBoard scalars (tensorboard_log.py)."""
    validate_config(config)
    if tensorboard is not None:
        tensorboard_log.require(tensorboard)
    config = resolve_model(normalized_config(config))
    if resume and overwrite:
        raise InputError("resume and overwrite exclude each other")
    info = distributed.current()
    distributed.check_config(config, info)
    folder = RunFolder(out_dir)
    device = resolve_device(distributed.rank_device(info, config.device))
    created = info.is_main and folder.create()
    with folder.removed_if_refused(created), folder.locked(info.is_main), own_rng(device):
        run = _set_up(config, folder, device, info, resume, overwrite, evaluate_at_end)
        reset_peak_memory(device)
        start_steps = run.steady_steps
        with GPUMonitor(device) as monitor, ExitStack() as boards:
            if tensorboard is not None and info.is_main:
                run.board = boards.enter_context(tensorboard_log.TensorBoardLog(tensorboard))
            try:
                _train_steps(run, progress)
            except KeyboardInterrupt:
                kept = kept_checkpoint(folder.path / CHECKPOINT, run.checkpoint_step)
                raise Interrupted(f"interrupted at step {run.step}; {kept}: continue with "
                                  f"--resume") from None
        summary = run_summary(run, run.steady_steps - start_steps)
        summary.update({"gpu_utilization": monitor.average_utilization, **peak_memory(device)})
        distributed.barrier()
        summary.update(loss_summary(folder.path / METRICS))
        if evaluate_at_end:
            summary.update(score_selected(run.anil, config, run.test, run.step, run.best,
                                          folder.path / BEST))
        if info.is_main:
            folder.write_json(RESULTS, summary)
    return summary

