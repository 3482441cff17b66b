"""Do the fused head's Triton kernels fit real GPUs? Compiled ahead of time, no GPU needed.

    python -m anil_fast.kernels.report [--arch 80,86,89,90] [--json PATH] [--presets]

For a grid of head shapes covering every preset (2-64 ways, 1-640 support rows, up to 1,280
query rows, 1 and 5 inner steps) it takes the launches the launchers choose
(`anil_head.forward_launch` / `reverse_launch`, the one place that decides them), compiles each
with `triton.compile` for each architecture, reads shared memory per block from the compiled
kernel and registers and spill bytes from `ptxas -v` (the ptxas inside the triton wheel), and
prints shape -> kernel, constexprs, warps, stages, shared memory, registers, spills and whether
it fits. The first-order backward launches no kernel (the inner loop's gradients are constants).

Compiled results are cached under the user cache folder, keyed by the kernels' source hash,
the launch, the argument specialisation, the architecture and the triton version; compiles run
in parallel processes. The compile must not run under TRITON_INTERPRET=1 (the interpreter
patches triton.language for the whole process): the report re-runs itself without it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# architecture -> (name, shared memory per block in bytes: the opt-in maximum)
ARCHES = {80: ("sm_80", 163 * 1024), 86: ("sm_86", 99 * 1024), 89: ("sm_89", 99 * 1024),
          90: ("sm_90a", 227 * 1024)}
REGISTERS_PER_SM_BLOCK = 65536
# The presets' head shapes: (name, ways, shots, queries per class).
PRESET_SHAPES = [("5w1s", 5, 1, 15), ("5w5s", 5, 5, 5), ("20w1s", 20, 1, 15),
                 ("20w5s", 20, 5, 5), ("seed 5w1s", 5, 1, 5),
                 ("std-5w1s training 10w1s", 10, 1, 5)]  # config.PROTO_RECIPE
GRID_WAYS = (2, 5, 10, 20, 32, 50, 64)
GRID_SHOTS = (1, 2, 5, 10)
GRID_QUERIES = (1, 5, 15, 20)
STEPS = (1, 5)  # triton specialises an int argument equal to 1: a compile of its own
SPILL_LIMIT = 128  # bytes per thread allowed beyond the presets (which must have none)


@dataclass(frozen=True)
class Shape:
    name: str
    ways: int
    shots: int
    queries: int
    steps: int
    preset: bool

    @property
    def support_rows(self) -> int:
        return self.ways * self.shots

    @property
    def query_rows(self) -> int:
        return self.ways * self.queries


def shapes(presets_only: bool = False) -> list[Shape]:
    out = [Shape(name, w, s, q, k, True) for name, w, s, q in PRESET_SHAPES for k in STEPS]
    if presets_only:
        return out
    seen = {(s.ways, s.shots, s.queries, s.steps) for s in out}
    for w in GRID_WAYS:
        for s in GRID_SHOTS:
            for q in GRID_QUERIES:
                for k in STEPS:
                    if w * s <= 640 and s + q <= 20 and (w, s, q, k) not in seen:
                        out.append(Shape(f"{w}w{s}s", w, s, q, k, False))
    return out


def kernel_arguments(kernel, shape: Shape, constexprs: dict) -> list:
    """The launch's argument values by parameter name, tensors as ("tensor", dtype): what the
    launchers pass, for the specialisation triton derives from them."""
    from anil_fast.kernels.anil_head import padded_rows
    scalars = {"S": shape.support_rows, "Q": shape.query_rows, "N": shape.ways,
               "S_PAD": padded_rows(shape.support_rows, constexprs.get("ROWS", 1)),
               "steps": shape.steps, "lr": 0.1}
    labels = {"YS", "YQ"}
    args = []
    for p in kernel.params:
        if p.is_constexpr:
            continue
        if p.name in scalars:
            args.append((p.name, scalars[p.name]))
        else:
            args.append((p.name, ("tensor", "int64" if p.name in labels else "float32")))
    return args


def _representative(value):
    """An int argument with the specialisation of `value` (triton compiles an int equal to 1 as
    a constant and marks multiples of 16): launches that differ only otherwise share a compile."""
    if isinstance(value, bool) or not isinstance(value, int):
        return value
    return 1 if value == 1 else 16 if value % 16 == 0 else 3


def _specialise(kernel, arguments, constexprs, backend):
    """signature, constexprs and attrs as triton's JIT derives them at a launch."""
    import torch
    from triton._C.libtriton import native_specialize_impl
    by_name = dict(arguments)
    signature, consts, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            consts[(i,)] = constexprs[p.name]
            continue
        value = by_name[p.name]
        if isinstance(value, tuple):
            value = torch.empty(4, dtype=getattr(torch, value[1]))
        kind, attr = native_specialize_impl(type(backend), value, False, not p.do_not_specialize,
                                            not p.do_not_specialize_on_alignment)
        signature[p.name] = kind
        if kind == "constexpr":  # an int equal to 1
            consts[(i,)] = value
        elif isinstance(attr, str):  # floats carry no attribute
            attrs[(i,)] = backend.parse_attr(attr)
    return signature, consts, attrs


