"""Speed suite of whole meta-steps (pytest-benchmark): the fast path (fp32 and bf16) against the
per-task loop of the ANIL write-ups (fp32), same run, on the presets' shapes. The cases and
variants are `anil-fast bench`'s (anil_fast.measure.bench): one harness. On the CPU the fast
path is the C++ head with the body per task in channels_last (bf16 uses oneDNN's AVX-512 BF16
kernels where the CPU has them); on a GPU, the batched body and a whole-step CUDA graph.

    pytest benches/test_bench_step.py --benchmark-only
"""
import pytest
import torch

from anil_fast.env import cpu_has_native_bf16
from anil_fast.measure.bench import Case, Variant, stepper
from anil_fast.measure.harness import median_seconds, synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RESULTS: dict = {}
CASES = ["s2@28", "s1@28", "s2", "s1", "s4"]  # presets (@ image size); s4: resnet18, no weights
SMOKE = {"case": "s2@28"}  # the case `pytest benches --smoke` keeps
CPU_CASES = ["s2@28", "s1@28", "s2"]
FAST = "fused+graph" if DEVICE.type == "cuda" else "fused"
VARIANTS = {"fast": Variant(FAST, "fp32"), "fast-bf16": Variant(FAST, "bf16"),
            "per_task": Variant("loop", "fp32")}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", list(VARIANTS))
def test_meta_step(benchmark, method, case):
    if DEVICE.type == "cpu" and case not in CPU_CASES:
        pytest.skip("GPU-sized case")
    if method == "fast-bf16" and DEVICE.type == "cpu" and not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (emulated bf16 is many times slower; training uses fp32)")
    spec = Case.of(case)
    batch = spec.batch(DEVICE)
    step, _ = stepper(spec, VARIANTS[method], DEVICE)

    def synced():
        step(batch)
        synchronize(DEVICE)
    benchmark.group = case
    benchmark.pedantic(synced, rounds=5, warmup_rounds=1)
    RESULTS.setdefault(case, {})[method] = median_seconds(benchmark)


def summary_rows():
    rows = []
    for case, e in RESULTS.items():
        fast, bf16, base = e.get("fast"), e.get("fast-bf16"), e.get("per_task")
        rows.append({"case": case, "per-task it/s": base and 1 / base,
                     "fast fp32 it/s": fast and 1 / fast, "x per-task": fast and base and base / fast,
                     "fast bf16 it/s": bf16 and 1 / bf16, "bf16 x per-task": bf16 and base and base / bf16})
    return rows
