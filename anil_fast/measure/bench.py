"""`anil-fast bench`: meta-steps per second of ANIL as users would write it and as anil-fast
runs it, side by side in one process, with peak memory and a correctness check per row.

For each case (a preset's shapes: body, image size, ways, shots, queries, meta-batch, inner
steps, order) every variant takes the same random tasks:
- baselines (what users would pick instead): "loop", the per-task loop of the ANIL write-ups
  and learn2learn (autograd through the head, one task at a time, the body per task and set);
  "vmap", a torch.func ANIL (one body call per set for all tasks, `functional_call` + `grad`
  over the head under `vmap`), what a careful modern PyTorch user writes;
- ours: "reference" (batched body, autograd head), "fused" (the fused head op, with the body
  layout the device prefers: anil.prefers_channels_last, ANIL.uses_batched_body),
  "fused+compile" (torch.compile of the body), "fused+graph" (the whole step as a CUDA graph;
  CUDA only), each in fp32 and, where the device has it natively, bf16; on the CPU also the
  choices "fused" turned down there: "fused+batched" (one body call for all tasks) and
  "fused+nchw" (without channels_last);
- the floor: the body's own forward + backward on the same images, and the head op alone
  against the reference head.
Repetitions are interleaved across variants (so drift hits them alike), warm-up excluded.
Every row's loss and gradients on its first step are checked against the per-task reference
in float64 (the tolerance stated per row); a disagreement fails the command.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anil_fast.models import bodies
from anil_fast.models.anil import ANIL, prefers_channels_last
from anil_fast.training.capture import MetaStepRunner
from anil_fast.data import TaskBatch
from anil_fast.env import cpu_flags, cpu_has_native_bf16, cpu_model
from anil_fast.errors import InputError
from anil_fast.models.functional import adapted_query_loss
from anil_fast.measure.harness import PeakMemory, calls_per_second, synchronize
from anil_fast.measure.table import markdown_table
from anil_fast.training.optim import MetaOptimizer
from anil_fast.config import BENCH_CASES, PLAIN_RECIPE, PRESETS, scenario_config

# --quick: tiny shapes that keep every code path alive in seconds (a smoke run, not results)
QUICK = dict(image_size=28, meta_batch=4, queries=2)
QUICK_CASES = ("s2", "s1")
# max |g - g_ref| / max |g_ref| (and the loss's relative error) against the float64 reference
TOLERANCE = {"fp32": 2e-3, "bf16": 8e-2}
# ... or this multiple of the per-task reference's own error in the row's precision, where that
# is larger (bf16 with a few queries per task: 0.1-0.2 on an AMX CPU)
MARGIN = {"fp32": 4, "bf16": 2}
BASELINE = "loop"


@dataclasses.dataclass
class Case:
    name: str
    model: str
    image_size: int
    channels: int
    ways: int
    shots: int
    queries: int
    meta_batch: int
    inner_steps: int
    inner_lr: float
    first_order: bool
    freeze_body: bool

    @classmethod
    def of(cls, name: str, quick: bool = False) -> "Case":
        """A preset's shapes ("s2"), or at another image size ("s2@28"). The pretrained body is
        timed as resnet18 without its weights (the speed does not depend on them; nothing is
        downloaded). std-5w1s is timed at its plain tasks (8 five-way tasks a step, as the other
        std presets), not the 10-way ones, one a step, its prototype head trains on
        (config.PROTO_RECIPE, PLAIN_RECIPE)."""
        preset, _, size = name.partition("@")
        if preset not in PRESETS:
            raise InputError(f"cases: unknown preset {preset!r} in {name!r}; known: {sorted(PRESETS)}")
        overrides = {**PLAIN_RECIPE.get(preset, {}), **(QUICK if quick else {})}
        if size:
            if not size.isdigit():
                raise InputError(f"cases: {name!r}: the size after @ must be pixels, like s2@28")
            overrides["image_size"] = int(size)
        c = scenario_config(preset, **overrides)
        return cls(name, "resnet18" if c.model == "pretrained" else c.model, c.image_size,
                   c.input_channels, c.ways, c.shots, c.queries, c.meta_batch, c.inner_steps,
                   c.inner_lr, c.first_order, c.freeze_body)

    def batch(self, device, seed: int = 0) -> TaskBatch:
        g = torch.Generator().manual_seed(seed)
        s, q = self.ways * self.shots, self.ways * self.queries
        shape = (self.channels, self.image_size, self.image_size)

        def labels(per_class):
            return torch.arange(self.ways).repeat_interleave(per_class).expand(
                self.meta_batch, -1).contiguous()
        return TaskBatch(torch.rand(self.meta_batch, s, *shape, generator=g),
                         labels(self.shots), torch.rand(self.meta_batch, q, *shape, generator=g),
                         labels(self.queries)).to(device)

    def model_pair(self, seed: int = 0):
        torch.manual_seed(seed)
        return bodies.build(self.model, self.ways, self.image_size, channels=self.channels)


# -- the vmap baseline -----------------------------------------------------------------------------
class VmapANIL(nn.Module):
    """ANIL as torch.func users write it: one body call per set over all tasks (so BatchNorm
    normalises over the whole meta-batch, not per task), then `vmap` over tasks of the head's
    inner loop with `functional_call` and `grad`."""

    def __init__(self, body, head, inner_lr, inner_steps, first_order, freeze_body):
        super().__init__()
        self.body, self.head = body, head
        self.inner_lr, self.inner_steps, self.first_order = inner_lr, inner_steps, first_order
        if freeze_body:
            from anil_fast.models.batchnorm import batchnorm_parameter_names
            keep = batchnorm_parameter_names(body)
            for name, p in body.named_parameters():
                p.requires_grad_(name in keep)

    def head_losses(self, fs, ys, fq, yq):
        from torch.func import functional_call, grad, vmap
        params = dict(self.head.named_parameters())

        def support_loss(p, f, y):
            return F.cross_entropy(functional_call(self.head, p, (f,)), y)

        def adapt_and_score(f_s, y_s, f_q, y_q):
            p = params
            for _ in range(self.inner_steps):
                g = grad(support_loss)(p, f_s, y_s)
                if self.first_order:
                    g = {k: v.detach() for k, v in g.items()}
                p = {k: p[k] - self.inner_lr * g[k] for k in p}
            logits = functional_call(self.head, p, (f_q,))
            return F.cross_entropy(logits, y_q), logits
        return vmap(adapt_and_score)(fs, ys, fq, yq)

    def meta_backward(self, batch: TaskBatch):
        tasks, s_rows = batch.support_y.shape
        fs = self.body(batch.support_x.flatten(0, 1)).view(tasks, s_rows, -1)
        fq = self.body(batch.query_x.flatten(0, 1)).view(tasks, batch.query_y.shape[1], -1)
        losses, _ = self.head_losses(fs, batch.support_y, fq, batch.query_y)
        loss = losses.mean()
        loss.backward()
        return loss.detach()


def _vmap_stepper(case: Case, device, precision: str):
    body, head = case.model_pair()
    model = VmapANIL(body.to(device), head.to(device), case.inner_lr, case.inner_steps,
                     case.first_order, case.freeze_body)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.001)

    def step(batch):
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=precision == "bf16"):
            loss = model.meta_backward(batch)
        opt.step()
        return loss
    return step, model


# -- the variants ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Variant:
    name: str  # loop, vmap, reference, fused, fused+compile, fused+graph, fused+batched, fused+nchw
    precision: str  # fp32 or bf16

    @property
    def label(self) -> str:
        return f"{self.name} {self.precision}"


def variants_for(device: torch.device) -> list[Variant]:
    """Every variant this device runs: the baselines and the reference in fp32; the fast
    paths in fp32 and, where it is native (CUDA; CPUs with AVX-512 BF16, AMX or Arm BF16),
    bf16; the CUDA graph on CUDA only; on the CPU the batched body and NCHW, which "fused"
    turns down there."""
    fast = ["fused", "fused+compile"] + (["fused+graph"] if device.type == "cuda" else
                                         ["fused+batched", "fused+nchw"])
    precisions = ["fp32"]
    if device.type == "cuda" or cpu_has_native_bf16():
        precisions.append("bf16")
    out = [Variant("loop", "fp32"), Variant("vmap", "fp32"), Variant("reference", "fp32")]
    out += [Variant(name, p) for p in precisions for name in fast]
    return out


def _anil_stepper(case: Case, variant: Variant, device: torch.device, quick: bool):
    body, head = case.model_pair()
    kwargs = {"loop": dict(backend="per_task", batched_body=False),
              "reference": dict(backend="reference", batched_body=True)}.get(
        variant.name, dict(backend="fused"))
    if variant.name.startswith("fused"):
        kwargs.update(precision=variant.precision,
                      channels_last=prefers_channels_last(device, variant.precision, "fused"))
    if variant.name == "fused+batched":
        kwargs["batched_body"] = True
    if variant.name == "fused+nchw":
        kwargs["channels_last"] = False
    if variant.name == "fused+compile":
        kwargs["compile"] = "aot_eager" if quick else True  # --quick: no inductor build
    anil = ANIL(body.to(device), head.to(device), inner_lr=case.inner_lr,
                inner_steps=case.inner_steps, first_order=case.first_order,
                freeze_body=case.freeze_body, **kwargs)
    runner = MetaStepRunner(MetaOptimizer(anil, lr=0.001), capture=variant.name == "fused+graph")
    return (lambda batch: runner(batch)["loss"]), anil


def stepper(case: Case, variant: Variant, device: torch.device, quick: bool = False):
    """(step(batch) -> loss tensor, the model) for one variant, from the case's seed-0 weights."""
    if variant.name == "vmap":
        return _vmap_stepper(case, device, variant.precision)
    return _anil_stepper(case, variant, device, quick)