def compile_one(job: dict) -> dict:
    """Compile one launch for one architecture; shared memory, registers, spills. The numbers
    come from the `ptxas -v` run inside triton.compile itself (same flags as a real launch)."""
    import io
    import re
    from contextlib import redirect_stdout

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    from anil_fast.kernels import anil_head
    kernel = getattr(anil_head, job["kernel"])
    target = GPUTarget("cuda", job["arch"], 32)
    backend = CUDABackend(target)
    signature, consts, attrs = _specialise(kernel, job["arguments"], job["constexprs"], backend)
    source = ASTSource(kernel, signature, constexprs=consts, attrs=attrs)
    knobs.nvidia.dump_ptxas_log = True  # triton prints its ptxas -v output
    knobs.compilation.always_compile = True  # (its cache would skip ptxas)
    log = io.StringIO()
    with redirect_stdout(log):
        compiled = triton.compile(source, target=target, options={
            "num_warps": job["num_warps"], "num_stages": job["num_stages"]})
    info = log.getvalue()
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return {"shared": int(compiled.metadata.shared), "registers": registers,
            "spill_stores": int(spill.group(1)), "spill_loads": int(spill.group(2))}


def _cache_dir() -> Path:
    from anil_fast.env import cache_dir
    return cache_dir() / "kernel-report"


