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
import json
from importlib.resources import files
from pathlib import Path

from . import distributed
from .errors import InputError
from .runfolder import RunFolder
from .scenarios import SEED_FAMILY, STANDARD_FAMILY, scenario_config
from .trainer import train

SUITES = {"paper": STANDARD_FAMILY, "seed": SEED_FAMILY}
# Tiny settings that keep every code path of a suite alive in seconds on a CPU.
SMOKE = {
    "paper": dict(time_budget=2.0, meta_batch=2, val_tasks=6, val_every_s=0.5, test_tasks=10,
                  checkpoint_every=5, log_every=5),
    "seed": dict(image_size=28, meta_steps=2, meta_batch=2, queries=2, test_tasks=6,
                 inner_steps=1, tasks=None, checkpoint_every=2),
}


def references() -> dict:
    return json.loads((files("anil_fast.data") / "references.json").read_text())


def suite_configs(suite: str, budget_s: float | None = 300.0, device: str = "auto",
                  smoke: bool = False, overrides: dict | None = None) -> list:
    if suite not in SUITES:
        raise InputError(f"suite must be one of {sorted(SUITES)}, got {suite!r}")
    if budget_s is not None and not budget_s > 0:
        raise InputError(f"budget_s must be a positive number of seconds, got {budget_s!r}")
    values = dict(device=device)
    if suite == "paper" and budget_s is not None:
        values["time_budget"] = float(budget_s)
    if smoke:
        values.update(SMOKE[suite])
    values.update(overrides or {})
    return [scenario_config(name, **values) for name in SUITES[suite]]


def row_of(suite: str, summary: dict, config, smoke: bool, table: dict) -> dict:
    ev = summary["evaluation"]
    ours = 100 * ev["accuracy_after"]
    refs = table[suite].get(config.scenario, [])
    first = refs[0] if refs else None
    return {
        "suite": suite, "preset": config.scenario, "run": "smoke" if smoke else "full",
        "ways": config.ways, "shots": config.shots, "body": summary["model"],
        "accuracy": round(ours, 2), "ci95": round(100 * ev["ci95_after"], 2),
        "test_tasks": ev["tasks"], "bn_mode": ev["bn_mode"], "selected": summary.get("selected"),
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


COLUMNS = [("preset", "preset"), ("body", "body"), ("accuracy", "ours (%)"), ("ci95", "± CI95"),
           ("reference", "reference (%)"), ("gap_points", "gap (points)"),
           ("bn_mode", "BatchNorm"), ("train_time_s", "train time (s)"), ("it_s", "it/s"),
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
    lines += ["| " + " | ".join(label for _, label in COLUMNS) + " |",
              "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join("n/a" if r[k] is None else str(r[k]) for k, _ in COLUMNS) + " |"
              for r in rows]
    sources = sorted({r["reference_source"] for r in rows if r["reference_source"]})
    lines += ["", "References: " + "; ".join(sources) + "." if sources else ""]
    (out / "reproduce.md").write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict], summaries: list[dict], out: Path) -> None:
    """Accuracy against training seconds: validation curves (paper) or before/after (seed),
    the test accuracy of the selected checkpoint as a dot, the reference as a dotted line."""
    from matplotlib.figure import Figure  # a figure of its own: no global backend switch

    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for i, (row, summary) in enumerate(zip(rows, summaries)):
        color = f"C{i}"
        validation = summary.get("validation")
        if validation and validation["records"]:
            recs = validation["records"]
            ax.plot([r["elapsed_s"] for r in recs], [100 * r["accuracy"] for r in recs],
                    color=color, label=f"{row['preset']} (validation)")
        else:
            before = 100 * summary["evaluation"]["accuracy_before"]
            ax.plot([0, row["train_time_s"]], [before, row["accuracy"]], color=color,
                    linestyle="--", label=f"{row['preset']} (test, before/after)")
        best = validation["best"] if validation else None
        selected_at = best["elapsed_s"] if best else row["train_time_s"]
        ax.errorbar([selected_at], [row["accuracy"]], yerr=[row["ci95"]], color=color,
                    marker="o", capsize=3)
        if row["reference_accuracy"] is not None:
            ax.axhline(row["reference_accuracy"], color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("accuracy after adaptation (%)")
    smoke = any(r["run"] == "smoke" for r in rows)
    ax.set_title(("SMOKE RUN - " if smoke else "") + "accuracy against training time "
                 "(dot: test, dotted: reference)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_time.png", dpi=120)


def _check_report_is_ours(report: Path, suite: str, overwrite: bool) -> None:
    """One folder, one suite: another suite's report there is not replaced (unless
    --overwrite), and neither is a reproduce.json that anil-fast did not write."""
    if not report.exists():
        return
    try:
        rows = json.loads(report.read_text())
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
              tensorboard: bool = False) -> list[dict]:
    """Train every preset of the suite into out_dir/<preset> (TensorBoard scalars in its
    tensorboard/ with `tensorboard`) and write the comparison."""
    configs = suite_configs(suite, budget_s, device, smoke, overrides)  # fail early
    out = Path(out_dir)
    _check_report_is_ours(out / "reproduce.json", suite, overwrite)
    table = references()
    rows, summaries = [], []
    for config in configs:
        run_dir = out / config.scenario
        summary = train(config, run_dir, progress=progress, resume=resume, overwrite=overwrite,
                        tensorboard=run_dir / "tensorboard" if tensorboard else None)
        summaries.append(summary)
        rows.append(row_of(suite, summary, config, smoke, table))
    if distributed.current().is_main:
        write_tables(rows, out)
        write_plot(rows, summaries, out)
    return rows