def reference_gradients(case: Case, batch: TaskBatch, device, precisions=("fp32",)) -> dict:
    """The per-task reference at the case's seed-0 weights: its loss and gradients in float64
    (the truth every row is checked against) and, per precision, how far the same reference
    is from them in that precision, in either memory layout (`fp32_error`, `bf16_error`:
    plain PyTorch's own rounding, large where a layer's gradient is a sum with heavy
    cancellation, e.g. the first convolution's, with channels_last (another kernel, another
    rounding: 5.7e-3 against 1.2e-3 in NCHW at std-20w1s on an AMX CPU) and in bf16)."""
    def run(dtype, precision="fp32", channels_last=False):
        body, head = case.model_pair()
        anil = ANIL(body.to(device, dtype), head.to(device, dtype), inner_lr=case.inner_lr,
                    inner_steps=case.inner_steps, first_order=case.first_order,
                    freeze_body=case.freeze_body, backend="reference", precision=precision,
                    channels_last=channels_last)
        anil.train()
        tasks = TaskBatch(batch.support_x.to(dtype), batch.support_y, batch.query_x.to(dtype),
                          batch.query_y)
        sums, total = anil.meta_backward(tasks)
        return (sums[0] / total).item(), _grads(anil)
    truth = run(torch.float64)
    errors = {f"{p}_error": max(relative_error(*run(torch.float32, p, layout), *truth)
                                for layout in (False, True)) for p in precisions}
    return {"loss": truth[0], "grads": truth[1], **errors}


