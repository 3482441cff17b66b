"""`anil-fast reproduce`: our numbers beside the published (or the seed's) ones.

- suite "paper": the standard Omniglot protocol (std-5w1s, std-5w5s, std-20w1s, std-20w5s),
  each trained within a wall-clock budget with validation-based checkpoint selection, tested
  on 1,000 tasks; references from the MAML and ANIL papers;
- suite "seed": the five scenarios s1-s5 at the seed's settings (2,000 training tasks, 100
  test tasks); references from the seed's own table.
Writes reproduce.{md,csv,json} (accuracy ± CI95, BatchNorm mode, training time, it/s,
device, reference and gap in points per row) and accuracy_vs_time.png. Reference numbers
live in data/references.json with their sources. `smoke=True` runs tiny budgets (CI keeps the
command working on a CPU); its numbers are labelled as smoke and mean nothing.
"""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

from anil_fast import distributed
from anil_fast.data.references import references
from anil_fast.env import parse_json
from anil_fast.errors import InputError, is_int
from anil_fast.runs.folder import RunFolder
from anil_fast.config import SEED_FAMILY, STANDARD_FAMILY, scenario_config
from anil_fast.measure.table import markdown_table
from anil_fast.runs.settings import resolve
from anil_fast.training.run import train

SUITES = {"paper": STANDARD_FAMILY, "seed": SEED_FAMILY}
# Tiny settings that keep every code path of a suite alive in seconds on a CPU.
SMOKE = {
    "paper": dict(time_budget=2.0, meta_batch=2, val_tasks=6, val_every_s=0.5, test_tasks=10,
                  checkpoint_every=5, log_every=5),
    "seed": dict(image_size=28, meta_steps=2, meta_batch=2, queries=2, test_tasks=6,
                 inner_steps=1, tasks=None, checkpoint_every=2),
}


def suite_configs(suite: str, budget_s: float | None = 300.0, device: str = "auto",
                  smoke: bool = False, overrides: dict | None = None, presets=None) -> list:
    """The configs of a suite's presets (all, or those named in `presets`, in suite order)."""
    if suite not in SUITES:
        raise InputError(f"suite must be one of {sorted(SUITES)}, got {suite!r}")
    names = list(SUITES[suite])
    if presets is not None:
        unknown = [p for p in presets if p not in names]
        if unknown or not presets:
            raise InputError(f"presets: the {suite} suite holds {', '.join(names)}; got "
                             f"{', '.join(presets) or 'none'}")
        names = [n for n in names if n in presets]
    if budget_s is not None and not budget_s > 0:
        raise InputError(f"budget_s must be a positive number of seconds, got {budget_s!r}")
    values = dict(device=device)
    if suite == "paper" and budget_s is not None:
        values["time_budget"] = float(budget_s)
    if smoke:
        values.update(SMOKE[suite])
    values.update(overrides or {})
    return [scenario_config(name, **values) for name in names]


def row_of(suite: str, summary: dict, config, smoke: bool, table: dict) -> dict:
    ev = summary["evaluation"]
    ours = 100 * ev["accuracy_after"]
    refs = table[suite].get(config.scenario, [])
    first = refs[0] if refs else None
    return {
        "suite": suite, "preset": config.scenario, "run": "smoke" if smoke else "full",
        "ways": config.test_ways, "shots": config.shots, "body": summary["model"],
        # what it trained on, where that differs from its test tasks (config.PROTO_RECIPE)
        "trained_on": f"{config.ways}-way x {config.meta_batch}",
        "accuracy": round(ours, 2), "std": None, "seeds": 1, "seed": config.seed,
        "ci95": round(100 * ev["ci95_after"], 2),
        "before": round(100 * ev["accuracy_before"], 2), "gain": round(100 * ev["gain"], 2),
        "test_tasks": ev["tasks"], "bn_mode": ev["bn_mode"], "head_init": config.head_init,
        "feature_norm": config.feature_norm, "inner_lr": config.inner_lr,
        "outer_lr": config.outer_lr,
        "order": "first" if config.first_order else "second", "precision": summary["precision"], "selected": summary.get("selected"),
        "train_time_s": round(summary["train_time_s"], 1),
        "it_s": None if summary["it_s"] is None else round(summary["it_s"], 3),
        "meta_steps": summary["meta_steps"], "device": summary["device"],
        "reference": None if first is None else f"{first['method']} {first['accuracy']}"
                     + (f" ± {first['ci95']}" if "ci95" in first else ""),
        "reference_accuracy": None if first is None else first["accuracy"],
        "gap_points": None if first is None else round(ours - first["accuracy"], 2),
        "reference_source": None if first is None else table["sources"][first["source"]],
        "all_references": refs,
    }


