"""One command for a GPU machine: is the Triton head right, and how fast is it?

    python benches/gpu_check.py [--json PATH] [--quick]     (with anil-fast installed)

Needs torch, triton and the installed package (`pip install --no-deps --no-build-isolation -e .`;
no C++ build, no network). It
1. checks the Triton op against the float64 reference backend on random shapes, forward and
   backward, first and second order;
2. times the op's forward+backward against the reference backend and the per-task loop, with
   achieved GB/s against the traffic floor and the copy bandwidth measured in the same run;
3. times whole meta-steps (MetaOptimizer.step) of the scenarios against the per-task loop;
and prints a compact table last. It exits 1 when a check fails or any timing cell records an
error (a CUDA-graph capture that failed is a failure, not a result). Without a GPU
(`--device cpu`, under TRITON_INTERPRET=1) it runs a tiny smoke version of the same code, which
is how CI keeps it working.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from anil_fast.measure.harness import (copy_bandwidth_gbs, episode_problem, forward_backward,
                                       peak_memory_bytes, time_call, traffic_floor_bytes)
from anil_fast.measure.table import text_table

# the meta-step cases (anil-fast bench's presets at their image sizes; @28: at 28 px)
STEP_CASES = ("s2@28", "s1@28", "s2", "s1", "s4")
QUICK_STEP_CASES = ("s2@28",)


def print_table(rows, columns, title):
    print(text_table(rows, columns, title))


def time_meta_steps(device, quick: bool) -> list[dict]:
    """Whole meta-steps of every variant against the per-task loop, each checked against the
    float64 reference (anil-fast bench's harness: anil_fast.measure.bench)."""
    from anil_fast.measure.bench import run_bench
    rows, _ = run_bench(QUICK_STEP_CASES if quick else STEP_CASES, str(device), quick,
                        repetitions=1 if quick else 3, seconds=0.05 if quick else 0.5)
    return rows

# (tasks, ways, shots, queries per class, dim, steps): random, odd and edge shapes
CHECK_SHAPES = [(3, 5, 1, 5, 7, 5), (1, 64, 1, 2, 33, 2), (4, 20, 5, 5, 1025, 5),
                (2, 5, 1, 15, 2304, 0), (7, 3, 2, 4, 1, 100), (300, 5, 1, 5, 64, 5),
                (2, 7, 19, 1, 9, 3), (2, 10, 64, 2, 257, 3)]  # last: 640 support rows (tiled)
QUICK_CHECK = [(3, 5, 1, 5, 7, 5), (2, 7, 3, 2, 9, 3)]


def check_correctness(device, shapes):
    from anil_fast.models.functional import adapted_query_loss
    rows, ok = [], True
    for (tasks, ways, shots, queries, dim, steps) in shapes:
        problem = episode_problem(tasks, ways, shots, queries, dim, device, seed=dim + tasks)
        fs, ys, fq, yq, w, b = problem
        lr = 0.05 if steps > 20 else 0.4
        for first_order in (False, True):
            def run(backend, dtype):
                leaves = [x.detach().to(dtype).requires_grad_() for x in (fs, fq, w, b)]
                losses, logits = adapted_query_loss(leaves[0], ys, leaves[1], yq, leaves[2], leaves[3],
                                                    inner_lr=lr, inner_steps=steps,
                                                    first_order=first_order, backend=backend)
                g = torch.Generator(device="cpu").manual_seed(1)
                cl = torch.randn(losses.shape, generator=g).to(device, dtype)
                cq = torch.randn(logits.shape, generator=g).to(device, dtype)
                grads = torch.autograd.grad((losses * cl).sum() + (logits * cq).sum(), leaves,
                                            allow_unused=True)
                grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves, grads)]
                return [losses, logits, *grads]
            got = run("fused", torch.float32)
            ref = run("reference", torch.float64)
            errors = [((a.double() - r).abs().max() / (r.abs().max() + 1e-3)).item()
                      for a, r in zip(got, ref)]
            worst = max(errors)
            passed = worst < 2e-3
            ok &= passed
            rows.append({"T": tasks, "ways": ways, "S": ways * shots, "Q": ways * queries, "D": dim,
                         "steps": steps, "order": "first" if first_order else "second",
                         "max rel err": worst, "ok": "yes" if passed else "NO"})
    return rows, ok


