import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from anil_fast.cli import main
from anil_fast.config import scenario_config
from anil_fast.training.run import TrainingDiverged, load_checkpoint, train

TINY = ["--image-size", "28", "--meta-batch", "2", "--queries", "2", "--test-tasks", "6",
        "--inner-steps", "2", "--checkpoint-every", "2", "--no-progress"]


pytestmark = pytest.mark.usefixtures("offline")  # never a download try (conftest)


def test_convergence_s2_28px(tmp_path, omniglot_dir):
    """s2 at 28 px, 5-way 1-shot, inner lr 0.4, 200 meta-steps of 8 tasks with 10 queries:
    at least 85% after adaptation on 200 test tasks of the evaluation set (88.1% on a 2-core
    AMD EPYC VM, 2026-12-02; 10 queries rather than make demo's 15 keep the suite short)."""
    config = scenario_config("s2", image_size=28, inner_lr=0.4, meta_steps=200, meta_batch=8,
                             queries=10, test_tasks=200, tasks=None, device="cpu")
    start = time.perf_counter()
    summary = train(config, tmp_path, progress=False)
    seconds = time.perf_counter() - start
    ev = summary["evaluation"]
    print(f"convergence: {100 * ev['accuracy_after']:.2f}% ± {100 * ev['ci95_after']:.2f} after, "
          f"{100 * ev['accuracy_before']:.2f}% before, {seconds:.1f} s")
    assert ev["accuracy_after"] >= 0.85
    assert abs(ev["accuracy_before"] - 0.2) < 0.05


def test_train_eval_cli(tmp_path, capsys, omniglot_dir):
    out = tmp_path / "run"
    assert main(["train", "--scenario", "s2", "--meta-steps", "3", "--out", str(out), *TINY]) == 0
    for name in ("checkpoint.pt", "metrics.jsonl", "results.json", "config.json"):
        assert (out / name).exists(), name
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2, 3]
    assert set(json.loads(lines[0])) >= {"loss", "accuracy", "grad_norm", "elapsed_s"}
    assert all(json.loads(ln)["grad_norm"] > 0 for ln in lines)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--tasks", "7", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tasks"] == 7 and {"accuracy_before", "accuracy_after", "ci95_after"} <= set(result)
    assert main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 2


def test_unknown_scenario_or_override_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--scenario", "s9", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["train", "--scenario", "s2", "--colour", "red", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="override"):
        scenario_config("s2", colour="red")
    assert main(["train", "--scenario", "s2", "--inner-steps", "-1", "--out", str(tmp_path)]) == 2


def test_compare_writes_tables_and_plots(tmp_path, omniglot_dir):
    out = tmp_path / "cmp"
    assert main(["compare", "--scenarios", "s1,s2,s3,s4,s5", "--meta-steps", "2",
                 "--out", str(out), *TINY]) == 0
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["scenario"] for r in rows] == ["s1", "s2", "s3", "s4", "s5"]
    for r in rows:
        assert r["accuracy_after"] is not None and r["trainable_parameters"] > 0
        assert r["gpu_utilization"] is None and "RSS" in r["peak_memory"]
    # s4 trains the head and BatchNorm only; s3 trains everything
    assert rows[3]["trainable_parameters"] < rows[2]["trainable_parameters"] / 10
    assert rows[2]["trainable_parameters"] == rows[2]["total_parameters"]
    assert (out / "comparison.md").read_text().count("\n") == 7
    assert (out / "comparison.csv").read_text().count("\n") == 6
    for png in ("loss_curves.png", "accuracy.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, omniglot_dir):
    from anil_fast.training.optim import MetaOptimizer
    original = MetaOptimizer.step
    calls = []

    def diverging(self, batch, **kwargs):  # a loss that turns NaN at the 5th step
        out = original(self, batch, **kwargs)
        calls.append(1)
        if len(calls) >= 5:
            with torch.no_grad():
                self.anil.head.weight.fill_(float("nan"))
            out["loss"] = torch.tensor(float("nan"))
        return out
    monkeypatch.setattr(MetaOptimizer, "step", diverging)
    config = scenario_config("s2", image_size=28, meta_batch=2, queries=2, test_tasks=2,
                             meta_steps=8, checkpoint_every=2, device="cpu")
    with pytest.raises(TrainingDiverged, match="step 5"):
        train(config, tmp_path, progress=False)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert main(["train", "--scenario", "s2", "--meta-steps", "8", "--out", str(tmp_path / "b"),
                 *TINY]) == 3  # the patched step diverges at once: the CLI says so, exit 3


def _final_weights(out):
    return load_checkpoint(out)["model"]


def test_resume_after_kill_gives_identical_weights(tmp_path, omniglot_dir):
    args = [sys.executable, "-m", "anil_fast", "train", "--scenario", "s2", "--meta-steps", "120",
            *TINY, "--checkpoint-every", "3"]
    env = dict(os.environ, ANIL_FAST_OFFLINE="1")
    full = tmp_path / "full"
    subprocess.run([*args, "--out", str(full)], check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once a checkpoint exists, mid-run
        if (killed / "checkpoint.pt").exists():
            break
        time.sleep(0.05)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = load_checkpoint(killed)["step"]
    assert 0 < step < 120, "the run was not interrupted mid-way"
    subprocess.run([*args, "--out", str(killed), "--resume"], check=True, env=env,
                   capture_output=True)
    a, b = _final_weights(full), _final_weights(killed)
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(ln)["step"] for ln in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 121))