def combine_seeds(rows: list[dict]) -> dict:
    """One row of several seeds' rows: accuracy the mean over seeds with its standard
    deviation (ddof=1), CI95 the mean of the seeds' own, each seed's numbers kept."""
    first = dict(rows[0])
    accuracies = np.array([r["accuracy"] for r in rows], dtype=np.float64)
    mean = float(accuracies.mean())
    first.update(
        accuracy=round(mean, 2), std=round(float(accuracies.std(ddof=1)), 2), seeds=len(rows),
        ci95=round(float(np.mean([r["ci95"] for r in rows])), 2),
        before=round(float(np.mean([r["before"] for r in rows])), 2),
        gain=round(float(np.mean([r["gain"] for r in rows])), 2),
        train_time_s=round(float(np.mean([r["train_time_s"] for r in rows])), 1),
        it_s=None if any(r["it_s"] is None for r in rows) else round(float(np.mean([r["it_s"] for r in rows])), 3),
        meta_steps=round(float(np.mean([r["meta_steps"] for r in rows])), 1),
        gap_points=None if first["reference_accuracy"] is None else round(mean - first["reference_accuracy"], 2),
        selected="per seed (see per_seed)",
        per_seed=[{k: r[k] for k in ("seed", "accuracy", "ci95", "before", "gain",
                                      "train_time_s", "it_s", "meta_steps", "selected")}
                  for r in rows])
    return first


COLUMNS = [("preset", "preset"), ("body", "body"), ("accuracy", "ours (%)"),
           ("std", "± std over seeds"), ("seeds", "seeds"), ("ci95", "± CI95"),
           ("before", "before adaptation (%)"), ("gain", "inner-loop gain (points)"),
           ("reference", "reference (%)"), ("gap_points", "gap (points)"),
           ("bn_mode", "BatchNorm"), ("trained_on", "training tasks a step"),
           ("head_init", "head init"),
           ("feature_norm", "head's features"), ("inner_lr", "inner lr"), ("outer_lr", "outer lr"),
           ("order", "order"),
           ("precision", "precision"),
           ("train_time_s", "train time (s)"), ("it_s", "it/s"),
           ("meta_steps", "meta-steps"), ("test_tasks", "test tasks"), ("device", "device"),
           ("selected", "checkpoint"), ("run", "run")]