def tolerance(precision: str, reference: dict) -> float:
    """A row passes within TOLERANCE[precision], or within MARGIN[precision] times the
    reference's own error in that precision where plain PyTorch in it is itself further from
    the float64 truth."""
    return max(TOLERANCE[precision], MARGIN[precision] * reference.get(f"{precision}_error", 0.0))


def _grads(model: nn.Module) -> dict:
    """Gradients by the parameter names of body and head (ANIL and VmapANIL name them alike)."""
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def relative_error(loss: float, grads: dict, ref_loss: float, ref_grads: dict) -> float:
    """max(|loss - ref| / |ref|, max |g - g_ref| / max |g_ref| over the gradients); inf when
    one side has a gradient the other lacks."""
    if set(grads) != set(ref_grads):
        return float("inf")
    errors = [abs(loss - ref_loss) / max(abs(ref_loss), 1e-6)]
    scale = max(g.abs().max().item() for g in ref_grads.values()) if ref_grads else 1.0
    errors += [(grads[n].to(g.device) - g).abs().max().item() / max(scale, 1e-12)
               for n, g in ref_grads.items()]
    return max(errors)


def vmap_head_error(case: Case, device, dim: int = 64) -> float:
    """The vmap baseline's head against the reference head on the same random features (its
    BatchNorm statistics span the whole meta-batch, so its whole step is not comparable)."""
    g = torch.Generator().manual_seed(1)  # fp32 against fp32: the head has no ill-conditioned sum
    s, q = case.ways * case.shots, case.ways * case.queries
    fs = torch.randn(case.meta_batch, s, dim, generator=g).to(device).requires_grad_()
    fq = torch.randn(case.meta_batch, q, dim, generator=g).to(device).requires_grad_()
    batch = case.batch(device)
    head = nn.Linear(dim, case.ways).to(device)
    model = VmapANIL(nn.Identity(), head, case.inner_lr, case.inner_steps, case.first_order, False)
    ours, _ = model.head_losses(fs, batch.support_y, fq, batch.query_y)
    ref, _ = adapted_query_loss(fs, batch.support_y, fq, batch.query_y, head.weight, head.bias,
                                inner_lr=case.inner_lr, inner_steps=case.inner_steps,
                                first_order=case.first_order, backend="reference")
    leaves = (fs, fq, head.weight, head.bias)
    got = torch.autograd.grad(ours.sum(), leaves, allow_unused=True)
    want = torch.autograd.grad(ref.sum(), leaves, allow_unused=True)
    named = lambda gs: {str(i): x for i, x in enumerate(gs) if x is not None}  # noqa: E731
    return relative_error(ours.sum().item(), named(got), ref.sum().item(), named(want))


