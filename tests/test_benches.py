"""The GPU check and the scaling model run (tiny, on the CPU, Triton under the interpreter), so
they keep working between the sessions that have a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_on_cpu(tmp_path):  # random problems: no data needed
    env = dict(os.environ, TRITON_INTERPRET="1")  # the installed package, no PYTHONPATH
    out = subprocess.run([sys.executable, "benches/gpu_check.py", "--device", "cpu", "--json",
                          str(tmp_path / "check.json")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["correct"] and result["check"] and result["head"] and result["steps"]
    # a row that records an error is a failure, not a result
    errors = [r for r in result["head"] if str(r.get("order", "")).startswith(("error", "skipped"))]
    errors += [r for r in result["steps"] if r.get("case") == "error"]
    assert not errors, errors
    assert result["errors"] == []
    assert "Fused head forward+backward" in out.stdout


def test_gpu_check_fails_on_an_error_cell(tmp_path, monkeypatch):
    # a variant that errors (e.g. a CUDA-graph capture) is recorded, the rest still runs, and
    # the check exits non-zero: an "error: ..." cell is a failure, not a result
    monkeypatch.syspath_prepend(str(ROOT / "benches"))
    import gpu_check
    from anil_fast.models import ops
    monkeypatch.setattr(ops, "CPU_LOOP", ops.CPU_LOOP)  # gpu_check's CPU smoke switches it

    def broken_steps(device, quick):
        return [{"case": "s2 conv4 28px", "per-task it/s": 3.0,
                 "fast bf16+graph it/s": "error: RuntimeError: capture failed"}]
    monkeypatch.setattr(gpu_check, "time_meta_steps", broken_steps)
    monkeypatch.setattr(gpu_check, "check_correctness", lambda device, shapes: ([{"ok": "yes"}], True))
    monkeypatch.setattr(gpu_check, "time_head", lambda device, quick, deadline: ([], None))
    code = gpu_check.main(["--device", "cpu", "--json", str(tmp_path / "check.json")])
    result = json.loads((tmp_path / "check.json").read_text())
    assert code == 1
    assert result["correct"] and result["errors"] == [
        "s2 conv4 28px fast bf16+graph it/s: error: RuntimeError: capture failed"]


def test_scaling_model_prints_its_table():
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "benches/scaling_model.py"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| resnet18 | 105 | 44.7 |" in out.stdout
