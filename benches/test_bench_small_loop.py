"""Speed suite of the fused op's CPU kernel (pytest-benchmark): the C++ small loop
(csrc/anil_head.cpp) against the same loop as batched torch ops (the kernels' oracle), on the
presets' task shapes, forward (5 inner steps and the query loss) plus reverse, same run.

    pytest benches/test_bench_small_loop.py --benchmark-only

The ratio table (torch time / C++ time) prints at the end of the run. CPU only.
"""
import pytest
import torch

from anil_fast.models import ops
from anil_fast.measure.harness import episode_problem, median_seconds

# the presets' (ways, shots, queries per class), as the trainer samples them (std-5w1s
# trains on 10w1s tasks: config.PROTO_RECIPE)
PRESET_SHAPES = {"5w1s": (5, 1, 5), "10w1s": (10, 1, 5), "5w5s": (5, 5, 5), "20w1s": (20, 1, 5),
                 "20w5s": (20, 5, 5)}
RESULTS: dict = {}
SMOKE = {"tasks": 8, "shape": "5w1s"}  # the case `pytest benches --smoke` keeps


@pytest.mark.parametrize("loop", ["cpp", "torch"])
@pytest.mark.parametrize("shape", list(PRESET_SHAPES))
@pytest.mark.parametrize("tasks", [1, 8, 32, 256], ids=lambda t: f"T{t}")
def test_small_loop(benchmark, loop, shape, tasks):
    if loop == "cpp" and ops.cpp_extension() is None:
        pytest.skip("the C++ small loop could not be built here")
    small = {"cpp": ops.CPP_LOOP, "torch": ops.TORCH_LOOP}[loop]
    fs, ys, fq, yq, w, b = episode_problem(tasks, *PRESET_SHAPES[shape], 64)
    z0, kss, aq, kqs = ops.projections(fs, fq, w, b)
    hbar = torch.randn_like(z0)

    def run():
        small.forward(z0, kss, ys, aq, kqs, yq, 0.1, 5)
        return small.reverse(z0, kss, ys, hbar, 0.1, 5)
    benchmark.group = f"small loop T{tasks} {shape}"
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    RESULTS.setdefault((tasks, shape), {})[loop] = median_seconds(benchmark)


def summary_rows():
    return [{"T": tasks, "tasks": shape, "C++ us": e.get("cpp") and 1e6 * e["cpp"],
             "torch us": e.get("torch") and 1e6 * e["torch"],
             "x torch": e.get("cpp") and e.get("torch") and e["torch"] / e["cpp"]}
            for (tasks, shape), e in sorted(RESULTS.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
