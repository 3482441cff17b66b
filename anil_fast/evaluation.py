"""Evaluation, scoring only: accuracy before and after adaptation over many tasks with 95%
confidence intervals and the inner loop's gain (data-parallel under torchrun), the test of a
run's selected checkpoint (best validation or last weights), and the evaluation of a
checkpoint file (which runs/load.py loads)."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from anil_fast import distributed
from anil_fast.config import BN_MODES, EVAL_SPLITS, MAX_TASKS, Config, describe_model
from anil_fast.data import TaskSampler
from anil_fast.data.augment import check_shift, mean_over_copies, with_shifted_copies
from anil_fast.errors import InputError, is_int
from anil_fast.metrics import mean_ci95
from anil_fast.models.anil import ANIL
from anil_fast.runs.build import load_model_state, own_rng, task_sampler
from anil_fast.runs.folder import load_checkpoint
from anil_fast.runs.load import load_run

__all__ = ["evaluate", "score_selected", "evaluate_checkpoint"]


def evaluate(anil: ANIL, sampler: TaskSampler, tasks: int, bn_mode: str = "transductive",
             inner_steps: int | None = None, progress: bool = False,
             test_shifts: int = 0) -> dict:
    """Mean query accuracy before and after adaptation over `tasks` tasks, with 95% CIs.
    Under torch.distributed each rank adapts its share of every batch and the per-task
    accuracies are gathered in task order: the same numbers as one process. `test_shifts`:
    test-time augmentation, every image also at each whole-pixel shift within that many
    pixels (FewShotClassifier's; 0: none)."""
    check_shift("test_shifts", test_shifts, min(sampler.data.image_shape[-2:]))
    info = distributed.current()
    distributed.average_running_stats(anil.body)
    before, after = [], []
    bar = tqdm(total=tasks, desc="eval", unit="task", disable=not (progress and info.is_main),
               leave=False)
    for indices in sampler.evaluation_indices(tasks):  # a pool: the same tasks every time
        count = indices.characters.shape[0]
        share = distributed.shard(count, info)
        if share.stop > share.start:
            per_before, per_after = _accuracies(anil, sampler.materialise(indices[share]),
                                                inner_steps, bn_mode, test_shifts, sampler.ways)
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
            "bn_mode": bn_mode, "test_shifts": test_shifts, "per_task_after": after_t.tolist()}


def _accuracies(anil: ANIL, batch, inner_steps, bn_mode: str, test_shifts: int, ways: int):
    """Per-task query accuracy [T] before and after adaptation of `ways`-way tasks (the head's
    first rows when fewer than its outputs); with test_shifts, of the scores averaged over
    each image's shifted copies, a few tasks at a time (each task holds (2m+1)^2 times the
    images)."""
    if not test_shifts:
        result = anil.evaluate(batch, inner_steps, bn_mode, ways)
        return result["per_task_before"], result["per_task_after"]
    before, after = [], []
    chunk = max(1, 50 // (2 * test_shifts + 1) ** 2)
    for start in range(0, batch.num_tasks, chunk):
        part = batch[start:start + chunk]
        shifted, copies = with_shifted_copies(part, test_shifts)
        logits = anil.adapted_logits(shifted, inner_steps, bn_mode, ways)
        for out, scores in zip((before, after), logits):
            predicted = mean_over_copies(scores, copies).argmax(-1)
            out.append((predicted == part.query_y).float().mean(1).cpu())
    return torch.cat(before), torch.cat(after)


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



def evaluate_checkpoint(path, tasks: int = 1000, bn_mode: str | None = None,
                        device: str = "auto", progress: bool = True,
                        weights: str | None = None, test_shifts: int = 0,
                        split: str = "test") -> dict:
    """Evaluate a run's checkpoint on `tasks` tasks of its test split (the caller's RNG is
    left as it was): the weights `checkpoint_file` picks, with the run's own BatchNorm mode
    unless `bn_mode`; test_shifts: test-time augmentation (evaluate's). split="validation"
    scores the run's validation classes instead, the held-out data on which to choose
    test-time settings (bn_mode, test_shifts) before the test split sees them."""
    if not is_int(tasks) or not 1 <= tasks <= MAX_TASKS:
        raise InputError(f"tasks must be an int in 1..{MAX_TASKS:,}, got {tasks!r}")
    if bn_mode is not None and bn_mode not in BN_MODES:
        raise InputError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    if split not in EVAL_SPLITS:
        raise InputError(f"split must be one of {EVAL_SPLITS}, got {split!r}")
    run = load_run(path, weights, device)
    config = run.settings.config
    check_shift("test_shifts", test_shifts, config.image_size)
    if split == "validation" and config.dataset == "omniglot" and not config.validation:
        raise InputError("split='validation': this run held no Omniglot characters out of "
                         "training (its validation is 0), so it has no validation split")
    with own_rng(run.settings.device):
        # a folder run's recorded split (its classes as it drew them), else today's
        sampler = task_sampler(config, split, run.settings.device, tasks,
                               classes=run.checkpoint.get("classes"))
        result = evaluate(run.anil, sampler, tasks, bn_mode or config.bn_mode,
                          config.eval_inner_steps, progress=progress, test_shifts=test_shifts)
    result.pop("per_task_after")
    result.update({"split": split, "scenario": config.scenario, "model": config.model,
                   "model_settings": describe_model(config),
                   "step": run.checkpoint["step"], "checkpoint": str(run.file),
                   "weights": run.weights})
    return result
