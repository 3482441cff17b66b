"""The `anil-fast` command line: train, eval, predict, export, compare, reproduce, show-tasks,
bench, cache.

User errors (AnilFastError: bad settings, files, run folders; OSError: the disk, permissions)
print one line and exit 2; a diverged run exits 3; Ctrl-C prints one line and exits 130 (the
last checkpoint kept); anything else is a bug and keeps its traceback."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

# Only what the parser needs is imported here (the option lists, the errors): each command
# imports its own modules when it runs.
from anil_fast.config import (BENCH_CASES, BN_MODES, EVAL_SPLITS, PRESETS, describe_model,
                              scenario_config)
from anil_fast.errors import AnilFastError, InputError, Interrupted, TrainingDiverged


class BenchFailed(AnilFastError):
    """A bench variant disagreed with the reference or could not run (exit code 1)."""


# flag -> Config field, for every override the CLI offers
OVERRIDES = {
    "ways": int, "shots": int, "queries": int, "inner_lr": float, "outer_lr": float,
    "inner_steps": int, "meta_batch": int, "meta_steps": int, "tasks": int, "image_size": int,
    "model": str, "device": str, "seed": int, "backend": str, "test_tasks": int,
    "eval_inner_steps": int, "eval_ways": int, "warmup_steps": int, "multipliers": str, "protocol": str,
    "bn_mode": str, "checkpoint_every": int, "log_every": int, "precision": str,
    "data_root": str, "time_budget": float, "lr_schedule": str, "lr_floor": float,
    "validation": int, "val_tasks": int, "val_every": int, "val_every_s": float,
    "dataset": str, "data": str, "split_file": str, "channels": int, "hidden": int,
    "weights_file": str, "head_init": str, "feature_norm": str, "clip_grad_norm": float,
    "within_alphabet": float, "augment_shift": int,
    "spike_rollback": float,
}
FLAGS = ("first_order", "freeze_body", "pretrained", "rotations", "compile", "capture")
# the overrides `reproduce` takes, on top of every preset it trains (the rows name them)
REPRODUCE_OVERRIDES = ("head_init", "feature_norm", "bn_mode", "precision", "inner_lr", "outer_lr",
                       "inner_steps", "eval_inner_steps", "meta_batch", "queries", "seed",
                       "lr_schedule", "clip_grad_norm", "spike_rollback", "test_tasks",
                       "within_alphabet", "augment_shift")


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("overrides of the scenario's preset")
    for name, kind in OVERRIDES.items():
        group.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    for name in FLAGS:
        group.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                           default=None)
    group.add_argument("--second-order", dest="first_order", action="store_false")
    group.add_argument("--endless", action="store_true",
                       help="sample new tasks every step instead of a fixed pool")


def _overrides(args) -> dict:
    values = {name: getattr(args, name) for name in (*OVERRIDES, *FLAGS)}
    values = {k: v for k, v in values.items() if v is not None}
    if args.endless:
        values["tasks"] = None
        if args.meta_steps is None and args.time_budget is None:
            raise InputError("--endless needs --meta-steps or --time-budget")
    if args.tasks is not None and args.meta_steps is None:
        values["meta_steps"] = None  # one pass over the given pool
    return values


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("anil-fast")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "(not installed)"


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def printable_path(path) -> str:
    """A path as text that any terminal or JSON reader takes: bytes of a file name that are
    not UTF-8 shown as \\xNN escapes (not lone surrogates)."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anil-fast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"anil-fast {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_inspection_commands(sub)
    _add_bench_command(sub)
    _add_predict_command(sub)
    _add_export_command(sub)
    _add_cache_command(sub)
    return parser


def _add_run_commands(sub) -> None:
    """train and reproduce: commands that train into a run folder."""
    train = sub.add_parser("train", help="meta-train a scenario, then evaluate it")
    train.add_argument("--scenario", default=None, choices=sorted(PRESETS),
                       help="the preset to start from (default s2)")
    train.add_argument("--config", default=None,
                       help="a run's config.json: every setting from it, the flags on top")
    train.add_argument("--out", required=True, help="run folder (checkpoint, metrics, results)")
    train.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="start over in an --out that holds a run (deletes its run files)")
    train.add_argument("--no-progress", action="store_true")
    train.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                       help="write TensorBoard scalars to DIR (default: OUT/tensorboard); "
                            "needs pip install 'anil-fast[tensorboard]'")
    _add_overrides(train)

    rep = sub.add_parser("reproduce", help="our numbers beside the papers' (paper) or the "
                                           "seed's (seed), one table and one plot")
    rep.add_argument("--suite", required=True, choices=("paper", "seed"))
    rep.add_argument("--budget-s", type=float, default=300.0,
                     help="training seconds per preset (paper suite; default 300)")
    rep.add_argument("--device", default="auto")
    rep.add_argument("--out", required=True)
    rep.add_argument("--smoke", action="store_true",
                     help="tiny budgets that only check the command works (numbers are not results)")
    rep.add_argument("--resume", action="store_true")
    rep.add_argument("--overwrite", action="store_true")
    rep.add_argument("--no-progress", action="store_true")
    rep.add_argument("--tensorboard", action="store_true",
                     help="TensorBoard scalars in each preset's OUT/<preset>/tensorboard")
    rep.add_argument("--seeds", type=int, default=1,
                     help="train each preset with this many seeds (0, 1, ...): every row the "
                          "mean ± std over seeds, each seed's own numbers in the JSON")
    rep.add_argument("--presets", default=None,
                     help="comma-separated presets of the suite to run (default: all)")
    group = rep.add_argument_group("overrides of every preset (the table names head init, "
                                   "BatchNorm mode and precision)")
    for name in REPRODUCE_OVERRIDES:
        group.add_argument("--" + name.replace("_", "-"), type=OVERRIDES[name], default=None)