def test_device_defaults_to_auto_everywhere():
    from anil_fast.cli import build_parser
    from anil_fast.config import Config
    assert Config().device == "auto"
    parser = build_parser()
    for argv in (["train", "--out", "x"], ["compare", "--out", "x"]):
        assert parser.parse_args(argv).device is None  # no override: the preset's "auto"
    assert parser.parse_args(["eval", "--checkpoint", "x"]).device == "auto"
    assert parser.parse_args(["reproduce", "--suite", "seed", "--out", "x"]).device == "auto"


def test_the_package_holds_only_its_own_modules():
    # no lookup into the checkout: tests/ and benches/ are not part of the package
    for module in ("anil_fast.tests", "anil_fast.benches", "anil_fast.anil_fast"):
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                              text=True, cwd="/")
        assert proc.returncode != 0 and "No module named" in proc.stderr, module
    proc = subprocess.run([sys.executable, "-c", "import anil_fast.kernels.anil_head, "
                           "anil_fast.kernels.report, anil_fast.csrc"], capture_output=True,
                          text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr


def test_loss_spike_guard():
    from anil_fast.training.rollback import LossSpikeGuard
    guard = LossSpikeGuard(2.0)
    assert [guard.spiked(x) for x in (3.0, 1.2, 1.0, 1.9, 2.1, 0.8, 1.7)] == \
        [False, False, False, False, True, False, True]
    assert guard.lowest == 0.8  # spikes never lower it


def _spiking_step(monkeypatch, at_calls):
    """MetaOptimizer.step reporting a 10x loss (weights scrambled) on the given calls."""
    from anil_fast.training.optim import MetaOptimizer
    original, calls = MetaOptimizer.step, []

    def spiking(self, batch, **kwargs):
        out = original(self, batch, **kwargs)
        calls.append(1)
        if len(calls) in at_calls:
            with torch.no_grad():
                self.anil.head.weight.mul_(-3.0)
            out["loss"] = out["loss"] * 10
        return out
    monkeypatch.setattr(MetaOptimizer, "step", spiking)


def test_a_loss_spike_rolls_back_to_the_last_checkpoint_at_half_the_lr(tmp_path, monkeypatch,
                                                                        omniglot_dir):
    _spiking_step(monkeypatch, at_calls={7})
    config = scenario_config("s2", image_size=28, meta_batch=2, queries=2, test_tasks=2,
                             meta_steps=10, checkpoint_every=4, log_every=1, device="cpu",
                             inner_steps=1, spike_rollback=3.0)
    from anil_fast.runs.folder import RunFolder
    kept = {}
    real_save = RunFolder.save_checkpoint

    def remember(self, state, name="checkpoint.pt"):
        kept[state["step"]] = {k: v.clone() for k, v in state["model"].items()}
        return real_save(self, state, name)
    monkeypatch.setattr(RunFolder, "save_checkpoint", remember)
    summary = train(config, tmp_path, progress=False)
    [record] = summary["loss_spike_rollbacks"]
    assert record["step"] == 7 and record["back_to"] == "checkpoint.pt (step 4)"
    assert record["outer_lr_scale"] == 0.5
    assert summary["meta_steps"] == 10  # the step count goes on
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["optimizer"]["lr_scale"] == 0.5 and ckpt["rollbacks"] == [record]
    assert ckpt["optimizer"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0005)
    # without the guard the scrambled head stays; with it the step-8 weights grew from step 4's
    assert not torch.equal(kept[8]["head.weight"], kept[4]["head.weight"])
    assert (kept[8]["head.weight"] - kept[4]["head.weight"]).abs().max() < 0.05


def test_repeated_loss_spikes_stop_the_run_as_diverged(tmp_path, monkeypatch, omniglot_dir):
    from anil_fast.training.rollback import MAX_ROLLBACKS
    _spiking_step(monkeypatch, at_calls=set(range(4, 40)))
    config = scenario_config("s2", image_size=28, meta_batch=2, queries=2, test_tasks=2,
                             meta_steps=40, checkpoint_every=2, log_every=1, device="cpu",
                             inner_steps=1, spike_rollback=3.0)
    with pytest.raises(TrainingDiverged, match=f"after {MAX_ROLLBACKS} rollbacks"):
        train(config, tmp_path, progress=False)


@pytest.mark.parametrize("bad", [1, 0.5, True, float("inf"), "2"])
def test_bad_spike_rollback_is_refused(bad):
    from anil_fast.config import validate_config
    with pytest.raises(ValueError, match="spike_rollback"):
        validate_config(scenario_config("std-5w1s", spike_rollback=bad))
