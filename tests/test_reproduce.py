"""Training to a time budget, validation-based checkpoint selection, learning-rate schedules
and `anil-fast reproduce` (smoke runs of both suites, as CI runs them)."""
import json
import math
import time

import pytest

from anil_fast.training.optim import MetaOptimizer
from anil_fast.cli import main
from anil_fast.runs.folder import load_checkpoint
from anil_fast.config import scenario_config
from anil_fast.runs.settings import resolve
from anil_fast.training.schedules import lr_factor, progress
from anil_fast.evaluation import evaluate_checkpoint
from anil_fast.training.run import train


@pytest.fixture(autouse=True)
def offline(monkeypatch, omniglot_dir):
    monkeypatch.setenv("ANIL_FAST_OFFLINE", "1")


def tiny(scenario="s2", **overrides):
    values = dict(image_size=28, meta_batch=2, queries=2, test_tasks=8, inner_steps=1,
                  meta_steps=4, checkpoint_every=2, tasks=None, device="cpu")
    values.update(overrides)
    return scenario_config(scenario, **values)


# -- time budget ----------------------------------------------------------------------------------

def test_a_time_budget_ends_the_run(tmp_path):
    summary = train(tiny(meta_steps=None, time_budget=1.5), tmp_path / "run", progress=False)
    assert summary["stopped_by"] == "time budget"
    assert 1.5 <= summary["train_time_s"] < 4.0
    assert summary["meta_steps"] == load_checkpoint(tmp_path / "run")["step"] > 1
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, summary["meta_steps"] + 1))
    # meta-steps stay an upper bound beside the budget
    summary = train(tiny(meta_steps=3, time_budget=60.0), tmp_path / "capped", progress=False)
    assert summary["stopped_by"] == "steps" and summary["meta_steps"] == 3


def test_one_time_costs_are_kept_off_the_training_clock(tmp_path, monkeypatch):
    original, calls = MetaOptimizer.step, []

    def slow_first_step(self, batch, **kwargs):  # like a compile or a CUDA-graph capture
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)
        return original(self, batch, **kwargs)
    monkeypatch.setattr(MetaOptimizer, "step", slow_first_step)
    summary = train(tiny(meta_steps=4), tmp_path / "run", progress=False)
    assert summary["one_time_s"]["first_step_s"] >= 1.0
    assert summary["train_time_s"] < 1.0
    assert "backend_build_s" in summary["one_time_s"] and "data_and_model_s" in summary["one_time_s"]
    assert summary["it_s"] == pytest.approx(3 / summary["train_time_s"])  # steps 2-4
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and len(set(elapsed[1:])) == 3  # one time per step


# -- validation and model selection ---------------------------------------------------------------

def _scripted_validation(monkeypatch, scores):
    """Validation accuracies by step (the test evaluations run for real)."""
    import anil_fast.training.run as trainer
    real, real_step, steps = trainer.evaluate, MetaOptimizer.step, [0]

    def step(self, batch, **kwargs):
        out = real_step(self, batch, **kwargs)
        steps.append(self.steps)
        return out

    def evaluate(anil, sampler, tasks, *args, **kwargs):
        result = real(anil, sampler, tasks, *args, **kwargs)
        if sampler.seed >= 20_000:  # the validation sampler
            result["accuracy_after"] = scores[steps[-1]]
        return result
    monkeypatch.setattr(MetaOptimizer, "step", step)
    monkeypatch.setattr(trainer, "evaluate", evaluate)


def std_tiny(**overrides):
    values = dict(validation=30, val_every=2, val_every_s=None, val_tasks=6, meta_batch=2,
                  test_tasks=8, meta_steps=6, checkpoint_every=2, log_every=2)
    values.update(overrides)
    return scenario_config("std-5w1s", device="cpu", **values)