def _add_inspection_commands(sub) -> None:
    """show-tasks, eval and compare."""
    show = sub.add_parser("show-tasks", help="write a picture of sampled tasks (support above "
                                             "query, labels shown)")
    show.add_argument("--scenario", default="s2", choices=sorted(PRESETS))
    show.add_argument("--out", required=True, help="PNG file to write")
    show.add_argument("--tasks", dest="show_tasks", type=int, default=3, help="tasks to draw")
    show.add_argument("--split", default="train", choices=("train", "validation", "test"))
    for name in ("ways", "shots", "queries", "image_size", "seed"):
        show.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    show.add_argument("--data-root", default=None)
    show.add_argument("--data", default=None, help="a folder of class folders to show instead")
    show.add_argument("--dataset", default=None, help="omniglot, mini-imagenet, cifar-fs, fc100")
    show.add_argument("--split-file", default=None)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on test tasks")
    ev.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    ev.add_argument("--tasks", type=int, default=1000)
    ev.add_argument("--weights", choices=("best", "last"), default=None,
                    help="of a run folder: best.pt (the best-validation weights, the default "
                         "when the run has them) or checkpoint.pt (the last weights)")
    ev.add_argument("--bn-mode", choices=BN_MODES, default=None,
                    help="BatchNorm at test time (default: the run's own)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--lake-runs", action="store_true",
                    help="score a 20-way Omniglot checkpoint on Lake et al.'s 20 official "
                         "one-shot runs (one_shot_runs.zip beside the Omniglot files) instead "
                         "of test tasks; refused for a model that trained on their characters")
    ev.add_argument("--test-shifts", type=int, default=0,
                    help="test-time augmentation: every image also taken at each whole-pixel "
                         "shift within N pixels ((2N+1)^2 copies; default 0: none)")
    ev.add_argument("--split", choices=EVAL_SPLITS, default="test",
                    help="the run's test classes (default) or its validation classes: choose "
                         "test-time settings (--bn-mode, --test-shifts) there, before the test")

    cmp = sub.add_parser("compare", help="train several scenarios and compare them")
    cmp.add_argument("--scenarios", default="s1,s2,s3,s4,s5")
    cmp.add_argument("--out", required=True)
    cmp.add_argument("--resume", action="store_true",
                     help="continue each scenario's run in --out (finished ones are re-evaluated)")
    cmp.add_argument("--overwrite", action="store_true",
                     help="start every scenario's run over")
    cmp.add_argument("--no-progress", action="store_true")
    cmp.add_argument("--tensorboard", action="store_true",
                     help="TensorBoard scalars in each scenario's OUT/<scenario>/tensorboard")
    _add_overrides(cmp)


