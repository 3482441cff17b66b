"""The kernel report: every launch the Triton launchers choose for the preset shapes compiles
for sm_80/86/89/90 within the shared memory per block and without register spills. Compiled
ahead of time on the CPU (no GPU needed), in a process without TRITON_INTERPRET."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from anil_fast.kernels import report  # noqa: E402


def test_every_preset_launch_fits_and_does_not_spill(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "anil_fast.kernels.report", "--presets",
                           "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert out.exists(), proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["problems"] == [], "\n".join(result["problems"])
    assert proc.returncode == 0
    compiled = [r for r in result["rows"] if r["kernel"]]
    assert {r["arch"] for r in compiled} == {80, 86, 89, 90}
    assert {r["shape"] for r in compiled} == {name for name, *_ in report.PRESET_SHAPES}
    assert all(r["registers"] > 0 and r["shared"] > 0 for r in compiled)
    print(report.summary_table(result["rows"], [80, 86, 89, 90]))


def _row(**changes):
    row = {"shape": "x", "support_rows": 5, "query_rows": 5, "steps": 5, "pass": "forward",
           "arch": 86, "kernel": "_inner_loop_fwd_kernel", "constexprs": {}, "num_warps": 4,
           "num_stages": 1, "shared": 1024, "shared_limit": 99 * 1024, "registers": 64,
           "spill_stores": 0, "spill_loads": 0, "fits": True, "preset": True}
    row.update(changes)
    return row


def test_the_acceptance_rule_can_fail():
    assert report.problems([_row()]) == []
    assert "does not fit" in report.problems([_row(fits=False, shared=112 * 1024)])[0]
    assert "spills" in report.problems([_row(spill_stores=4, spill_loads=4)])[0]
    # beyond the presets a few bytes are tolerated, not more than SPILL_LIMIT
    assert report.problems([_row(preset=False, spill_stores=8, spill_loads=8)]) == []
    assert report.problems([_row(preset=False, spill_stores=report.SPILL_LIMIT + 4)])


def test_launchers_and_report_share_one_decision():
    from anil_fast.kernels import anil_head
    shape = report.Shape("x", 20, 5, 5, 5, True)
    chosen = dict(report.launches(shape))
    assert chosen["forward"] == anil_head.forward_launch(100, 100, 20)
    assert chosen["backward, second order"] == anil_head.reverse_launch(100, 20)
    assert chosen["backward, first order"] is None
