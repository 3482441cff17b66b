"""Speed suite of whole meta-steps (pytest-benchmark): the fast path against the per-task loop
of the ANIL write-ups, same run. On the CPU the fast path is the C++ head with the body per
task (batched_body=None picks the faster body path per device); on a GPU, the batched body.

    pytest benches/test_bench_step.py --benchmark-only
"""
import pytest
import torch

from bench_steps import CASES, step_callable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RESULTS: dict = {}
CPU_CASES = ["s2 conv4 28px", "s1 conv4 28px", "s2 conv4 105px"]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", ["fast", "loop"])
def test_meta_step(benchmark, method, case):
    if DEVICE == "cpu" and case not in CPU_CASES:
        pytest.skip("GPU-sized case")
    fn, anil, _ = step_callable(case, method, DEVICE, capture=DEVICE == "cuda")

    def synced():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    benchmark.group = case
    benchmark.pedantic(synced, rounds=5, warmup_rounds=1)
    entry = RESULTS.setdefault(case, {})
    entry[method] = benchmark.stats.stats.median


def summary_rows():
    rows = []
    for case, e in RESULTS.items():
        fast, loop = e.get("fast"), e.get("loop")
        rows.append({"case": case, "fast it/s": fast and 1 / fast, "loop it/s": loop and 1 / loop,
                     "x loop": fast and loop and loop / fast})
    return rows
