"""Training and evaluation runs: data, model, the meta-training loop with metrics, atomic
checkpoints and exact resume, and evaluation with 95% confidence intervals."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed, models
from .anil import ANIL
from .capture import MetaStepRunner
from .data import TaskSampler, load_split
from .metrics import GPUMonitor, mean_ci95, peak_memory, reset_peak_memory
from .scenarios import Config, body_lr_multipliers, validate_config

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
# Fields that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"meta_steps", "device", "checkpoint_every", "log_every", "notes", "backend",
                     "compile", "capture"}


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
    """The model of a run, initialised from config.seed."""
    torch.manual_seed(config.seed)
    body, head = models.build(config.model, config.ways, config.image_size,
                              pretrained=config.pretrained)
    anil = ANIL(body.to(device), head.to(device), inner_lr=config.inner_lr,
                outer_lr=config.outer_lr, inner_steps=config.inner_steps,
                freeze_body=config.freeze_body, first_order=config.first_order,
                body_lr_multipliers=body_lr_multipliers(config, body),
                warmup_steps=config.warmup_steps, backend=config.backend,
                precision=config.precision, compile=config.compile)
    return anil


def train_sampler(config: Config, device) -> TaskSampler:
    images = load_split(config.protocol, "train", config.image_size, config.data_root, device)
    return TaskSampler(images, config.ways, config.shots, config.queries, config.meta_batch,
                       rotations=config.rotations, seed=config.seed, num_tasks=config.tasks)


def test_sampler(config: Config, device, tasks: int, batch: int = 50) -> TaskSampler:
    """A fixed pool of `tasks` test tasks: the same tasks for every scenario of one seed."""
    images = load_split(config.protocol, "test", config.image_size, config.data_root, device)
    return TaskSampler(images, config.ways, config.shots, config.queries, min(batch, tasks),
                       rotations=config.rotations, seed=10_000 + config.seed, num_tasks=tasks)


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
            "ci95": ci_a, "gain": mean_a - mean_b, "tasks": tasks, "bn_mode": bn_mode,
            "per_task_after": after_t.tolist()}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a killed process leaves the previous checkpoint intact


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"checkpoint: no checkpoint file at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"checkpoint: {path} is unreadable ({exc})") from exc


def train(config: Config, out_dir, resume: bool = False, progress: bool = True,
          evaluate_at_end: bool = True) -> dict:
    """Meta-train one scenario into `out_dir`; return its summary (also results.json).

    Under torchrun (torch.distributed initialised) every rank runs this with the same
    config: ranks share each meta-batch's tasks, rank 0 writes the files (distributed.py)."""
    validate_config(config)
    info = distributed.current()
    if info.active and config.meta_batch < info.world_size:
        raise ValueError(f"meta_batch ({config.meta_batch}) must be at least the number of "
                         f"ranks ({info.world_size})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(distributed.rank_device(info, config.device))
    anil = build_anil(config, device)
    sampler = train_sampler(config, device)
    step, elapsed = 0, 0.0
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        stored = ckpt["config"]
        differ = {k for k, v in config.to_dict().items()
                  if k not in RESUMABLE_CHANGES and stored.get(k) != v}
        if differ:
            raise ValueError(f"resume: the checkpoint in {out} was made with other settings "
                             f"({', '.join(sorted(differ))}); use another --out or the same settings")
        anil.load_state(ckpt["anil"])
        sampler.load_state_dict(ckpt["sampler"])
        _set_rng_state(ckpt["rng"])
        step, elapsed = ckpt["step"], ckpt["elapsed_s"]
        if info.is_main:
            _truncate_metrics(out / METRICS, step)
    elif info.is_main and (out / METRICS).exists():
        (out / METRICS).unlink()
    distributed.barrier()  # nobody starts before rank 0 has tidied the run folder
    total = config.total_meta_steps
    if info.is_main:
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))

    def checkpoint():
        distributed.average_running_stats(anil.body)  # one set of BatchNorm statistics
        if info.is_main:
            _atomic_save({"format": 1, "config": config.to_dict(), "anil": anil.state(),
                          "sampler": sampler.state_dict(), "rng": _rng_state(), "step": step,
                          "elapsed_s": elapsed, "world_size": info.world_size}, ckpt_path)

    pending = []  # (step, loss, accuracy) tensors, read back every log_every steps
    reset_peak_memory(device)
    bar = tqdm(total=total, initial=step, desc=f"train {config.scenario}", unit="it",
               disable=not (progress and info.is_main), dynamic_ncols=True)
    metrics_file = open(out / METRICS, "a") if info.is_main else None

    def flush():
        if not pending:
            return
        values = torch.stack([torch.stack([p[1], p[2]]) for p in pending]).tolist()  # one sync
        for (s, _, _), (loss, acc) in zip(pending, values):
            if not math.isfinite(loss):
                if metrics_file:
                    metrics_file.close()
                kept = (f"the last good checkpoint ({ckpt_path}, step {step_of_checkpoint[0]}) "
                        f"is kept" if step_of_checkpoint[0] else "no checkpoint was written yet")
                raise TrainingDiverged(
                    f"the meta-loss became {loss} at step {s}; training stopped and {kept}. "
                    f"Lower --outer-lr or --inner-lr, then resume or restart (on the fused "
                    f"CUDA path, labels outside 0..ways-1 also give a NaN loss)")
            if metrics_file:
                metrics_file.write(json.dumps({"step": s, "loss": loss, "accuracy": acc,
                                               "elapsed_s": round(elapsed, 4),
                                               "it_s": round(s / elapsed, 3) if elapsed else None}) + "\n")
        if metrics_file:
            metrics_file.flush()
        bar.set_postfix(loss=f"{values[-1][0]:.3f}", acc=f"{values[-1][1]:.3f}")
        pending.clear()

    step_of_checkpoint = [step]
    base_elapsed, loop_start = elapsed, time.perf_counter()
    share = distributed.shard(config.meta_batch, info)
    all_reduce = distributed.gradient_all_reduce(anil.parameters()) if info.active else None
    runner = MetaStepRunner(anil, capture=config.capture, total_tasks=config.meta_batch,
                            all_reduce=all_reduce)
    start_step = step
    with GPUMonitor(device) as monitor:
        while step < total:
            # every rank draws the same indices and materialises only its share
            batch = sampler.materialise(sampler.next_indices()[share])
            result = runner(batch)
            step += 1
            elapsed = base_elapsed + time.perf_counter() - loop_start
            pending.append((step, result["loss"], result["accuracy"]))
            bar.update(1)
            if step % config.log_every == 0 or step % config.checkpoint_every == 0 or step == total:
                flush()
            if step % config.checkpoint_every == 0 or step == total:
                checkpoint()
                step_of_checkpoint[0] = step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = base_elapsed + time.perf_counter() - loop_start
    session_s = time.perf_counter() - loop_start
    bar.close()
    if metrics_file:
        metrics_file.close()
    rank_it_s = distributed.gather_values((step - start_step) / session_s if session_s else 0.0)
    counts = parameter_counts(anil)
    summary = {"scenario": config.scenario, "model": config.model, "notes": config.notes,
               "meta_steps": total, "train_time_s": elapsed,
               "it_s": total / elapsed if elapsed else None,
               "world_size": info.world_size, "per_rank_it_s": rank_it_s,
               "gpu_utilization": monitor.average_utilization, **peak_memory(device),
               "device": str(device), **counts,
               "training_tasks": training_tasks(config),
               "parameters_per_training_task": counts["trainable_parameters"] / training_tasks(config),
               "param_groups": [{k: v for k, v in g.items() if k != "names"}
                                for g in anil.param_groups_report]}
    distributed.barrier()
    summary.update(loss_summary(out / METRICS))
    if evaluate_at_end:
        test = test_sampler(config, device, config.test_tasks)
        summary["evaluation"] = evaluate(anil, test, config.test_tasks, config.bn_mode,
                                         config.eval_inner_steps)
        summary["evaluation"].pop("per_task_after")
    if info.is_main:
        (out / RESULTS).write_text(json.dumps(summary, indent=1))
    return summary


