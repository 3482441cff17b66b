"""The GPU check and the scaling model run (tiny, on the CPU, Triton under the interpreter), so
they keep working between the sessions that have a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_on_cpu(tmp_path, omniglot_dir):
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
    assert "Fused head forward+backward" in out.stdout


def test_scaling_model_prints_its_table():
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "benches/scaling_model.py"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| resnet18 | 105 | 44.7 |" in out.stdout