def test_the_best_validation_checkpoint_is_tested(tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, {2: 0.9, 4: 0.5, 6: 0.7})
    out = tmp_path / "run"
    summary = train(std_tiny(), out, progress=False)
    records = [json.loads(ln) for ln in (out / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert summary["validation"]["best"]["step"] == 2 and "step 2" in summary["selected"]
    assert load_checkpoint(out / "best.pt")["step"] == 2
    assert load_checkpoint(out)["step"] == 6
    best = evaluate_checkpoint(out / "best.pt", tasks=8, device="cpu", progress=False)
    last = evaluate_checkpoint(out, tasks=8, device="cpu", progress=False, weights="last")
    assert summary["evaluation"]["accuracy_after"] == best["accuracy_after"]
    assert summary["evaluation_last"]["accuracy_after"] == last["accuracy_after"]
    # a run folder is scored as train scored it (best.pt), and the result says which
    default = evaluate_checkpoint(out, tasks=8, device="cpu", progress=False)
    assert default["accuracy_after"] == best["accuracy_after"]
    assert default["weights"] == "best validation (step 2)" and last["weights"] == "last (step 6)"
    with pytest.raises(ValueError, match="--weights chooses a file of a run folder"):
        evaluate_checkpoint(out / "best.pt", tasks=8, device="cpu", weights="last")


def test_resume_keeps_the_best_so_far(tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, {2: 0.9, 4: 0.5, 6: 0.7, 8: 0.6})
    out = tmp_path / "run"
    train(std_tiny(meta_steps=4), out, progress=False)
    summary = train(std_tiny(meta_steps=8), out, resume=True, progress=False)
    assert summary["validation"]["best"]["step"] == 2
    assert [r["step"] for r in summary["validation"]["records"]] == [2, 4, 6, 8]
    assert load_checkpoint(out / "best.pt")["step"] == 2


def test_validation_needs_the_standard_protocol():
    with pytest.raises(ValueError, match="standard"):
        resolve(tiny(validation=10, val_every=2))
    with pytest.raises(ValueError, match="validation"):
        resolve(scenario_config("std-5w1s", validation=0))  # the preset validates every 30 s


# -- schedules ------------------------------------------------------------------------------------

def test_schedule_factors():
    assert lr_factor("constant", 0.7) == 1.0
    assert lr_factor("cosine", 0.0, 0.1) == pytest.approx(1.0)
    assert lr_factor("cosine", 0.5, 0.1) == pytest.approx(0.55)
    assert lr_factor("cosine", 1.0, 0.1) == pytest.approx(0.1)
    assert [lr_factor("step", p) for p in (0.2, 0.6, 0.9)] == [1.0, 0.1, 0.01]
    assert progress(5, 10, 0.0, None) == 0.5 and progress(1, 10, 30.0, 60.0) == 0.5
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor("linear", 0.5)


def test_a_cosine_schedule_reaches_the_optimizer(tmp_path, monkeypatch):
    original, seen = MetaOptimizer.step, []

    def recording(self, batch, **kwargs):
        out = original(self, batch, **kwargs)  # sets the groups' lr, then steps
        seen.append({g["name"]: g["lr"] for g in self.optimizer.param_groups})
        return out
    monkeypatch.setattr(MetaOptimizer, "step", recording)
    train(tiny(lr_schedule="cosine", lr_floor=0.1, outer_lr=0.002), tmp_path / "run",
          progress=False)
    expected = [0.002 * lr_factor("cosine", s / 4, 0.1) for s in range(4)]
    assert [lrs["head"] for lrs in seen] == pytest.approx(expected)
    assert all(math.isclose(v, lrs["head"]) for lrs in seen for v in lrs.values())


# -- anil-fast reproduce ---------------------------------------------------------------------------

@pytest.mark.parametrize("suite, presets", [
    ("paper", ["std-5w1s", "std-5w5s", "std-20w1s", "std-20w5s"]),
    ("seed", ["s1", "s2", "s3", "s4", "s5"])])
def test_reproduce_smoke(suite, presets, tmp_path, capsys):
    out = tmp_path / suite
    assert main(["reproduce", "--suite", suite, "--smoke", "--device", "cpu", "--out", str(out),
                 "--no-progress"]) == 0
    rows = json.loads((out / "reproduce.json").read_text())
    assert [r["preset"] for r in rows] == presets
    for r in rows:
        assert r["run"] == "smoke" and r["reference_accuracy"] > 70
        assert r["gap_points"] == pytest.approx(r["accuracy"] - r["reference_accuracy"], abs=0.011)
        assert 0 <= r["accuracy"] <= 100 and r["reference_source"]
        assert r["gain"] == pytest.approx(r["accuracy"] - r["before"], abs=0.011)
        if suite == "paper":
            assert r["selected"].startswith("best validation")
        assert r["head_init"] == ("proto" if suite == "paper" else "learned")
    md = (out / "reproduce.md").read_text()
    assert md.startswith("**Smoke run**") and md.count("\n| ") == len(presets) + 2  # + header, rule
    assert (out / "reproduce.csv").read_text().count("\n") == len(presets) + 1
    assert (out / "accuracy_vs_time.png").read_bytes()[:4] == b"\x89PNG"
    assert "reference" in capsys.readouterr().out.lower()


def test_reproduce_over_seeds_reports_mean_and_spread(tmp_path, capsys):
    out = tmp_path / "seeds"
    assert main(["reproduce", "--suite", "seed", "--presets", "s2", "--seeds", "3", "--smoke",
                 "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    [row] = json.loads((out / "reproduce.json").read_text())
    assert row["preset"] == "s2" and row["seeds"] == 3
    per_seed = row["per_seed"]
    assert [r["seed"] for r in per_seed] == [0, 1, 2]
    accuracies = [r["accuracy"] for r in per_seed]
    assert row["accuracy"] == pytest.approx(sum(accuracies) / 3, abs=0.01)
    import statistics
    assert row["std"] == pytest.approx(statistics.stdev(accuracies), abs=0.01)
    for k in range(3):  # each seed a run folder of its own, trained with its seed
        assert json.loads((out / "s2" / f"seed{k}" / "config.json").read_text())["seed"] == k
    assert "± std over seeds" in (out / "reproduce.md").read_text()
    assert (out / "accuracy_vs_time.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["reproduce", "--suite", "seed", "--presets", "std-5w1s", "--smoke",
                 "--out", str(tmp_path / "bad")]) == 2
    assert main(["reproduce", "--suite", "seed", "--seeds", "0", "--smoke",
                 "--out", str(tmp_path / "bad")]) == 2


def test_reproduce_takes_overrides_and_names_them(tmp_path, capsys):
    out = tmp_path / "learned"
    assert main(["reproduce", "--suite", "paper", "--presets", "std-5w1s", "--smoke",
                 "--device", "cpu", "--out", str(out), "--no-progress", "--head-init", "learned",
                 "--precision", "fp32", "--clip-grad-norm", "5"]) == 0
    [row] = json.loads((out / "reproduce.json").read_text())
    assert row["head_init"] == "learned" and row["precision"] == "fp32"
    # the learned head's preset settings (config.learned_head_settings), named in the row
    assert (row["feature_norm"], row["inner_lr"], row["order"]) == ("unit", 5.0, "second")
    config = json.loads((out / "std-5w1s" / "config.json").read_text())
    assert config["head_init"] == "learned" and config["clip_grad_norm"] == 5
    md = (out / "reproduce.md").read_text()
    assert "| head init | head's features | inner lr | outer lr | order | precision |" in md
    # the learned head trains on std-5w1s's plain 5-way tasks (config.PLAIN_RECIPE)
    assert (row["ways"], row["trained_on"]) == (5, "5-way x 2")
    assert "| training tasks a step | head init |" in md and "| 5-way x 2 | learned |" in md
    assert "| learned | unit | 5 | 0.001 | second | fp32 |" in md
    assert main(["reproduce", "--suite", "paper", "--presets", "std-5w1s", "--smoke",
                 "--out", str(tmp_path / "bad"), "--head-init", "magic"]) == 2
    assert "head_init" in capsys.readouterr().err


def test_a_row_names_its_training_tasks_beside_its_test_ways():
    """std-5w1s trains on 10-way tasks and is scored on 5-way ones: the row's ways are the
    test tasks' (those of its reference), its training tasks a column of their own."""
    from anil_fast.data.references import references
    from anil_fast.experiments.reproduce import row_of, suite_configs
    [config] = suite_configs("paper", device="cpu", smoke=True, presets=["std-5w1s"])
    evaluation = dict(accuracy_after=0.981, ci95_after=0.002, accuracy_before=0.981, gain=0.0,
                      tasks=10, bn_mode="transductive")
    summary = dict(evaluation=evaluation, model="conv4", precision="fp32", train_time_s=2.0,
                   it_s=3.0, meta_steps=6, device="cpu")
    row = row_of("paper", summary, config, True, references())
    assert (row["ways"], row["trained_on"]) == (5, "10-way x 2")
    assert row["outer_lr"] == 0.008  # the recipe's own outer lr (config.PROTO_RECIPE)
    assert row["reference"].startswith("MAML 98.7") and row["gap_points"] == pytest.approx(-0.6)
