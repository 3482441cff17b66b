"""The scaling model of docs/scaling.md: per meta-step all-reduce volume against compute, and
the data-parallel efficiency it predicts.

    python benches/scaling_model.py            # prints the Markdown tables

Model (weak scaling: every GPU keeps a meta-batch of 16 tasks, 5-way 1-shot, 5 queries):
    t_allreduce(K) = 2 (K-1)/K * bytes / B  +  2 log2(K) * alpha      (NCCL ring bandwidth,
                                                                        tree latency)
    efficiency(K)  = t_step / (t_step + t_allreduce(K))               (no overlap: the
                                                                        all-reduce follows the
                                                                        backward in our step)
"""
from __future__ import annotations

import math

from anil_fast import models

# Fabrics: bus bandwidth per GPU (bytes/s) and per-hop latency (s).
FABRICS = {"NVLink": (360e9, 5e-6), "100Gb/s": (12.5e9, 15e-6)}  # ~360 GB/s bus on H100 NVLink
GPUS = (8, 64, 512)

# Step time per 16 tasks on one H100, seconds, and where the number comes from.
# "measured": the issue texts' H100 measurements (body forward+backward alone, which the fast
# path targets); "estimate": scaled as noted.
STEP_TIMES = {
    ("conv4", 105): (1 / 65, "measured: body fwd+bwd bf16 channels-last, 65 it/s"),
    ("conv4", 28): (1 / 500, "target of the batched step (500 it/s); body alone 335 it/s launch-bound"),
    ("resnet18", 105): (1 / 97, "measured: body fwd+bwd bf16, 97 it/s"),
    ("resnet18", 28): (1 / 300, "estimate: launch-bound, ~3 ms"),
    ("efficientnet_lite0", 105): (1 / 80, "estimate: ResNet18's time (depthwise convs are memory-bound)"),
    ("efficientnet_lite0", 28): (1 / 250, "estimate: launch-bound, ~4 ms"),
}


def trainable_bytes(name: str, size: int, frozen: bool = False, bytes_per=4) -> int:
    body, head = models.build(name, 5, size)
    if frozen:  # s4: head + BatchNorm only
        from anil_fast.models.batchnorm import batchnorm_layers
        n = sum(p.numel() for m in batchnorm_layers(body) for p in m.parameters(recurse=False))
    else:
        n = models.count_parameters(body)
    return (n + models.count_parameters(head)) * bytes_per


def allreduce_seconds(nbytes: int, gpus: int, bandwidth: float, latency: float) -> float:
    return 2 * (gpus - 1) / gpus * nbytes / bandwidth + 2 * math.log2(gpus) * latency


def rows():
    out = []
    for (name, size), (step_s, source) in STEP_TIMES.items():
        for frozen in ((False, True) if name != "conv4" else (False,)):
            nbytes = trainable_bytes(name, size, frozen)
            row = {"body": name + (" (frozen, s4)" if frozen else ""), "px": size,
                   "all-reduce MB": nbytes / 1e6, "step ms": step_s * 1e3, "source": source}
            for fabric, (bw, lat) in FABRICS.items():
                for k in GPUS:
                    t = allreduce_seconds(nbytes, k, bw, lat)
                    row[f"{fabric} {k}"] = step_s / (step_s + t)
            out.append(row)
    return out


def markdown(table) -> str:
    cols = list(table[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in table:
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, float):
                v = f"{100 * v:.0f}%" if c[-1].isdigit() else f"{v:.3g}"
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(rows()))
