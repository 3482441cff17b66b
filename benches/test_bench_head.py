"""Speed suite of the fused head (pytest-benchmark): forward+backward of the op against the
reference backend and the per-task loop, in the same run.

    make bench                                # everything that fits the machine
    pytest benches/test_bench_head.py --benchmark-only -k "T256 and D2304"

The ratio table (baseline time / fused time, saved-for-backward bytes, and on a GPU achieved
GB/s against the traffic floor and the measured copy bandwidth) prints at the end of the run.
"""
import pytest
import torch

from anil_fast.models.functional import auto_prefers_reference
from anil_fast.measure.harness import (TASK_SHAPES, copy_bandwidth_gbs, forward_backward, episode_problem,
                    median_seconds, peak_memory_bytes, saved_bytes, traffic_floor_bytes)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_FEATURE_BYTES_LIMIT = 256 * 2 ** 20  # the CPU runs only problems whose features fit this
RESULTS: dict = {}
SMOKE = {"tasks": 16, "dim": 64, "shape": "5w1s"}  # the cases `pytest benches --smoke` keeps


def _problem_size_ok(tasks, ways, shots, queries, dim, method):
    rows = ways * (shots + queries)
    if DEVICE == "cpu" and tasks * rows * dim * 4 > CPU_FEATURE_BYTES_LIMIT:
        return False
    if method == "per_task" and tasks > 256:  # minutes per call: the trend is clear by then
        return False
    return True


@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("shape", list(TASK_SHAPES))
@pytest.mark.parametrize("dim", [64, 512, 2304], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("tasks", [16, 256, 4096], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("method", ["fused", "reference", "per_task"])
def test_head_forward_backward(benchmark, method, tasks, dim, shape, order):
    ways, shots, queries = TASK_SHAPES[shape]
    if not _problem_size_ok(tasks, ways, shots, queries, dim, method):
        pytest.skip("too large for this machine / baseline")
    problem = episode_problem(tasks, ways, shots, queries, dim, DEVICE)
    first_order = order == "first"
    fn = forward_backward(method, problem, first_order)

    def synced():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out
    benchmark.group = f"T{tasks} D{dim} {shape} {order}"
    benchmark.pedantic(synced, rounds=5 if tasks < 4096 else 3, warmup_rounds=1)
    key = (tasks, dim, shape, order)
    # keep numbers only: holding every problem's tensors would skew later cases' timings
    entry = RESULTS.setdefault(key, {"floor_bytes": traffic_floor_bytes(problem, first_order),
                                     "auto": "reference" if auto_prefers_reference(problem[0]) else "fused"})
    entry[method] = median_seconds(benchmark)
    entry[f"{method}_saved_MB"] = saved_bytes(fn) / 2 ** 20
    entry[f"{method}_peak_MB"] = (peak_memory_bytes(fn, DEVICE) or 0) / 2 ** 20 or None
    benchmark.extra_info.update({"backend": method,
                                 "device": DEVICE, "saved_MB": entry[f"{method}_saved_MB"]})


def summary_rows():
    bandwidth = copy_bandwidth_gbs(DEVICE) if RESULTS else None
    rows = []
    for (tasks, dim, shape, order), e in sorted(RESULTS.items()):
        fused = e.get("fused")
        row = {"T": tasks, "D": dim, "tasks": shape, "order": order, "fused ms": fused and 1e3 * fused,
               "x reference": fused and e.get("reference") and e["reference"] / fused,
               "x per-task": fused and e.get("per_task") and e["per_task"] / fused,
               "auto picks": e["auto"] + ("" if not (fused and e.get("reference")) else
                                          " (faster)" if (e["reference"] < fused) == (e["auto"] == "reference")
                                          else " (SLOWER)"),
               "saved MB fused/ref": f"{e.get('fused_saved_MB', 0):.1f}/{e.get('reference_saved_MB', 0):.1f}"}
        if bandwidth and fused:
            floor = e["floor_bytes"]
            row["GB/s"] = floor / fused / 1e9
            row["x floor"] = fused / (floor / (bandwidth * 1e9))
            row["copy GB/s"] = bandwidth
        rows.append(row)
    return rows