# -- measuring -------------------------------------------------------------------------------------
def _prepare(case, variant, device, batch, reference, quick, warmup):
    """Build a variant, take its first step (checked against the reference) and its warm-up
    steps; {"step", "error", "memory_mb"} or {"failed": message}."""
    try:
        step, model = stepper(case, variant, device, quick)
        with PeakMemory(device) as memory:  # above the weights: activations, gradients, state
            loss = step(batch)
            synchronize(device)
            if variant.name == "vmap":
                error = vmap_head_error(case, device)
            else:
                error = relative_error(float(loss), _grads(model), reference["loss"],
                                       reference["grads"])
            for _ in range(warmup):
                step(batch)
            synchronize(device)
    except Exception as exc:  # one variant failing (capture on an odd setup) is a row, not the end
        return {"failed": f"{type(exc).__name__}: {str(exc).strip()[:120]}"}
    return {"step": step, "error": error, "memory_mb": memory.peak / 2 ** 20, "rates": []}


def floors(case: Case, device, precisions, target_s: float) -> dict:
    """The body's own forward + backward on the step's images (one call), per precision, and
    the head op alone (fused and reference, forward + backward) on features of the body's
    width: {"body fp32": it/s, ..., "head fused": it/s, "head reference": it/s}."""
    batch = case.batch(device)
    body, head = case.model_pair()
    body = body.to(device)
    images = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
    out = {}
    for precision in precisions:
        def body_step():
            body.zero_grad(set_to_none=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                body(images).float().sum().backward()
        with PeakMemory(device) as memory:
            body_step()
        out[f"body {precision}"] = (calls_per_second(body_step, device, target_s), memory.peak / 2 ** 20)
    g = torch.Generator().manual_seed(2)
    s, q, dim = case.ways * case.shots, case.ways * case.queries, head.in_features
    leaves = [torch.randn(case.meta_batch, s, dim, generator=g).to(device).requires_grad_(),
              torch.randn(case.meta_batch, q, dim, generator=g).to(device).requires_grad_(),
              head.weight.detach().to(device).requires_grad_(),
              head.bias.detach().to(device).requires_grad_()]
    for backend in ("fused", "reference"):
        def head_step():
            losses, _ = adapted_query_loss(leaves[0], batch.support_y, leaves[1], batch.query_y,
                                           leaves[2], leaves[3], inner_lr=case.inner_lr,
                                           inner_steps=case.inner_steps,
                                           first_order=case.first_order, backend=backend)
            torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
        out[f"head {backend}"] = (calls_per_second(head_step, device, target_s), None)
    return out


def measure_case(case: Case, device, variants, repetitions: int, target_s: float,
                 quick: bool, progress=None) -> list[dict]:
    """One case: every variant prepared and checked, then `repetitions` interleaved rounds of
    about target_s each; one row per variant, plus the floor's rows."""
    batch = case.batch(device)
    reference = reference_gradients(case, batch, device, sorted({v.precision for v in variants}))
    prepared = {}
    for variant in variants:
        if progress:
            progress(f"{case.name}: preparing {variant.label}")
        prepared[variant.label] = (variant, _prepare(case, variant, device, batch, reference,
                                                     quick, warmup=1 if quick else 3))
    for _ in range(repetitions):  # interleaved: a slow minute hits every variant alike
        for variant, state in prepared.values():
            if "step" in state:
                state["rates"].append(calls_per_second(lambda: state["step"](batch), device, target_s))
    floor = floors(case, device, sorted({v.precision for v in variants}), target_s)
    loop = prepared.get(f"{BASELINE} fp32", (None, {}))[1].get("rates")
    loop_rate = statistics.median(loop) if loop else None
    rows = [_row(case, variant, state, loop_rate, floor, reference)
            for variant, state in prepared.values()]
    for name, (rate, memory) in floor.items():
        rows.append({"case": case.name, "variant": f"floor: {name}", "precision":
                     name.split()[-1] if name.startswith("body") else "fp32",
                     "it_s": rate, "it_s_min": rate, "it_s_max": rate,
                     "x_loop": rate / loop_rate if loop_rate and name.startswith("body") else None,
                     "x_floor": None, "peak_memory_mb": memory, "max_rel_error": None,
                     "tolerance": None, "correct": None,
                     "note": "one call on all images" if name.startswith("body") else
                             f"T={case.meta_batch}, forward + backward"})
    return rows


def _row(case: Case, variant: Variant, state: dict, loop_rate, floor: dict, reference) -> dict:
    row = {"case": case.name, "variant": variant.name, "precision": variant.precision}
    if "failed" in state:
        return {**row, "it_s": None, "correct": False, "note": f"error: {state['failed']}"}
    rates = state["rates"]
    rate = statistics.median(rates)
    body_rate = floor[f"body {variant.precision}"][0]
    limit = tolerance(variant.precision, reference)
    return {**row, "it_s": rate, "it_s_min": min(rates), "it_s_max": max(rates),
            "x_loop": rate / loop_rate if loop_rate else None, "x_floor": body_rate / rate,
            "peak_memory_mb": state["memory_mb"], "max_rel_error": state["error"],
            "tolerance": limit, "correct": state["error"] <= limit,
            f"{variant.precision}_reference_error": reference.get(f"{variant.precision}_error"),
            "note": "head only: its BatchNorm spans the meta-batch" if variant.name == "vmap" else ""}


# -- reporting -------------------------------------------------------------------------------------
def device_info(device: torch.device) -> dict:
    """What the numbers were measured on: the device, its driver, torch, triton, the CPU."""
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "cpu": cpu_model(), "cpu_bf16": cpu_has_native_bf16(),
            "cpu_flags": sorted(f for f in (cpu_flags() or ()) if f.startswith(("avx512", "amx", "avx2")))}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        try:
            import pynvml
            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
            pynvml.nvmlShutdown()
        except Exception:
            info["driver"] = None
    return info