def time_head(device, quick, deadline=float("inf")):
    fused = "fused"
    bandwidth = copy_bandwidth_gbs(device, 64 if quick else 1024)
    # the cases the targets name first (T = 4,096 against the traffic floor), then the rest
    full = [(t, d, s) for s in ("5w1s", "20w5s") for t in (4096, 256, 16) for d in (2304, 512, 64)]
    grid = [(16, 64, "5w1s")] if quick else full
    shapes = {"5w1s": (5, 1, 5), "20w5s": (20, 5, 5)}
    rows = []
    for tasks, dim, shape in grid:
        if time.perf_counter() > deadline:  # keep the whole check within its time budget
            rows.append({"T": tasks, "D": dim, "tasks": shape, "order": "skipped: time budget"})
            continue
        try:
            rows += _time_head_case(device, fused, bandwidth, tasks, dim, shape, shapes, quick)
        except Exception as exc:  # e.g. out of memory: record it, keep going
            rows.append({"T": tasks, "D": dim, "tasks": shape,
                         "order": f"error: {type(exc).__name__}: {str(exc)[:60]}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, bandwidth


def _time_head_case(device, fused, bandwidth, tasks, dim, shape, shapes, quick):
    """Rows (second and first order) of one head problem."""
    rows = []
    ways, shots, queries = shapes[shape]
    problem = episode_problem(tasks, ways, shots, queries, dim, device)
    feature_bytes = (problem[0].numel() + problem[2].numel()) * 4
    times = {}
    for order in ("second", "first"):
        fo = order == "first"
        row = {"T": tasks, "D": dim, "tasks": shape, "order": order}
        fn = forward_backward(fused, problem, fo)
        t_fused = time_call(fn, device, 0.05 if quick else 0.3)
        times[order] = t_fused
        row["fused ms"] = 1e3 * t_fused
        row["peak MB"] = (peak_memory_bytes(fn, device) or 0) / 2 ** 20 or None
        if feature_bytes < 2 ** 30:  # the reference needs several copies of the features
            row["x ref"] = time_call(forward_backward("reference", problem, fo), device,
                                     0.05 if quick else 0.3) / t_fused
        if tasks <= 256:
            row["x per-task"] = time_call(forward_backward("per_task", problem, fo), device,
                                      0.05 if quick else 0.3, max_iters=10) / t_fused
        if bandwidth:
            floor = traffic_floor_bytes(problem, fo)
            row["GB/s"] = floor / t_fused / 1e9
            row["x floor"] = t_fused / (floor / (bandwidth * 1e9))
        rows.append(row)
    rows[-2]["2nd/1st"] = times["second"] / times["first"]
    return rows


def error_cells(rows: list[dict]) -> list[str]:
    """Every cell that records an error instead of a number ("error: ..." in any column, e.g.
    a CUDA-graph capture that failed): each one makes the check fail."""
    return [f"{row.get('case', row.get('tasks', ''))} {column}: {value}" for row in rows
            for column, value in row.items()
            if isinstance(value, str) and value.startswith("error")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write all results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-steps", action="store_true", help="skip the meta-step table")
    parser.add_argument("--budget", type=float, default=150,
                        help="seconds for the head timings before the rest is skipped (the "
                             "meta-step table follows; the whole check aims at < 4 minutes)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":  # the smoke version: the Triton kernels on CPU tensors
        os.environ.setdefault("TRITON_INTERPRET", "1")
        from anil_fast.models import ops
        ops.CPU_LOOP = "triton"
        args.quick = True
    start = time.perf_counter()
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    print(f"gpu_check on {info['device']} (torch {info['torch']}, triton {info['triton']})")

    check_rows, ok = check_correctness(device, QUICK_CHECK if args.quick else CHECK_SHAPES)
    print_table(check_rows, list(check_rows[0]), "\n1. Triton op vs float64 reference")
    head_rows, bandwidth = time_head(device, args.quick, start + args.budget)
    step_rows = []
    if not args.skip_steps:
        try:
            step_rows = time_meta_steps(device, args.quick)
        except Exception as exc:  # keep the head results whatever happens here
            step_rows = [{"case": "error", "detail": f"{type(exc).__name__}: {str(exc)[:200]}"}]
    errors = error_cells(head_rows) + error_cells(step_rows) + [
        f"{r['case']} {r['variant']} {r['precision']}: check failed" for r in step_rows
        if r.get("correct") is False and not str(r.get("note", "")).startswith("error")]
    result = {"info": info, "correct": ok, "errors": errors, "check": check_rows,
              "head": head_rows, "copy_bandwidth_gbs": bandwidth, "steps": step_rows,
              "seconds": time.perf_counter() - start}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\ncopy bandwidth: {bandwidth and round(bandwidth)} GB/s; correctness: "
          f"{'all within 2e-3' if ok else 'FAILED'}; {result['seconds']:.0f} s")
    if step_rows:
        print_table(step_rows, list(dict.fromkeys(c for r in step_rows for c in r)),
                    "\n3. Meta-steps per second (the fast path vs the per-task loop), same run")
    print_table(head_rows, list(dict.fromkeys(c for r in head_rows for c in r)),
                "\n2. Fused head forward+backward (x = baseline time / fused time)")
    for error in errors:
        print(f"FAILED: {error}")
    return 0 if ok and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
