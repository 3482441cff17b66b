"""The `anil-fast` command line: train, eval, compare."""
from __future__ import annotations

import argparse
import json
import sys

from .scenarios import PRESETS

# flag -> Config field, for every override the CLI offers
OVERRIDES = {
    "ways": int, "shots": int, "queries": int, "inner_lr": float, "outer_lr": float,
    "inner_steps": int, "meta_batch": int, "meta_steps": int, "tasks": int, "image_size": int,
    "model": str, "device": str, "seed": int, "backend": str, "test_tasks": int,
    "eval_inner_steps": int, "warmup_steps": int, "multipliers": str, "protocol": str,
    "bn_mode": str, "checkpoint_every": int, "log_every": int, "precision": str,
    "data_root": str,
}
FLAGS = ("first_order", "freeze_body", "pretrained", "rotations", "compile", "capture")


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
        if args.meta_steps is None:
            raise ValueError("--endless needs --meta-steps")
    if args.tasks is not None and args.meta_steps is None:
        values["meta_steps"] = None  # one pass over the given pool
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anil-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="meta-train a scenario, then evaluate it")
    train.add_argument("--scenario", default="s2", choices=sorted(PRESETS))
    train.add_argument("--out", required=True, help="run folder (checkpoint, metrics, results)")
    train.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="start over in an --out that holds a run (deletes its run files)")
    train.add_argument("--no-progress", action="store_true")
    _add_overrides(train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on test tasks")
    ev.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    ev.add_argument("--tasks", type=int, default=1000)
    ev.add_argument("--bn-mode", choices=("transductive", "running"), default="transductive")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", action="store_true", help="print one JSON object")

    cmp = sub.add_parser("compare", help="train several scenarios and compare them")
    cmp.add_argument("--scenarios", default="s1,s2,s3,s4,s5")
    cmp.add_argument("--out", required=True)
    cmp.add_argument("--resume", action="store_true",
                     help="continue each scenario's run in --out (finished ones are re-evaluated)")
    cmp.add_argument("--overwrite", action="store_true",
                     help="start every scenario's run over")
    cmp.add_argument("--no-progress", action="store_true")
    _add_overrides(cmp)
    return parser


def _print_eval(result: dict, out=print) -> None:
    out(f"test tasks: {result['tasks']} (BatchNorm: {result['bn_mode']})")
    out(f"accuracy before adaptation: {100 * result['accuracy_before']:.2f}% "
        f"± {100 * result['ci95_before']:.2f}")
    out(f"accuracy after adaptation:  {100 * result['accuracy_after']:.2f}% "
        f"± {100 * result['ci95']:.2f}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from . import distributed
    from .trainer import TrainingDiverged, evaluate_checkpoint, train
    # Under torchrun: join the process group; only rank 0 prints.
    info = distributed.init_from_env(getattr(args, "device", None) or "auto")
    out = print if info.is_main else (lambda *a, **k: None)
    try:
        if args.command == "train":
            from .scenarios import scenario_config
            config = scenario_config(args.scenario, **_overrides(args))
            for note in config.notes:
                out(note)
            summary = train(config, args.out, resume=args.resume, overwrite=args.overwrite,
                            progress=not args.no_progress)
            ranks = f" x {info.world_size} ranks" if info.active else ""
            out(f"{config.scenario}: {summary['meta_steps']} meta-steps in "
                f"{summary['train_time_s']:.1f} s ({summary['it_s']:.2f} it/s) on "
                f"{summary['device']}{ranks}, final loss {summary['final_loss']:.3f}")
            _print_eval(summary["evaluation"], out)
        elif args.command == "eval":
            result = evaluate_checkpoint(args.checkpoint, args.tasks, args.bn_mode, args.device,
                                         progress=not args.json)
            if args.json:
                out(json.dumps(result))
            else:
                _print_eval(result, out)
        else:
            from .compare import compare
            names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
            rows = compare(names, args.out, _overrides(args), progress=not args.no_progress,
                           resume=args.resume, overwrite=args.overwrite)
            out(open(f"{args.out}/comparison.md").read())
            out(f"wrote {args.out}/comparison.{{md,csv,json}}, loss_curves.png, accuracy.png "
                  f"({len(rows)} scenarios)")
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (ValueError, TypeError, OSError) as exc:  # OSError: files, folders, the disk
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