def _add_predict_command(sub) -> None:
    pred = sub.add_parser("predict", help="classify new images with a trained model, adapted to "
                                          "a few labelled examples of your classes")
    pred.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    pred.add_argument("--support", required=True,
                      help="a folder holding one folder of images per class")
    pred.add_argument("--query", required=True, nargs="+", help="images or folders of images")
    pred.add_argument("--weights", choices=("best", "last"), default=None,
                      help="of a run folder: best.pt (default when the run has it) or checkpoint.pt")
    pred.add_argument("--inner-steps", type=int, default=None,
                      help="head adaptation steps (default: the run's evaluation setting)")
    pred.add_argument("--bn-mode", choices=BN_MODES, default=None,
                      help="BatchNorm (default: the run's own, 'support' for a transductive run: "
                           "each query classified on its own)")
    pred.add_argument("--test-shifts", type=int, default=0,
                      help="test-time augmentation: every image also taken at each whole-pixel "
                           "shift within N pixels ((2N+1)^2 copies; default 0: none)")
    pred.add_argument("--top", type=int, default=1, help="classes shown per image")
    pred.add_argument("--json", action="store_true", help="one JSON object per image")
    pred.add_argument("--device", default="auto")


def _add_export_command(sub) -> None:
    exp = sub.add_parser("export", help="write a trained model, adapted to a few labelled "
                                        "examples of your classes, as a file that runs without "
                                        "anil-fast (.pt2 torch.export, .onnx, .pt TorchScript)")
    exp.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    exp.add_argument("--support", required=True,
                     help="a folder holding one folder of images per class")
    exp.add_argument("--out", required=True,
                     help="the file to write: model.pt2, model.onnx or model.pt")
    exp.add_argument("--format", choices=("export", "onnx", "torchscript"), default=None,
                     help="default: from --out's suffix")
    exp.add_argument("--input-size", type=int, default=None,
                     help="side of the square images the file will take (default: the "
                          "model's; an Omniglot run's drawings are 105)")
    exp.add_argument("--input-channels", type=int, choices=(1, 3), default=None,
                     help="channels of those images (default: the model's)")
    exp.add_argument("--input-dtype", choices=("uint8", "float"), default="uint8",
                     help="uint8 pixels 0..255 (default) or float 0..1")
    exp.add_argument("--weights", choices=("best", "last"), default=None)
    exp.add_argument("--inner-steps", type=int, default=None)
    exp.add_argument("--bn-mode", choices=("support", "running"), default=None,
                     help="BatchNorm frozen into the graph (default: predict's)")
    exp.add_argument("--device", default="auto")


def _add_cache_command(sub) -> None:
    cache = sub.add_parser("cache", help="the decoded-image caches: where they are, their size, "
                                         "or clear them (they are rebuilt from the sources)")
    cache.add_argument("action", choices=("info", "clear"))


def _add_bench_command(sub) -> None:
    bench = sub.add_parser("bench", help="meta-steps/s of the per-task loop, a torch.func vmap "
                                         "ANIL and ours, side by side (table, JSON, PNG)")
    bench.add_argument("--cases", default=",".join(BENCH_CASES),
                       help="presets whose shapes to time (default: %(default)s)")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--quick", action="store_true",
                       help="two tiny cases, one short repetition: checks the command works "
                            "(its numbers are a smoke run, not results)")
    bench.add_argument("--out", default=None, help="folder for bench.md, bench.json, bench.png")
    bench.add_argument("--repetitions", type=int, default=None, help="interleaved rounds (5)")
    bench.add_argument("--seconds", type=float, default=None,
                       help="seconds per variant per round (0.5)")


def _shifts_text(shifts: int) -> str:
    """How a result's images were scored, when test-time shifts were used."""
    return (f", each image at {(2 * shifts + 1) ** 2} shifts of up to {shifts} px (test-time "
            f"augmentation)" if shifts else "")


