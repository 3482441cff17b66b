"""Run several scenarios and write the comparison: Markdown, CSV and JSON tables and two PNG
plots (loss curves of all scenarios; accuracy before/after with 95% CIs)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from anil_fast import distributed
from anil_fast.errors import InputError
from anil_fast.runs.folder import METRICS, read_metrics
from anil_fast.config import scenario_config
from anil_fast.measure.table import markdown_table
from anil_fast.runs.settings import resolve
from anil_fast.training.run import train

COLUMNS = [
    ("scenario", "scenario"), ("model", "body"), ("total_parameters", "total params"),
    ("trainable_parameters", "trainable params"), ("body_parameters", "body params"),
    ("head_parameters", "head params"), ("batchnorm_parameters", "BatchNorm params"),
    ("initial_loss", "initial loss"), ("final_loss", "final loss"), ("min_loss", "min loss"),
    ("train_time_s", "train time (s)"), ("it_s", "it/s"), ("world_size", "ranks"),
    ("per_rank_it_s", "it/s per rank"), ("gpu_utilization", "GPU util (%)"),
    ("peak_memory", "peak memory"), ("accuracy_before", "acc before"),
    ("accuracy_after", "acc after"), ("ci95", "±CI95"), ("gain", "gain"),
    ("parameters_per_training_task", "params / training task"),
]


def row_of(summary: dict) -> dict:
    ev = summary.get("evaluation", {})
    if summary.get("peak_gpu_memory_bytes") is not None:
        peak = f"{summary['peak_gpu_memory_bytes'] / 2**30:.2f} GiB GPU"
    else:
        peak = f"{summary['peak_rss_bytes'] / 2**30:.2f} GiB RSS"
    row = {k: summary.get(k) for k, _ in COLUMNS}
    row["per_rank_it_s"] = " / ".join(f"{v:.3g}" for v in summary.get("per_rank_it_s", []))
    row.update({"peak_memory": peak, "accuracy_before": ev.get("accuracy_before"),
                "accuracy_after": ev.get("accuracy_after"), "ci95": ev.get("ci95_after", ev.get("ci95")),
                "gain": ev.get("gain")})
    return row


def write_tables(rows: list[dict], out: Path) -> None:
    (out / "comparison.json").write_text(json.dumps(rows, indent=1))
    with open(out / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k, _ in COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    lines = markdown_table(rows, COLUMNS, digits=4)
    (out / "comparison.md").write_text("\n".join(lines) + "\n")


def write_plots(run_dirs: dict, rows: list[dict], out: Path) -> None:
    from matplotlib.figure import Figure  # figures of their own: no global backend switch

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for name, run_dir in run_dirs.items():
        records = read_metrics(Path(run_dir) / METRICS)
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=name)
    ax.set_xlabel("meta-step")
    ax.set_ylabel("meta-training query loss")
    ax.set_title("Loss curves")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    names = [r["scenario"] for r in rows]
    xs = range(len(rows))
    before = [100 * (r["accuracy_before"] or 0) for r in rows]
    after = [100 * (r["accuracy_after"] or 0) for r in rows]
    ci = [100 * (r["ci95"] or 0) for r in rows]
    ax.bar([x - 0.2 for x in xs], before, width=0.4, label="before adaptation")
    ax.bar([x + 0.2 for x in xs], after, width=0.4, yerr=ci, capsize=4, label="after adaptation")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Test accuracy with 95% CI")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)


def compare(scenarios: list[str], out_dir, overrides: dict | None = None,
            progress: bool = True, resume: bool = False, overwrite: bool = False,
            tensorboard: bool = False) -> list[dict]:
    """Train each scenario into out_dir/<scenario> (resume/overwrite as for train; TensorBoard
    scalars in its tensorboard/ with `tensorboard`), then write the tables and plots (rank 0
    only under torchrun)."""
    out = Path(out_dir)
    if not scenarios:
        raise InputError("scenarios: name at least one scenario (e.g. --scenarios s1,s2)")
    repeated = sorted({name for name in scenarios if list(scenarios).count(name) > 1})
    if repeated:
        raise InputError(f"scenarios: {', '.join(repeated)} named more than once (each trains "
                         f"into its own folder of --out)")
    # every run's settings resolved before the first trains: a bad one fails early
    runs = [resolve(scenario_config(name, **(overrides or {}))) for name in scenarios]
    rows, run_dirs = [], {}
    for settings in runs:
        run_dir = out / settings.config.scenario
        summary = train(settings, run_dir, progress=progress, resume=resume, overwrite=overwrite,
                        tensorboard=run_dir / "tensorboard" if tensorboard else None)
        rows.append(row_of(summary))
        run_dirs[settings.config.scenario] = run_dir
    if distributed.current().is_main:
        write_tables(rows, out)
        write_plots(run_dirs, rows, out)
    return rows
