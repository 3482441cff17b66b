"""Speed suite of whole meta-steps (pytest-benchmark): the fast path (fp32 and bf16) against the
per-task loop of the ANIL write-ups (fp32), same run. On the CPU the fast path is the C++ head
with the body per task in channels_last (batched_body=None picks the faster body path per
device; bf16 uses oneDNN's AVX-512 BF16 kernels where the CPU has them); on a GPU, the batched
body and a whole-step CUDA graph.

    pytest benches/test_bench_step.py --benchmark-only
"""
import pytest
import torch

from anil_fast.env import cpu_has_native_bf16
from bench_steps import CASES, step_callable
from common import median_seconds

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RESULTS: dict = {}
SMOKE = {"case": "s2 conv4 28px"}  # the case `pytest benches --smoke` keeps
CPU_CASES = ["s2 conv4 28px", "s1 conv4 28px", "s2 conv4 105px"]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", ["fast", "fast-bf16", "per_task"])
def test_meta_step(benchmark, method, case):
    if DEVICE == "cpu" and case not in CPU_CASES:
        pytest.skip("GPU-sized case")
    if method == "fast-bf16" and DEVICE == "cpu" and not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (emulated bf16 is many times slower; training uses fp32)")
    precision = "bf16" if method == "fast-bf16" else "fp32"
    fn, anil, _ = step_callable(case, method.split("-")[0], DEVICE, precision=precision,
                                capture=DEVICE == "cuda")

    def synced():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    benchmark.group = case
    benchmark.pedantic(synced, rounds=5, warmup_rounds=1)
    entry = RESULTS.setdefault(case, {})
    entry[method] = median_seconds(benchmark)


def summary_rows():
    rows = []
    for case, e in RESULTS.items():
        fast, bf16, base = e.get("fast"), e.get("fast-bf16"), e.get("per_task")
        rows.append({"case": case, "per-task it/s": base and 1 / base,
                     "fast fp32 it/s": fast and 1 / fast, "x per-task": fast and base and base / fast,
                     "fast bf16 it/s": bf16 and 1 / bf16, "bf16 x per-task": bf16 and base and base / bf16})
    return rows