def _print_eval(result: dict, out=print) -> None:
    shifts = _shifts_text(result.get("test_shifts", 0))
    split = result.get("split", "test")  # train's summary and older results: the test split
    out(f"{split} tasks: {result['tasks']} (BatchNorm: {result['bn_mode']}{shifts})")
    out(f"accuracy before adaptation: {100 * result['accuracy_before']:.2f}% "
        f"± {100 * result['ci95_before']:.2f}")
    out(f"accuracy after adaptation:  {100 * result['accuracy_after']:.2f}% "
        f"± {100 * result['ci95_after']:.2f}")
    if "ci95_gain" in result:  # results written before the gain's CI existed have none
        out(f"inner-loop gain: {100 * result['gain']:+.2f} points ± "
            f"{100 * result['ci95_gain']:.2f} (paired over the same tasks)")


# A reference number is printed only for the data and task it was measured on: a run that
# changes one of these has no reference. One that changes the others gets it with a caveat.
REFERENCE_DATA = ("dataset", "data", "split_file", "protocol", "rotations", "test_ways", "shots")
REFERENCE_SETTINGS = ("queries", "image_size", "test_tasks", "bn_mode", "tasks", "ways")


def _print_summary(summary: dict, config, info, out=print) -> None:
    from anil_fast.data.references import references
    ranks = f" x {info.world_size} ranks" if info.active else ""
    rate = "n/a" if summary["it_s"] is None else f"{summary['it_s']:.2f}"
    one_time = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s"
                         for k, v in summary["one_time_s"].items())
    out(f"{summary['scenario']}: {summary['meta_steps']} meta-steps in "
        f"{summary['train_time_s']:.1f} s of training ({rate} it/s, stopped by "
        f"{summary['stopped_by']}) on {summary['device']}{ranks}, final loss "
        f"{summary['final_loss']:.3f}; one-time: {one_time}")
    if "evaluation" not in summary:
        return
    out(f"checkpoint tested: {summary['selected']}")
    out(f"model: {describe_model(dataclasses.replace(config, precision=summary['precision']))}")
    _print_eval(summary["evaluation"], out)
    if "evaluation_last" in summary:
        last = summary["evaluation_last"]
        out(f"(last weights: {100 * last['accuracy_after']:.2f}% ± {100 * last['ci95_after']:.2f})")
    table = references()
    # the reference numbers hold for the preset's own data and settings (for this head: a
    # learned head trains on the preset's plain recipe, config.PLAIN_RECIPE)
    preset = scenario_config(config.scenario, head_init=config.head_init)
    other_data = [k for k in REFERENCE_DATA if getattr(config, k) != getattr(preset, k)]
    if other_data:
        out(f"reference: none printed (the preset's references are for its own data and task; "
            f"this run changed {', '.join(other_data)})")
        return
    changed = [k for k in REFERENCE_SETTINGS if getattr(config, k) != getattr(preset, k)]
    caveat = f" (for the preset's own settings; this run changed {', '.join(changed)})" if changed else ""
    for suite in ("paper", "seed"):
        for ref in table[suite].get(config.scenario, []):
            ci = f" ± {ref['ci95']}" if "ci95" in ref else ""
            out(f"reference: {ref['method']} {ref['accuracy']}%{ci}, {table['cite'][ref['source']]}"
                f"{caveat}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import warnings
    warnings.formatwarning = _one_line_warning  # a user reads "warning: ...", not our source
    from anil_fast import distributed
    # Under torchrun: join the process group; only rank 0 prints (and reads what it wrote).
    info = distributed.init_from_env(getattr(args, "device", None) or "auto")
    out = print if info.is_main else (lambda *a, **k: None)
    try:
        from anil_fast.env import keep_freed_memory
        keep_freed_memory()  # a step's freed tensors stay for the next (ANIL_FAST_MALLOC)
        COMMANDS[args.command](args, info, out)
    except Interrupted as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # outside training: nothing of a run to keep
        print("\ninterrupted", file=sys.stderr)
        return 130
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except BenchFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (AnilFastError, OSError) as exc:  # OSError: files, folders, the disk
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0


def _train(args, info, out) -> None:
    from anil_fast.config import config_from_file
    from anil_fast.runs.settings import resolve
    from anil_fast.training.run import train
    if args.config is not None:
        if args.scenario is not None:
            raise InputError("--scenario and --config exclude each other (the file holds every "
                             "setting, its scenario included)")
        config = config_from_file(args.config, **_overrides(args))
    else:
        config = scenario_config(args.scenario or "s2", **_overrides(args))
    settings = resolve(config)  # checked and resolved once, here: train reads the result
    for note in settings.config.notes:
        out(note)
    board = None if args.tensorboard is None else (args.tensorboard or Path(args.out) / "tensorboard")
    summary = train(settings, args.out, resume=args.resume, overwrite=args.overwrite,
                    progress=not args.no_progress, tensorboard=board)
    _print_summary(summary, settings.config, info, out)


def _eval(args, info, out) -> None:
    if args.lake_runs:
        if args.split != "test":
            raise InputError("--lake-runs scores Lake et al.'s runs, a test set: --split "
                             "validation does not apply (choose settings with --split "
                             "validation first, without --lake-runs)")
        return _lake_runs(args, out)
    from anil_fast.evaluation import evaluate_checkpoint
    result = evaluate_checkpoint(args.checkpoint, args.tasks, args.bn_mode, args.device,
                                 progress=not args.json, weights=args.weights,
                                 test_shifts=args.test_shifts, split=args.split)
    if args.json:
        out(json.dumps(result))
    else:
        out(f"weights: {result['weights']}, {result['checkpoint']}")
        out(f"model: {result['model_settings']}")
        _print_eval(result, out)


def _lake_runs(args, out) -> None:
    from anil_fast.use.lake import score_lake_runs
    result = score_lake_runs(args.checkpoint, args.weights, args.device, args.bn_mode,
                             test_shifts=args.test_shifts)
    if args.json:
        out(json.dumps(result))
        return
    out(f"weights: {result['weights']}, {result['checkpoint']}")
    out(f"model: {result['model_settings']}")
    out(f"Lake et al.'s 20 one-shot runs, 20-way within-alphabet (BatchNorm: "
        f"{result['bn_mode']}{_shifts_text(result['test_shifts'])})")
    out("error per run (%): " + " ".join(f"{100 * e:.0f}" for e in result["per_run"]))
    out(f"error over the {result['items']} items: {100 * result['error']:.2f}%")
    for ref in result["references"]:
        out(f"reference: {ref['method']} {ref['error']}%, {ref['cite']}")


def _show_tasks(args, info, out) -> None:
    from anil_fast.experiments.show import show_tasks
    overrides = {k: getattr(args, k) for k in ("ways", "shots", "queries", "image_size", "seed",
                                               "data_root", "data", "dataset", "split_file")
                 if getattr(args, k) is not None}
    dataset = overrides.get("dataset", PRESETS[args.scenario].get("dataset", "omniglot"))
    if args.split == "validation" and dataset == "omniglot" and "data" not in overrides \
            and not PRESETS[args.scenario].get("validation"):
        raise InputError(f"scenario {args.scenario} holds out no validation characters")
    if "data" in overrides or dataset != "omniglot":  # Omniglot's protocol is not theirs
        overrides.update(protocol="seed", rotations=False, validation=0)
    config = scenario_config(args.scenario, pretrained=False, model="conv4", **overrides)
    path = show_tasks(config, args.out, args.show_tasks, args.split)
    out(f"wrote {path} ({args.show_tasks} {args.split} tasks of {config.scenario})")


def _reproduce(args, info, out) -> None:
    from anil_fast.experiments.reproduce import reproduce
    rows = reproduce(args.suite, args.out, args.budget_s, args.device, args.smoke,
                     progress=not args.no_progress, resume=args.resume, overwrite=args.overwrite,
                     tensorboard=args.tensorboard, seeds=args.seeds,
                     overrides={k: getattr(args, k) for k in REPRODUCE_OVERRIDES
                                if getattr(args, k) is not None},
                     presets=None if args.presets is None else
                     [p.strip() for p in args.presets.split(",") if p.strip()])
    if info.is_main:  # rank 0 alone wrote the report: the other ranks must not read it
        out((Path(args.out) / "reproduce.md").read_text())
    out(f"wrote {args.out}/reproduce.{{md,csv,json}} and accuracy_vs_time.png "
        f"({len(rows)} presets)")


def _compare(args, info, out) -> None:
    from anil_fast.experiments.compare import compare
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    rows = compare(names, args.out, _overrides(args), progress=not args.no_progress,
                   resume=args.resume, overwrite=args.overwrite, tensorboard=args.tensorboard)
    if info.is_main:  # rank 0 alone wrote the tables: the other ranks must not read them
        out((Path(args.out) / "comparison.md").read_text())
    out(f"wrote {args.out}/comparison.{{md,csv,json}}, loss_curves.png, accuracy.png "
        f"({len(rows)} scenarios)")


def _bench(args, info, out) -> None:
    from anil_fast.measure.bench import failures, main_progress, run_bench
    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    rows, text = run_bench(cases, args.device, args.quick, args.out, args.repetitions,
                           args.seconds, progress=main_progress if info.is_main else None)
    out(text)
    if args.out:
        out(f"wrote {args.out}/bench.{{md,json,png}}")
    bad = failures(rows)
    if bad:
        raise BenchFailed("variants that disagree with the reference or could not run: "
                          + "; ".join(bad))


def _predict(args, info, out) -> None:
    from anil_fast.use.predict import FewShotClassifier, image_paths
    if args.top < 1:
        raise InputError(f"--top must be at least 1, got {args.top}")
    clf = FewShotClassifier.from_checkpoint(args.checkpoint, args.weights, args.device,
                                            args.inner_steps, args.bn_mode, args.test_shifts)
    clf.fit(args.support)
    queries = image_paths(args.query)
    if not queries:
        raise InputError(f"--query: no images in {' '.join(args.query)}")
    probabilities = clf.predict_proba(queries)
    if not args.json:
        out(f"{clf.weights} of {clf.checkpoint}; {len(clf.classes)} classes from {args.support}, "
            f"{len(queries)} query images (BatchNorm: {clf.bn_mode}"
            + (f", test-time shifts within {clf.test_shifts} px" if clf.test_shifts else "") + ")")
    top = min(args.top, len(clf.classes))
    for path, row in zip(queries, probabilities):
        p, i = row.topk(top)
        best = [(printable_path(clf.classes[c]), round(float(v), 4)) for v, c in zip(p, i.tolist())]
        if args.json:
            out(json.dumps({"image": printable_path(path), "predictions": [
                {"class": c, "probability": v} for c, v in best]}))
        else:
            out(f"{printable_path(path)}: " + ", ".join(f"{c} {v:.3f}" for c, v in best))


def _export(args, info, out) -> None:
    from anil_fast.use.predict import FewShotClassifier
    clf = FewShotClassifier.from_checkpoint(args.checkpoint, args.weights, args.device,
                                            args.inner_steps, args.bn_mode)
    clf.fit(args.support)
    path = clf.export(args.out, args.format, args.input_size, args.input_channels,
                      args.input_dtype)
    size = args.input_size or clf.image_size
    channels = args.input_channels or clf.channels
    out(f"wrote {printable_path(path)}: {clf.weights} of {clf.checkpoint} adapted to "
        f"{len(clf.classes)} classes from {printable_path(args.support)} (BatchNorm: "
        f"{clf.bn_mode}); input {args.input_dtype} [N, {channels}, {size}, {size}], output "
        f"probabilities [N, {len(clf.classes)}]")


def _cache(args, info, out) -> None:
    import shutil
    from anil_fast.env import decode_cache_dirs
    for folder in decode_cache_dirs():
        files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
        size = sum(p.stat().st_size for p in files)
        if args.action == "clear" and folder.is_dir():
            shutil.rmtree(folder)
            out(f"cleared {folder} ({len(files)} files, {size / 2**20:.1f} MiB)")
        else:
            out(f"{folder}: {len(files)} files, {size / 2**20:.1f} MiB")


COMMANDS = {"train": _train, "eval": _eval, "show-tasks": _show_tasks, "reproduce": _reproduce,
            "compare": _compare, "bench": _bench, "predict": _predict, "export": _export,
            "cache": _cache}

if __name__ == "__main__":
    sys.exit(main())
