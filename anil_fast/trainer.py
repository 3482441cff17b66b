"""Training and evaluation runs: data, model, the meta-training loop with metrics, safe run
folders (runfolder.py: lock, atomic checkpoints, refusal to clobber) and exact resume, and
evaluation with 95% confidence intervals.

train() is a short sequence of named steps: _set_up (model, data, resume or a fresh folder),
_train_steps (meta-steps, with _log and _checkpoint), _summary, then the evaluation."""
from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed, models
from .anil import BN_MODES, ANIL, cpu_has_native_bf16, prefers_channels_last
from .capture import MetaStepRunner
from .optim import MetaOptimizer
from .data import TaskSampler, image_folder, load_benchmark, load_split
from .metrics import GPUMonitor, mean_ci95, peak_memory, reset_peak_memory
from .runfolder import (BEST, CHECKPOINT, CHECKPOINT_FORMAT, CONFIG, METRICS, RESULTS, VALIDATION, RunFolder,
                        RunFolderError, load_checkpoint, read_metrics, truncate_metrics,
                        weights_are_sane)
from .scenarios import MAX_SEED, Config, body_lr_multipliers, validate_config
from .schedules import lr_factor
from .schedules import progress as schedule_progress

# Fields that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"meta_steps", "device", "checkpoint_every", "log_every", "notes", "backend",
                     "compile", "capture", "inner_lr", "outer_lr", "test_tasks",
                     "eval_inner_steps", "bn_mode", "time_budget", "lr_schedule", "lr_floor",
                     "val_every", "val_every_s"}
# Of those, the ones that change what is computed: a resume records them (results.json).
RECORDED_CHANGES = {"inner_lr", "outer_lr", "meta_steps", "backend", "test_tasks",
                    "eval_inner_steps", "bn_mode", "time_budget", "lr_schedule", "lr_floor",
                    "val_every", "val_every_s"}
# A checkpoint is only written while every parameter is finite and at most this large: no
# network this toolkit trains has weights near it, a diverging one passes it long before NaN.
SANE_WEIGHT_LIMIT = 1e6