def training_tasks(config: Config) -> int:
    """Distinct training tasks a run sees: its pool, or every task it draws (endless)."""
    drawn = config.total_meta_steps * config.meta_batch
    return min(config.tasks, drawn) if config.tasks else drawn


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines logged after the checkpoint a run resumes from."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))


def loss_summary(path: Path) -> dict:
    losses = [json.loads(ln)["loss"] for ln in Path(path).read_text().splitlines() if ln]
    if not losses:
        return {"initial_loss": None, "final_loss": None, "min_loss": None}
    return {"initial_loss": losses[0], "final_loss": losses[-1], "min_loss": min(losses)}


def parameter_counts(anil: ANIL) -> dict:
    from .batchnorm import batchnorm_layers
    bn = sum(p.numel() for m in batchnorm_layers(anil.body) for p in m.parameters(recurse=False))
    body = models.count_parameters(anil.body)
    head = models.count_parameters(anil.head)
    trainable = sum(g["parameters"] for g in anil.param_groups_report)
    return {"total_parameters": body + head, "trainable_parameters": trainable,
            "body_parameters": body, "head_parameters": head, "batchnorm_parameters": bn}


def evaluate_checkpoint(path, tasks: int = 1000, bn_mode: str = "transductive",
                        device: str = "auto", progress: bool = True) -> dict:
    ckpt = load_checkpoint(path)
    fields = {k: v for k, v in ckpt["config"].items()}
    config = Config(**fields)
    config.device = device
    dev = resolve_device(distributed.rank_device(distributed.current(), device))
    anil = build_anil(config, dev)
    anil.load_state(ckpt["anil"])
    result = evaluate(anil, test_sampler(config, dev, tasks), tasks, bn_mode,
                      config.eval_inner_steps, progress=progress)
    result.pop("per_task_after")
    result.update({"scenario": config.scenario, "model": config.model, "step": ckpt["step"]})
    return result