def _job_key(job: dict) -> str:
    import triton

    from anil_fast.kernels import anil_head
    kernel = getattr(anil_head, job["kernel"])
    text = json.dumps({**job, "source": kernel.cache_key, "triton": triton.__version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _compile_cached(job: dict) -> dict:
    from anil_fast.env import read_cached_json, write_cached_json
    path = _cache_dir() / f"{_job_key(job)}.json"
    result = read_cached_json(path)
    if result is None:
        result = compile_one(job)
        write_cached_json(path, result)  # a read-only cache only costs the next run its compiles
    return result


def launches(shape: Shape) -> list[tuple[str, object]]:
    """(pass, Launch or None) for one shape: forward, first-order and second-order backward."""
    from anil_fast.kernels import anil_head
    forward = anil_head.forward_launch(shape.support_rows, shape.query_rows, shape.ways)
    reverse = anil_head.reverse_launch(shape.support_rows, shape.ways)
    return [("forward", forward), ("backward, first order", None),
            ("backward, second order", reverse)]


def build_report(arches, presets_only: bool = False, workers: int | None = None) -> list[dict]:
    from anil_fast.kernels import anil_head
    rows, jobs = [], {}
    for shape in shapes(presets_only):
        for arch in arches:
            for pass_, launch in launches(shape):
                row = {"shape": shape.name, "ways": shape.ways, "shots": shape.shots,
                       "support_rows": shape.support_rows, "query_rows": shape.query_rows,
                       "steps": shape.steps, "preset": shape.preset, "pass": pass_, "arch": arch}
                if launch is None:
                    rows.append({**row, "kernel": None})
                    continue
                kernel = getattr(anil_head, launch.kernel)
                job = {"kernel": launch.kernel, "constexprs": dict(launch.constexprs),
                       "num_warps": launch.num_warps, "num_stages": launch.num_stages,
                       "arch": arch,
                       "arguments": [(name, _representative(value)) for name, value in
                                     kernel_arguments(kernel, shape, dict(launch.constexprs))]}
                key = _job_key(job)
                jobs[key] = job
                rows.append({**row, "kernel": launch.kernel, "constexprs": dict(launch.constexprs),
                             "num_warps": launch.num_warps, "num_stages": launch.num_stages,
                             "job": key})
    keys = list(jobs)
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = dict(zip(keys, pool.map(_compile_cached, [jobs[k] for k in keys])))
    for row in rows:
        key = row.pop("job", None)
        if key is None:
            continue
        result = results[key]
        arch = row["arch"]
        threads = 32 * row["num_warps"]
        fits = (result["shared"] <= ARCHES[arch][1]
                and result["registers"] * threads <= REGISTERS_PER_SM_BLOCK)
        row.update(result, fits=fits, shared_limit=ARCHES[arch][1])
    return rows


def problems(rows: list[dict]) -> list[str]:
    """What the acceptance rule rejects: any launch that does not fit; spills in a preset
    shape's launch; more than SPILL_LIMIT spill bytes per thread elsewhere."""
    out = []
    for r in rows:
        if r["kernel"] is None:
            continue
        where = (f"{r['shape']} (S={r['support_rows']}, Q={r['query_rows']}, steps={r['steps']}) "
                 f"{r['pass']} sm_{r['arch']}: {r['kernel']} {r['constexprs']} "
                 f"warps={r['num_warps']} stages={r['num_stages']}")
        if not r["fits"]:
            out.append(f"{where}: does not fit ({r['shared']} B shared of {r['shared_limit']}, "
                       f"{r['registers']} registers)")
        limit = 0 if r["preset"] else SPILL_LIMIT
        if max(r["spill_stores"], r["spill_loads"]) > limit:
            out.append(f"{where}: spills {r['spill_stores']} B stores, {r['spill_loads']} B loads "
                       f"per thread (allowed: {limit})")
    return out


def format_table(rows: list[dict], arches) -> str:
    """One line per (shape, pass, launch): per architecture shared KB / registers / spills."""
    head = ["shape", "S", "Q", "steps", "pass", "kernel", "constexprs", "warps", "stages"]
    head += [f"sm_{a} shared KB / regs / spill B" for a in arches] + ["fits all"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    grouped: dict = {}
    for r in rows:
        key = (r["shape"], r["support_rows"], r["query_rows"], r["steps"], r["pass"])
        grouped.setdefault(key, []).append(r)
    for (name, s, q, steps, pass_), group in grouped.items():
        first = group[0]
        if first["kernel"] is None:
            cells = [name, s, q, steps, pass_, "none (GEMMs only)", "", "", ""]
            cells += [""] * len(arches) + ["yes"]
        else:
            consts = ", ".join(f"{k}={v}" for k, v in first["constexprs"].items())
            cells = [name, s, q, steps, pass_, first["kernel"].strip("_"), consts,
                     first["num_warps"], first["num_stages"]]
            by_arch = {r["arch"]: r for r in group}
            cells += [f"{by_arch[a]['shared'] / 1024:.1f} / {by_arch[a]['registers']} / "
                      f"{by_arch[a]['spill_stores']}" for a in arches]
            cells.append("yes" if all(r["fits"] for r in group) else "**no**")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def summary_table(rows: list[dict], arches) -> str:
    """Architecture x preset: fits / most registers / most spill bytes, forward and backward."""
    names = [n for n, *_ in PRESET_SHAPES]
    lines = ["| arch | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
    for arch in arches:
        cells = []
        for name in names:
            group = [r for r in rows if r["arch"] == arch and r["shape"] == name and r["preset"]
                     and r["kernel"] is not None]
            fits = all(r["fits"] for r in group)
            regs = max(r["registers"] for r in group)
            spills = max(r["spill_stores"] + r["spill_loads"] for r in group)
            cells.append(f"{'fits' if fits else 'NO FIT'}, ≤{regs} regs, {spills} B spills")
        lines.append(f"| sm_{arch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anil_fast.kernels.report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,86,89,90",
                        help="compute capabilities, comma-separated (80, 86, 89, 90)")
    parser.add_argument("--json", help="also write every row as JSON to this path")
    parser.add_argument("--presets", action="store_true", help="the preset shapes only")
    parser.add_argument("--workers", type=int, default=None, help="compile processes")
    args = parser.parse_args(argv)
    try:
        arches = [int(a) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        parser.error(f"--arch must be comma-separated integers like 80,90, got {args.arch!r}")
    unknown = [a for a in arches if a not in ARCHES]
    if unknown:
        parser.error(f"--arch: unknown {unknown}; known: {sorted(ARCHES)}")
    if os.environ.get("TRITON_INTERPRET") == "1":  # compile in a process without the interpreter
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "anil_fast.kernels.report",
                               *(argv if argv is not None else sys.argv[1:])], env=env).returncode
    from anil_fast.kernels.anil_head import HAVE_TRITON
    if not HAVE_TRITON:
        print("error: triton is not installed", file=sys.stderr)
        return 2
    rows = build_report(arches, args.presets, args.workers)
    print(format_table(rows, arches))
    print()
    print(summary_table(rows, arches))
    found = problems(rows)
    print()
    print("\n".join(f"PROBLEM: {p}" for p in found) if found else
          "every launch fits every architecture; no preset launch spills")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "problems": found}, indent=1))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
