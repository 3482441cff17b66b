"""The summary of a training run, results.json's training part (the test's part comes from
evaluation.score_selected)."""
from __future__ import annotations

from anil_fast import distributed
from anil_fast.training.optim import parameter_counts


def run_summary(run, session_steps: int) -> dict:
    """A run's facts for results.json (training.run.TrainingRun `run`): steps, time, speed (this session's
    `session_steps` over its training seconds), precision, parameters and their groups,
    resumes that changed settings, validation."""
    config, anil = run.config, run.anil
    session_it_s = session_steps / run.elapsed if run.elapsed else 0.0
    rank_it_s = distributed.gather_values(session_it_s)
    counts = parameter_counts(anil, run.optimizer)
    tasks = config.training_tasks(run.step)
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
            "resumes_with_changes": run.history, "loss_spike_rollbacks": run.rollbacks,
            "validation": {"records": run.val_records, "best": run.best} if config.validates else None}