__all__ = ["train", "evaluate", "evaluate_checkpoint", "load_checkpoint", "TrainingDiverged",
           "RunFolderError"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    return dev


def build_anil(config: Config, device) -> ANIL:
    """The model of a run, initialised from config.seed. bf16 on a CPU without native bf16
    (AVX-512 BF16, AMX, Arm BF16) is many times slower than fp32: such a run uses fp32 and
    says so."""
    precision = config.precision
    device = torch.device(device)
    if precision == "bf16" and device.type == "cpu" and cpu_has_native_bf16() is False:
        warnings.warn("--precision bf16: this CPU has no native bf16 (no AVX-512 BF16, AMX or "
                      "Arm BF16), where bf16 runs many times slower than fp32; training in fp32",
                      stacklevel=2)
        precision = "fp32"
    torch.manual_seed(config.seed)
    body, head = models.build(config.model, config.ways, config.image_size,
                              channels=config.input_channels, pretrained=config.pretrained,
                              hidden=config.hidden)
    channels_last = prefers_channels_last(device, precision, config.backend)
    anil = ANIL(body.to(device), head.to(device), inner_lr=config.inner_lr,
                inner_steps=config.inner_steps, freeze_body=config.freeze_body,
                first_order=config.first_order, backend=config.backend,
                precision=precision, compile=config.compile, channels_last=channels_last)
    return anil


def load_model_state(anil: ANIL, state: dict) -> None:
    """A checkpoint's weights into `anil`; a ValueError when they do not fit it."""
    try:
        anil.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint: its weights do not fit this model ({exc})") from exc


def build_meta_optimizer(config: Config, anil: ANIL, schedule=None) -> MetaOptimizer:
    """The presets' optimisation: Adam at config.outer_lr, the preset's learning-rate
    multipliers, warmup of the body, and `schedule` (step -> factor)."""
    return MetaOptimizer(anil, lr=config.outer_lr, optimizer=torch.optim.Adam,
                         multipliers=body_lr_multipliers(config, anil.body),
                         warmup_steps=config.warmup_steps, schedule=schedule)


def split_images(config: Config, split: str, device):
    """The images of a split of the config's dataset: Omniglot's tensor [characters, 20, 1, H,
    W] or a FewShotImages (the benchmarks, a folder of class folders)."""
    if config.dataset == "omniglot":
        return load_split(config.protocol, split, config.image_size, config.data_root, device,
                          validation=config.validation if split != "test" else 0)
    if config.dataset == "folder":
        return image_folder(config.data, split, config.image_size, config.input_channels,
                            config.split_file, device)
    return load_benchmark(config.dataset, split, config.image_size, config.data_root, device)


def train_sampler(config: Config, device) -> TaskSampler:
    images = split_images(config, "train", device)
    return TaskSampler(images, config.ways, config.shots, config.queries, config.meta_batch,
                       rotations=config.rotations, seed=config.seed, num_tasks=config.tasks)


def test_sampler(config: Config, device, tasks: int, batch: int = 50) -> TaskSampler:
    """A fixed pool of `tasks` test tasks: the same tasks for every scenario of one seed."""
    images = split_images(config, "test", device)
    return TaskSampler(images, config.ways, config.shots, config.queries, min(batch, tasks),
                       rotations=config.rotations, seed=(10_000 + config.seed) % (MAX_SEED + 1),
                       num_tasks=tasks)


def validation_sampler(config: Config, device) -> TaskSampler:
    """A fixed pool of validation tasks (Omniglot: from the held-out training characters;
    other datasets: from their validation split): every validation of a run scores the same
    tasks."""
    images = split_images(config, "validation", device)
    return TaskSampler(images, config.ways, config.shots, config.queries,
                       min(50, config.val_tasks), rotations=config.rotations,
                       seed=(20_000 + config.seed) % (MAX_SEED + 1), num_tasks=config.val_tasks)


def evaluate(anil: ANIL, sampler: TaskSampler, tasks: int, bn_mode: str = "transductive",
             inner_steps: int | None = None, progress: bool = False) -> dict:
    """Mean query accuracy before and after adaptation over `tasks` tasks, with 95% CIs.
    Under torch.distributed each rank adapts its share of every batch and the per-task
    accuracies are gathered in task order: the same numbers as one process."""
    info = distributed.current()
    distributed.average_running_stats(anil.body)
    before, after = [], []
    done = 0
    bar = tqdm(total=tasks, desc="eval", unit="task", disable=not (progress and info.is_main),
               leave=False)
    while done < tasks:
        indices = sampler.next_indices()[: tasks - done]
        count = indices.characters.shape[0]
        share = distributed.shard(count, info)
        if share.stop > share.start:
            result = anil.evaluate(sampler.materialise(indices[share]), inner_steps, bn_mode)
            per_before, per_after = result["per_task_before"], result["per_task_after"]
        else:  # more ranks than tasks in this batch
            per_before = per_after = torch.zeros(0)
        device = indices.characters.device
        before.append(distributed.gather_tensor(per_before.to(device)).cpu())
        after.append(distributed.gather_tensor(per_after.to(device)).cpu())
        done += count
        bar.update(count)
    bar.close()
    before_t, after_t = torch.cat(before), torch.cat(after)
    mean_b, ci_b = mean_ci95(before_t.numpy())
    mean_a, ci_a = mean_ci95(after_t.numpy())
    return {"accuracy_before": mean_b, "ci95_before": ci_b, "accuracy_after": mean_a,
            "ci95_after": ci_a, "gain": mean_a - mean_b, "tasks": tasks, "bn_mode": bn_mode,
            "per_task_after": after_t.tolist()}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _own_rng(device: torch.device):
    """The caller's global RNG states are restored when a run returns: train() and
    evaluate_checkpoint() seed their own."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


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
    pending: list = field(default_factory=list)  # (step, elapsed, loss, accuracy) to log
    best: dict | None = None  # the best validation record so far (its weights: best.pt)
    val_records: list = field(default_factory=list)
    one_time: dict = field(default_factory=dict)  # seconds of set-up, build, first step
    validation_s: float = 0.0


def _set_up(config: Config, folder: RunFolder, device, info, resume: bool, overwrite: bool,
            evaluate_at_end: bool) -> _Run:
    """Everything that can fail before the first step fails here, before the folder changes."""
    present = folder.holds_run() if info.is_main else []
    if present and not (resume or overwrite):
        raise RunFolderError(f"--out {folder.path} already holds a run ({', '.join(present)}); "
                             f"pass --resume to continue it or --overwrite to start it over")
    start = time.perf_counter()
    anil = build_anil(config, device)
    sampler = train_sampler(config, device)
    # the test split is checked now (ways, shots + queries), not after training
    test = test_sampler(config, device, config.test_tasks) if evaluate_at_end else None
    val = validation_sampler(config, device) if config.validates else None
    one_time = {"data_and_model_s": time.perf_counter() - start}
    if anil.uses_fused_head() and device.type == "cpu":  # the C++ build happens here, not in step 1
        from . import ops
        start = time.perf_counter()
        ops.small_loop(device)
        one_time["backend_build_s"] = time.perf_counter() - start
    run = _Run(config, folder, info, device, anil, None, sampler, test, val, one_time=one_time)
    total, budget = config.total_meta_steps, config.time_budget
    run.optimizer = build_meta_optimizer(config, anil, schedule=lambda step: lr_factor(
        config.lr_schedule, schedule_progress(step, total, run.elapsed, budget), config.lr_floor))
    checkpoint = folder.path / CHECKPOINT
    if resume and checkpoint.exists():
        _resume(run, load_checkpoint(checkpoint))
    elif info.is_main:
        folder.clear()  # --overwrite, or --resume with nothing to resume: start from step 0
    distributed.barrier()  # nobody starts before rank 0 has tidied the run folder
    if info.is_main:
        folder.write_json(CONFIG, config.to_dict())
    return run


def _resume(run: _Run, ckpt: dict) -> None:
    stored, config = ckpt["config"], run.config
    wanted = config.to_dict()
    differ = {k for k, v in wanted.items() if k not in RESUMABLE_CHANGES and stored.get(k) != v}
    if differ:
        raise ValueError(f"resume: the checkpoint in {run.folder.path} was made with other "
                         f"settings ({', '.join(sorted(differ))}); use another --out or the same "
                         f"settings (these may change: {', '.join(sorted(RESUMABLE_CHANGES))})")
    total = config.total_meta_steps
    if total is not None and ckpt["step"] > total:
        raise ValueError(f"resume: the checkpoint in {run.folder.path} is at step {ckpt['step']}, "
                         f"past the {total} meta-steps asked for; ask for at least "
                         f"{ckpt['step']} (or evaluate it with anil-fast eval)")
    load_model_state(run.anil, ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.sampler.load_state_dict(ckpt["sampler"])
    _set_rng_state(ckpt["rng"])
    run.step = run.checkpoint_step = ckpt["step"]
    run.elapsed = ckpt["elapsed_s"]
    run.steady_steps = ckpt.get("steady_steps", run.step)
    run.best = ckpt.get("best")
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
    values = torch.stack([torch.stack([p[2], p[3]]) for p in run.pending]).tolist()
    for (step, elapsed, _, _), (loss, acc) in zip(run.pending, values):
        if not math.isfinite(loss):
            _diverged(run, f"the meta-loss became {loss} at step {step}")
        if metrics_file:
            metrics_file.write(json.dumps({"step": step, "loss": loss, "accuracy": acc,
                                           "elapsed_s": round(elapsed, 4)}) + "\n")
    if metrics_file:
        metrics_file.flush()
    bar.set_postfix(loss=f"{values[-1][0]:.3f}", acc=f"{values[-1][1]:.3f}")
    run.pending.clear()


def _diverged(run: _Run, what: str):
    ckpt = run.folder.path / CHECKPOINT
    kept = (f"the last good checkpoint ({ckpt}, step {run.checkpoint_step}) is kept"
            if run.checkpoint_step else "no checkpoint was written yet")
    raise TrainingDiverged(
        f"{what}; training stopped and {kept}. Lower --outer-lr or --inner-lr and continue "
        f"with --resume (learning rates may change on resume; results.json records it), or "
        f"start over with --overwrite (inside torch.compile or a CUDA graph, labels outside "
        f"0..ways-1 also give a NaN loss)")


def _checkpoint(run: _Run, best: bool = False) -> None:
    """checkpoint.pt (and best.pt, the same content, for a new best validation score)."""
    distributed.average_running_stats(run.anil.body)  # one set of BatchNorm statistics
    sane, largest = weights_are_sane(run.anil.parameters(), SANE_WEIGHT_LIMIT)
    if not sane:  # finite losses can hide weights that are already lost
        _diverged(run, f"a parameter reached |w| = {largest:.3g} at step {run.step} (more than "
                       f"{SANE_WEIGHT_LIMIT:g} or not finite)")
    if run.info.is_main:
        state = {
            "format": CHECKPOINT_FORMAT, "config": run.config.to_dict(),
            "model": run.anil.state_dict(), "optimizer": run.optimizer.state_dict(),
            "sampler": run.sampler.state_dict(), "rng": _rng_state(), "step": run.step,
            "elapsed_s": run.elapsed, "steady_steps": run.steady_steps,
            "world_size": run.info.world_size, "history": run.history, "best": run.best}
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
            run.pending.append((run.step, run.elapsed, result["loss"], result["accuracy"]))
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


def _summary(run: _Run, session_steps: int) -> dict:
    config, anil = run.config, run.anil
    session_it_s = session_steps / run.elapsed if run.elapsed else 0.0
    rank_it_s = distributed.gather_values(session_it_s)
    counts = parameter_counts(anil, run.optimizer)
    tasks = training_tasks(config, run.step)
    budget = config.time_budget
    return {"scenario": config.scenario, "model": config.model, "notes": config.notes,
            "meta_steps": run.step, "train_time_s": run.elapsed,
            "it_s": run.steady_steps / run.elapsed if run.elapsed else None,
            "time_budget_s": budget,
            "stopped_by": "time budget" if budget is not None and run.elapsed >= budget else "steps",
            "one_time_s": {k: round(v, 3) for k, v in run.one_time.items()},
            "validation_s": run.validation_s,
            "world_size": run.info.world_size, "per_rank_it_s": rank_it_s,
            "precision": anil.precision, "device": str(run.device), **counts,
            "training_tasks": tasks,
            "parameters_per_training_task": counts["trainable_parameters"] / tasks,
            "param_groups": [{k: v for k, v in g.items() if k != "names"}
                             for g in run.optimizer.groups_report()],
            "resumes_with_changes": run.history,
            "validation": {"records": run.val_records, "best": run.best} if config.validates else None}


def _evaluate_selected(run: _Run) -> dict:
    """Test accuracy of the last weights and, with validation, of the best-validation
    checkpoint: {"evaluation": selected, "evaluation_last": last, "selected": ...}."""
    config = run.config

    def test():
        result = evaluate(run.anil, run.test, config.test_tasks, config.bn_mode,
                          config.eval_inner_steps)
        result.pop("per_task_after")
        return result
    last = test()
    if not config.validates or run.best is None:
        return {"evaluation": last, "selected": f"last (step {run.step})"}
    out = {"evaluation_last": last,
           "selected": f"best validation (step {run.best['step']}, "
                       f"{100 * run.best['accuracy']:.2f}% on {config.val_tasks} tasks)"}
    if run.best["step"] == run.step:
        out["evaluation"] = last
    else:
        load_model_state(run.anil, load_checkpoint(run.folder.path / BEST)["model"])
        out["evaluation"] = test()
    return out


def train(config: Config, out_dir, resume: bool = False, progress: bool = True,
          evaluate_at_end: bool = True, overwrite: bool = False) -> dict:
    """Meta-train one scenario into the run folder `out_dir`; return its summary (also
    results.json). A folder that already holds a run is refused unless `resume` (continue
    from its checkpoint) or `overwrite` (delete its run files and start over). The run ends at
    config.meta_steps or after config.time_budget seconds of training; with validation
    (standard protocol) the test accuracy reported is the best-validation checkpoint's.

    Under torchrun (torch.distributed initialised) every rank runs this with the same
    config: ranks share each meta-batch's tasks, rank 0 writes the files (distributed.py)."""
    validate_config(config)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    info = distributed.current()
    if info.active and config.meta_batch < info.world_size:
        raise ValueError(f"meta_batch ({config.meta_batch}) must be at least the number of "
                         f"ranks ({info.world_size})")
    if info.active and (config.time_budget is not None or config.val_every_s is not None):
        raise ValueError("under torchrun, end runs by --meta-steps and validate by --val-every "
                         "(time-based limits could stop the ranks at different steps)")
    folder = RunFolder(out_dir)
    if info.is_main:
        folder.create()
    device = resolve_device(distributed.rank_device(info, config.device))
    with folder.locked(info.is_main), _own_rng(device):
        run = _set_up(config, folder, device, info, resume, overwrite, evaluate_at_end)
        reset_peak_memory(device)
        start_steps = run.steady_steps
        with GPUMonitor(device) as monitor:
            _train_steps(run, progress)
        summary = _summary(run, run.steady_steps - start_steps)
        summary.update({"gpu_utilization": monitor.average_utilization, **peak_memory(device)})
        distributed.barrier()
        summary.update(loss_summary(folder.path / METRICS))
        if evaluate_at_end:
            summary.update(_evaluate_selected(run))
        if info.is_main:
            folder.write_json(RESULTS, summary)
    return summary


def training_tasks(config: Config, steps: int) -> int:
    """Distinct training tasks a run of `steps` steps sees: its pool, or every task it draws."""
    drawn = max(steps, 1) * config.meta_batch
    return min(config.tasks, drawn) if config.tasks else drawn


def loss_summary(path: Path) -> dict:
    losses = [r["loss"] for r in read_metrics(path)]
    if not losses:
        return {"initial_loss": None, "final_loss": None, "min_loss": None}
    return {"initial_loss": losses[0], "final_loss": losses[-1], "min_loss": min(losses)}


def parameter_counts(anil: ANIL, optimizer: MetaOptimizer) -> dict:
    from .batchnorm import batchnorm_layers
    bn = sum(p.numel() for m in batchnorm_layers(anil.body) for p in m.parameters(recurse=False))
    body = models.count_parameters(anil.body)
    head = models.count_parameters(anil.head)
    trainable = sum(g["parameters"] for g in optimizer.groups_report())
    return {"total_parameters": body + head, "trainable_parameters": trainable,
            "body_parameters": body, "head_parameters": head, "batchnorm_parameters": bn}


def evaluate_checkpoint(path, tasks: int = 1000, bn_mode: str = "transductive",
                        device: str = "auto", progress: bool = True) -> dict:
    """Evaluate a run's checkpoint on `tasks` test tasks (the caller's RNG is left as it was)."""
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        raise ValueError(f"tasks must be a positive int, got {tasks!r}")
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    ckpt = load_checkpoint(path)
    fields = dict(ckpt["config"])
    unknown = set(fields) - {f for f in Config.__dataclass_fields__}
    if unknown:
        raise ValueError(f"checkpoint: {path} was written with settings this anil-fast does not "
                         f"know ({', '.join(sorted(unknown))})")
    config = Config(**fields)
    config.device = device
    validate_config(config)
    dev = resolve_device(distributed.rank_device(distributed.current(), device))
    with _own_rng(dev):
        anil = build_anil(config, dev)
        load_model_state(anil, ckpt["model"])
        result = evaluate(anil, test_sampler(config, dev, tasks), tasks, bn_mode,
                          config.eval_inner_steps, progress=progress)
    result.pop("per_task_after")
    result.update({"scenario": config.scenario, "model": config.model, "step": ckpt["step"]})
    return result