def write_tables(rows: list[dict], out: Path) -> None:
    folder = RunFolder(out)
    folder.write_json("reproduce.json", rows)
    flat = [{k: r[k] for k, _ in COLUMNS} | {"reference_source": r["reference_source"]}
            for r in rows]
    with open(out / "reproduce.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*(k for k, _ in COLUMNS), "reference_source"])
        writer.writeheader()
        writer.writerows(flat)
    lines = []
    if any(r["run"] == "smoke" for r in rows):
        lines += ["**Smoke run**: tiny budgets that only check the command works; these numbers "
                  "are not results.", ""]
    lines += markdown_table(rows, COLUMNS, digits=12)  # the rows' numbers are rounded already
    sources = sorted({r["reference_source"] for r in rows if r["reference_source"]})
    lines += ["", "References: " + "; ".join(sources) + "." if sources else ""]
    (out / "reproduce.md").write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict], summaries: list[list[dict]], out: Path) -> None:
    """Accuracy against training seconds: each seed's validation curve (paper) or before/after
    line (seed suite), the test accuracy as a dot (error bar: the std over seeds, or the
    CI95 of one seed), the reference as a dotted line."""
    from matplotlib.figure import Figure  # a figure of its own: no global backend switch

    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for i, (row, runs) in enumerate(zip(rows, summaries)):
        color, selected_at = f"C{i}", []
        for k, summary in enumerate(runs):
            label = None if k else row["preset"]
            validation = summary.get("validation")
            if validation and validation["records"]:
                recs = validation["records"]
                ax.plot([r["elapsed_s"] for r in recs], [100 * r["accuracy"] for r in recs],
                        color=color, linewidth=1 if len(runs) > 1 else 1.5,
                        label=label and f"{label} (validation)")
            else:
                ax.plot([0, summary["train_time_s"]],
                        [100 * summary["evaluation"]["accuracy_before"],
                         100 * summary["evaluation"]["accuracy_after"]], color=color,
                        linestyle="--", label=label and f"{label} (test, before/after)")
            best = validation["best"] if validation else None
            selected_at.append(best["elapsed_s"] if best else summary["train_time_s"])
        spread = row["std"] if row.get("seeds", 1) > 1 else row["ci95"]
        ax.errorbar([sum(selected_at) / len(selected_at)], [row["accuracy"]], yerr=[spread],
                    color=color, marker="o", capsize=3)
        if row["reference_accuracy"] is not None:
            ax.axhline(row["reference_accuracy"], color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("accuracy after adaptation (%)")
    smoke = any(r["run"] == "smoke" for r in rows)
    seeds = max(r.get("seeds", 1) for r in rows)
    ax.set_title(("SMOKE RUN - " if smoke else "") + "accuracy against training time (dot: "
                 + (f"test, mean ± std over {seeds} seeds" if seeds > 1 else "test ± CI95")
                 + "; dotted: reference)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_time.png", dpi=120)


def _check_report_is_ours(report: Path, suite: str, overwrite: bool) -> None:
    """One folder, one suite: another suite's report there is not replaced (unless
    --overwrite), and neither is a reproduce.json that anil-fast did not write."""
    if not report.exists():
        return
    try:
        rows = parse_json(report.read_text())
        suites = {r["suite"] for r in rows}
    except (OSError, ValueError, TypeError, KeyError):
        raise InputError(f"--out: {report} is not a report anil-fast wrote; use another --out") from None
    if suites - {suite} and not overwrite:
        raise InputError(f"--out: {report.parent} holds the report of the "
                         f"{', '.join(sorted(suites - {suite}))} suite; use another --out for the "
                         f"{suite} suite (or --overwrite to replace it)")


def reproduce(suite: str, out_dir, budget_s: float | None = 300.0, device: str = "auto",
              smoke: bool = False, progress: bool = True, resume: bool = False,
              overwrite: bool = False, overrides: dict | None = None,
              tensorboard: bool = False, seeds: int = 1, presets=None) -> list[dict]:
    """Train every preset of the suite (or those in `presets`) into out_dir/<preset> (with
    `seeds` > 1: out_dir/<preset>/seed<k> for the config's seed and the next ones, each row
    the mean ± std over seeds) and write the comparison. TensorBoard scalars in each run's
    tensorboard/ with `tensorboard`."""
    if not is_int(seeds) or not 1 <= seeds <= 100:
        raise InputError(f"seeds must be an int in 1..100, got {seeds!r}")
    configs = suite_configs(suite, budget_s, device, smoke, overrides, presets)
    # every run's settings resolved before the first trains: a bad one fails early
    runs = [[resolve(dataclasses.replace(c, seed=c.seed + k)) for k in range(seeds)]
            for c in configs]
    out = Path(out_dir)
    _check_report_is_ours(out / "reproduce.json", suite, overwrite)
    table = references()
    rows, summaries = [], []
    for seeded_runs in runs:
        seed_rows, seed_summaries = [], []
        for settings in seeded_runs:
            seeded = settings.config
            run_dir = out / seeded.scenario / (f"seed{seeded.seed}" if seeds > 1 else "")
            summary = train(settings, run_dir, progress=progress, resume=resume,
                            overwrite=overwrite,
                            tensorboard=run_dir / "tensorboard" if tensorboard else None)
            seed_summaries.append(summary)
            seed_rows.append(row_of(suite, summary, seeded, smoke, table))
        summaries.append(seed_summaries)
        rows.append(seed_rows[0] if seeds == 1 else combine_seeds(seed_rows))
    if distributed.current().is_main:
        write_tables(rows, out)
        write_plot(rows, summaries, out)
    return rows