COLUMNS = [("case", "case"), ("variant", "variant"), ("precision", "precision"),
           ("it_s", "meta-steps/s"), ("range", "min-max"), ("x_loop", "x loop"),
           ("x_floor", "x body floor"), ("peak_memory_mb", "peak memory (MB)"),
           ("check", "check vs reference"), ("note", "note")]


def _cell(row: dict, key: str) -> str | None:
    """The bench's own columns (None: the table's default rendering)."""
    if key == "range":
        return "" if row.get("it_s_min") is None else f"{row['it_s_min']:.3g}-{row['it_s_max']:.3g}"
    if key == "check":
        if row.get("max_rel_error") is None:
            return "" if row.get("correct") is None else "FAILED"
        verdict = "ok" if row["correct"] else "FAILED"
        return f"{verdict} ({row['max_rel_error']:.1e} <= {row['tolerance']:.0e})" if row["correct"] \
            else f"{verdict} ({row['max_rel_error']:.1e} > {row['tolerance']:.0e})"
    if row.get(key) is None:
        return "" if key != "it_s" else "n/a"
    return None


def markdown(rows: list[dict], info: dict, quick: bool) -> str:
    where = info.get("gpu") or info["cpu"]
    lines = [f"**anil-fast bench** on {where} ({info['device']}; torch {info['torch']}, triton "
             f"{info['triton']}" + (f", driver {info['driver']}" if info.get("driver") else "")
             + f"; CPU {info['cpu']}, flags {' '.join(info['cpu_flags']) or 'no AVX-512'})", ""]
    if quick:
        lines += ["**Smoke run (--quick)**: tiny shapes that only check the command works; these "
                  "numbers are not results.", ""]
    lines += markdown_table(rows, COLUMNS, format_cell=_cell)
    lines += ["", "x loop: meta-steps/s over the per-task loop's; x body floor: the step's time "
              "over the body's own forward + backward on the same images (1 = the body alone); "
              "check: max relative error of the first step's loss and gradients against the "
              "per-task reference in float64, within 2e-3 (fp32) or 8e-2 (bf16), or the "
              "per-task reference's own error in that precision (either layout) times 4 (fp32) "
              "or 2 (bf16) where that is larger (vmap: its head only, against "
              "the fp32 reference head); peak memory of the first and warm-up steps: CUDA "
              "max_memory_allocated above the model's weights, "
              "CPU the growth of the process's peak RSS (0 when it set no new peak)."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    from matplotlib.figure import Figure  # a figure of its own: no global backend switch
    measured = [r for r in rows if r.get("it_s") and not r["variant"].startswith("floor")]
    cases = list(dict.fromkeys(r["case"] for r in measured))
    labels = list(dict.fromkeys(f"{r['variant']} {r['precision']}" for r in measured))
    fig = Figure(figsize=(max(6.0, 1.6 * len(cases) + 3), 4.5))
    ax = fig.subplots()
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        values = [next((r["it_s"] for r in measured if r["case"] == c
                        and f"{r['variant']} {r['precision']}" == label), 0) for c in cases]
        ax.bar([x + i * width for x in range(len(cases))], values, width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], cases)
    ax.set_yscale("log")
    ax.set_ylabel("meta-steps per second (log)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_bench(cases=BENCH_CASES, device: str = "auto", quick: bool = False, out=None,
              repetitions: int | None = None, seconds: float | None = None,
              progress=None) -> tuple[list[dict], str]:
    """Measure every case (all variants of this device), write bench.md, bench.json and
    bench.png into `out` when given; (rows, the Markdown table). quick: two small cases, one
    repetition of about 0.05 s (a smoke run, labelled so)."""
    from anil_fast.runs.settings import resolve_device
    dev = resolve_device(device)
    names = list(QUICK_CASES if quick and cases == BENCH_CASES else cases)
    if not names:
        raise InputError("cases: name at least one preset (e.g. s2,std-5w1s)")
    specs = [Case.of(name, quick) for name in names]  # unknown names fail before any timing
    repetitions = (1 if quick else 5) if repetitions is None else repetitions
    seconds = (0.05 if quick else 0.5) if seconds is None else seconds
    if repetitions < 1 or not seconds > 0:
        raise InputError(f"repetitions must be >= 1 and seconds > 0, got {repetitions}, {seconds}")
    info = device_info(dev)
    rows = []
    for spec in specs:
        rows += measure_case(spec, dev, variants_for(dev), repetitions, seconds, quick,
                             progress)
        text = markdown(rows, info, quick)
        if out is not None:  # after every case: a run cut off loses only the case it was in
            _write(Path(out), rows, info, quick, text)
    return rows, text


def _write(out: Path, rows, info, quick, text) -> None:
    from anil_fast.env import atomic_write
    out.mkdir(parents=True, exist_ok=True)
    record = {"info": info, "quick": quick, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    atomic_write(out / "bench.json", lambda f: f.write(json.dumps(record, indent=1).encode()))
    atomic_write(out / "bench.md", lambda f: f.write(text.encode()))
    title = f"anil-fast bench on {info.get('gpu') or info['cpu']}" + (" (SMOKE RUN)" if quick else "")
    plot(rows, out / "bench.png", title)


def failures(rows: list[dict]) -> list[str]:
    """The rows whose check failed or that could not run."""
    return [f"{r['case']} {r['variant']} {r['precision']}: {r.get('note') or 'check failed'}"
            for r in rows if r.get("correct") is False]


def main_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
