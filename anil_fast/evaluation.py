"""Evaluation: accuracy before and after adaptation over many tasks with 95% confidence
intervals (data-parallel under torchrun), the test of a run's selected checkpoint (best
validation or last weights), and the evaluation of a checkpoint file."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .anil import BN_MODES, ANIL
from .build import build_anil, load_model_state, own_rng, resolve_device, task_sampler
from .data import TaskSampler
from .errors import InputError, is_int
from .metrics import mean_ci95
from .runfolder import BEST, CHECKPOINT, load_checkpoint
from .scenarios import MAX_TASKS, Config, config_from_dict

__all__ = ["evaluate", "score_selected", "evaluate_checkpoint"]


def evaluate(anil: ANIL, sampler: TaskSampler, tasks: int, bn_mode: str = "transductive",
             inner_steps: int | None = None, progress: bool = False) -> dict:
    """Mean query accuracy before and after adaptation over `tasks` tasks, with 95% CIs.
    Under torch.distributed each rank adapts its share of every batch and the per-task
    accuracies are gathered in task order: the same numbers as one process."""
    info = distributed.current()
    distributed.average_running_stats(anil.body)
    before, after = [], []
    bar = tqdm(total=tasks, desc="eval", unit="task", disable=not (progress and info.is_main),
               leave=False)
    for indices in sampler.evaluation_indices(tasks):  # a pool: the same tasks every time
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
        bar.update(count)
    bar.close()
    before_t, after_t = torch.cat(before), torch.cat(after)
    mean_b, ci_b = mean_ci95(before_t.numpy())
    mean_a, ci_a = mean_ci95(after_t.numpy())
    # the inner loop's gain, with the CI of the paired per-task differences (the same tasks
    # scored before and after adaptation)
    _, ci_gain = mean_ci95((after_t - before_t).numpy())
    return {"accuracy_before": mean_b, "ci95_before": ci_b, "accuracy_after": mean_a,
            "ci95_after": ci_a, "gain": mean_a - mean_b, "ci95_gain": ci_gain, "tasks": tasks,
            "bn_mode": bn_mode, "per_task_after": after_t.tolist()}


def score_selected(anil: ANIL, config: Config, sampler: TaskSampler, step: int,
                  best: dict | None, best_path: Path) -> dict:
    """Test accuracy of the last weights (in `anil`, at `step`) and, with validation, of the
    best-validation checkpoint (`best`, its weights in `best_path`, loaded into `anil`):
    {"evaluation": selected, "evaluation_last": last, "selected": which}."""
    def test():
        result = evaluate(anil, sampler, config.test_tasks, config.bn_mode,
                          config.eval_inner_steps)
        result.pop("per_task_after")
        return result
    last = test()
    if not config.validates or best is None:
        return {"evaluation": last, "selected": f"last (step {step})"}
    out = {"evaluation_last": last,
           "selected": f"best validation (step {best['step']}, "
                       f"{100 * best['accuracy']:.2f}% on {config.val_tasks} tasks)"}
    if best["step"] == step:
        out["evaluation"] = last
    else:
        load_model_state(anil, load_checkpoint(best_path)["model"])
        out["evaluation"] = test()
    return out



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


def load_run_model(path, weights: str | None = None, device: str = "auto"):
    """(model with the checkpoint's weights, its config, the checkpoint, the file, which
    weights) of a run folder or checkpoint file (`checkpoint_file` picks the file). Built
    without downloading anything: the weights come from the checkpoint."""
    dev = resolve_device(distributed.rank_device(distributed.current(), device))
    file, which = checkpoint_file(path, weights)
    ckpt = load_checkpoint(file)
    # every recorded key and type checked; an earlier version's names in today's terms
    config = config_from_dict({**ckpt["config"], "device": device}, f"checkpoint: {file}")
    with own_rng(dev):  # building seeds the model's init: the caller's RNG is left as it was
        anil = build_anil(dataclasses.replace(config, pretrained=False), dev)
    lost = [k for k, v in ckpt["model"].items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if lost:
        raise InputError(f"checkpoint: {file}: its weights hold NaN or infinite values ("
                         f"{', '.join(lost[:3])}{' ...' if len(lost) > 3 else ''}); a diverged "
                         f"run's: nothing it predicts would mean anything")
    load_model_state(anil, ckpt["model"])
    return anil, config, ckpt, file, f"{which} (step {ckpt['step']})"


def evaluate_checkpoint(path, tasks: int = 1000, bn_mode: str | None = None,
                        device: str = "auto", progress: bool = True,
                        weights: str | None = None) -> dict:
    """Evaluate a run's checkpoint on `tasks` test tasks (the caller's RNG is left as it was):
    the weights `checkpoint_file` picks, with the run's own BatchNorm mode unless `bn_mode`."""
    if not is_int(tasks) or not 1 <= tasks <= MAX_TASKS:
        raise InputError(f"tasks must be an int in 1..{MAX_TASKS:,}, got {tasks!r}")
    if bn_mode is not None and bn_mode not in BN_MODES:
        raise InputError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    with own_rng(resolve_device(distributed.rank_device(distributed.current(), device))):
        anil, config, ckpt, file, which = load_run_model(path, weights, device)
        bn_mode = bn_mode or config.bn_mode
        dev = next(anil.parameters()).device
        # a folder run's recorded split (its test classes as it drew them), else today's
        sampler = task_sampler(config, "test", dev, tasks, classes=ckpt.get("classes"))
        result = evaluate(anil, sampler, tasks, bn_mode, config.eval_inner_steps,
                          progress=progress)
    result.pop("per_task_after")
    result.update({"scenario": config.scenario, "model": config.model, "step": ckpt["step"],
                   "checkpoint": str(file), "weights": which})
    return result
