"""`anil-fast bench` and `make gpu-acceptance` work on the CPU (smoke runs: their numbers are
not results) and fail loudly: a variant that disagrees with the reference fails the bench, a
step that fails or overruns does not stop the acceptance's next step."""
import json
import sys
from pathlib import Path

import pytest

from anil_fast import cli
from anil_fast.measure import bench

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_writes_every_column_with_the_baselines(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["quick"] and "Smoke run" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    for _, label in bench.COLUMNS:
        assert label in text
    rows = record["rows"]
    variants = {(r["case"], r["variant"]) for r in rows}
    for case in bench.QUICK_CASES:
        for name in ("loop", "vmap", "reference", "fused", "fused+compile", "fused+batched",
                     "fused+nchw", "floor: body fp32",
                     "floor: head fused", "floor: head reference"):
            assert (case, name) in variants
    measured = [r for r in rows if not r["variant"].startswith("floor")]
    assert all(r["correct"] and r["it_s"] > 0 and r["max_rel_error"] <= r["tolerance"]
               for r in measured)
    assert record["info"]["torch"] and record["info"]["cpu"]


def test_a_variant_that_disagrees_with_the_reference_fails_the_bench(monkeypatch, capsys):
    monkeypatch.setattr(bench, "QUICK_CASES", ("s2",))
    monkeypatch.setattr(bench, "variants_for", lambda device: [
        bench.Variant("loop", "fp32"), bench.Variant("fused", "fp32")])
    real = bench._anil_stepper

    def wrong_inner_lr(case, variant, device, quick):  # a fused path with a bug in it
        step, anil = real(case, variant, device, quick)
        if variant.name == "fused":
            anil.inner_lr *= 1.5
        return step, anil
    monkeypatch.setattr(bench, "_anil_stepper", wrong_inner_lr)
    assert cli.main(["bench", "--quick", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "s2 fused fp32: check failed" in err and "loop fp32: check" not in err


@pytest.mark.parametrize("cases, word", [("nope", "unknown preset"), ("s2@x", "pixels"),
                                         (",", "at least one")])
def test_bench_names_bad_cases(cases, word, capsys):
    assert cli.main(["bench", "--cases", cases, "--device", "cpu"]) == 2
    assert word in capsys.readouterr().err


def _acceptance():
    sys.path.insert(0, str(ROOT / "benches"))
    try:
        import gpu_acceptance
    finally:
        sys.path.pop(0)
    return gpu_acceptance


def test_acceptance_keeps_going_past_a_failing_or_overrunning_step(tmp_path):
    acceptance = _acceptance()
    py = sys.executable
    plan = [{"name": "overruns", "command": [py, "-c", "import time; time.sleep(60)"], "share": 0.1},
            {"name": "fails", "command": [py, "-c", "raise SystemExit(3)"], "share": 0.3},
            {"name": "works", "command": [py, "-c", "import sys; print('fine', sys.argv[1])",
                                          acceptance.PRESET_BUDGET], "share": None}]
    records = acceptance.run_all(tmp_path, 20.0, "cpu", True, plan)
    assert [r["name"] for r in records] == ["overruns", "fails", "works"]
    assert [r["status"] for r in records] == ["timed out", "failed", "ok"]
    assert records[0]["seconds"] < 10 and "fine" in records[2]["tail"]
    # the last step's per-preset budget is filled in from the time it is given
    assert acceptance.PRESET_BUDGET not in records[2]["command"]
    assert records[2]["tail"].split()[-1] == records[2]["command"].split()[-1]
    assert json.loads((tmp_path / "steps.json").read_text()) == records
    text = acceptance.summary(tmp_path, records, quick=True)
    assert "| overruns | timed out |" in text and "Smoke run" in text


def test_acceptance_runs_every_step_in_order_on_the_cpu(tmp_path):
    acceptance = _acceptance()
    code = acceptance.main(["--budget-s", "25", "--device", "cpu", "--quick",
                            "--out", str(tmp_path)])
    (out,) = tmp_path.iterdir()
    result = json.loads((out / "summary.json").read_text())
    names = [r["name"] for r in result["steps"]]
    assert names == ["gpu-check", "kernel-report", "bench", "seed-scenarios", "paper-suite"]
    assert all(r["status"] in ("ok", "failed", "timed out") for r in result["steps"])
    assert all(r["seconds"] <= r["limit_s"] + 10 for r in result["steps"])
    assert code == (0 if all(r["status"] == "ok" for r in result["steps"]) else 1)
    assert (out / "summary.md").exists() and {t["target"] for t in result["targets"]}
