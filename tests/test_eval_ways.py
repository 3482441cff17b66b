"""--eval-ways: a model that trains on tasks of more ways than it is scored on (validation and
test tasks of eval_ways classes, served by the head's first rows), wired through training's
validation, the end-of-run test, eval, the summary and the refusals."""
import json

import pytest
import torch

from anil_fast.config import describe_model, scenario_config
from anil_fast.evaluation import evaluate_checkpoint
from anil_fast.runs.build import own_rng, task_sampler
from anil_fast.runs.load import load_run
from anil_fast.training.run import train
from helpers import run_cli

pytestmark = pytest.mark.usefixtures("omniglot_dir", "offline")


def test_a_run_trains_at_its_ways_and_is_scored_at_eval_ways(tmp_path, capsys):
    config = scenario_config("std-5w1s", ways=7, eval_ways=3, meta_steps=3, meta_batch=2,
                             queries=2, val_tasks=5, val_every=2, test_tasks=9, device="cpu",
                             precision="fp32", seed=4)
    assert (config.ways, config.test_ways) == (7, 3)
    assert task_sampler(config, "train", "cpu").ways == 7
    assert task_sampler(config, "validation", "cpu").ways == task_sampler(config, "test", "cpu").ways == 3
    summary = train(config, tmp_path / "run", progress=False)
    assert summary["validation"]["best"] is not None  # validated on 3-way tasks
    assert describe_model(config).endswith("; trained with 7-way tasks, scored on 3-way ones")
    run = load_run(tmp_path / "run", None, "cpu")
    assert run.anil.head.out_features == 7
    with own_rng(run.settings.device), torch.no_grad():  # the test pool, scored by hand
        sampler = task_sampler(run.settings.config, "test", run.settings.device, 9)
        after = []
        for indices in sampler.evaluation_indices(9):
            batch = sampler.materialise(indices)
            assert int(batch.query_y.max()) == 2
            _, logits = run.anil.adapted_logits(batch, None, config.bn_mode, ways=3)
            after.append((logits.argmax(-1) == batch.query_y).float().mean(1))
    expected = torch.cat(after).mean().item()
    result = evaluate_checkpoint(tmp_path / "run", 9, device="cpu", progress=False)
    assert result["accuracy_after"] == pytest.approx(expected, abs=1e-6)
    assert summary["evaluation"]["tasks"] == 9
    code, text = run_cli(capsys, "eval", "--checkpoint", tmp_path / "run", "--tasks", 4,
                         "--test-shifts", 1, "--json")
    assert code == 0 and json.loads(text.strip().splitlines()[-1])["tasks"] == 4, text


def test_the_summary_keeps_the_presets_reference_for_a_run_scored_at_its_ways(tmp_path, capsys):
    code, text = run_cli(capsys, "train", "--scenario", "std-5w1s", "--ways", 6, "--eval-ways", 5,
                         "--meta-steps", 1, "--meta-batch", 2, "--queries", 1, "--val-tasks", 2,
                         "--test-tasks", 2, "--device", "cpu", "--no-progress",
                         "--out", tmp_path / "six")
    assert code == 0, text
    assert "trained with 6-way tasks, scored on 5-way ones" in text
    assert "reference: " in text and "this run changed" in text and "ways" in text, text
    assert "none printed" not in text, text
    code, text = run_cli(capsys, "train", "--scenario", "std-5w1s", "--ways", 6, "--meta-steps", 1,
                         "--meta-batch", 2, "--queries", 1, "--val-tasks", 2, "--test-tasks", 2,
                         "--device", "cpu", "--no-progress", "--out", tmp_path / "six-way-test")
    assert code == 0 and "none printed" in text and "test_ways" in text, text


@pytest.mark.parametrize("value", ["1", "6"])
def test_eval_ways_outside_2_to_ways_is_refused(value, tmp_path, capsys):
    code, text = run_cli(capsys, "train", "--scenario", "std-5w5s", "--eval-ways", value,
                         "--out", tmp_path / "run")
    assert code == 2 and "eval_ways must be an int in 2..ways (5)" in text, text
    assert not (tmp_path / "run").exists()


# -- std-5w1s's preset: its prototype head trains on 10-way tasks, one a step, outer lr 0.008 -----

@pytest.mark.parametrize("overrides, expected, note", [
    ({}, (10, 1, 5, 0.008), False),  # the preset: 10-way training tasks, one a step, scored 5-way
    ({"meta_batch": 4}, (10, 4, 5, 0.008), False),
    ({"eval_ways": 3}, (10, 1, 3, 0.008), False),
    ({"outer_lr": 0.002}, (10, 1, 5, 0.002), False),
    ({"ways": 10}, (10, 1, 5, 0.008), False),  # the preset's own ways: its recipe stays
    ({"head_init": "proto"}, (10, 1, 5, 0.008), False),
    ({"ways": 6}, (6, 8, 6, 0.001), True),  # --ways N: N-way tasks in training and test, 8 a step
    ({"ways": 6, "meta_batch": 3}, (6, 3, 6, 0.001), True),
    ({"ways": 7, "eval_ways": 4}, (7, 8, 4, 0.001), True),
    ({"ways": 7, "outer_lr": 0.003}, (7, 8, 7, 0.003), True),  # what a run sets stays
    ({"head_init": "learned"}, (5, 8, 5, 0.001), True),  # the learned head was measured on these
    ({"head_init": "zero", "meta_batch": 2}, (5, 2, 5, 0.001), True),
])
def test_std_5w1s_trains_on_10_way_tasks_unless_a_run_sets_its_ways_or_head(overrides, expected,
                                                                             note):
    config = scenario_config("std-5w1s", **overrides)
    assert (config.ways, config.meta_batch, config.test_ways, config.outer_lr) == expected
    assert any("the preset's plain recipe" in n for n in config.notes) == note, config.notes
    if overrides.get("head_init") == "learned":  # its inner lr follows the ways it trains on
        assert config.inner_lr == 5.0


def test_the_plain_recipe_is_the_family_s_own():
    """What std-5w1s gives back to a run with its own ways or head is what the other standard
    presets use: their ways, 8 tasks a step, the default outer lr."""
    from anil_fast.config import PLAIN_RECIPE
    family = scenario_config("std-20w1s")
    assert PLAIN_RECIPE["std-5w1s"] == dict(ways=5, meta_batch=family.meta_batch, eval_ways=None,
                                            outer_lr=family.outer_lr)
    assert "outer_lr 0.001" in scenario_config("std-5w1s", ways=6).notes[0]


# -- lake-20w1s's preset: its prototype head trains on one 20-way task a step, outer lr 0.004 -------

@pytest.mark.parametrize("overrides, expected, note", [
    ({}, (20, 1, 20, 0.004), False),  # the preset: one task a step
    ({"meta_batch": 3}, (20, 3, 20, 0.004), False),
    ({"outer_lr": 0.002}, (20, 1, 20, 0.002), False),
    ({"eval_ways": 10}, (20, 1, 10, 0.004), False),
    ({"ways": 20}, (20, 1, 20, 0.004), False),  # the preset's own ways: its recipe stays
    ({"ways": 10}, (10, 8, 10, 0.001), True),  # --ways N: the family's 8 tasks a step
    ({"ways": 10, "meta_batch": 2}, (10, 2, 10, 0.001), True),
    ({"ways": 15, "outer_lr": 0.003}, (15, 8, 15, 0.003), True),  # what a run sets stays
    ({"head_init": "learned"}, (20, 8, 20, 0.001), True),  # the learned head was measured on these
    ({"head_init": "zero", "outer_lr": 0.002}, (20, 8, 20, 0.002), True),
])
def test_lake_20w1s_trains_one_task_a_step_unless_a_run_sets_its_ways_or_head(overrides,
                                                                              expected, note):
    config = scenario_config("lake-20w1s", **overrides)
    assert (config.ways, config.meta_batch, config.test_ways, config.outer_lr) == expected
    assert any("the preset's plain recipe" in n for n in config.notes) == note, config.notes
    # the rest of the preset is Lake's protocol whatever the recipe
    assert (config.protocol, config.within_alphabet, config.augment_shift) == ("background", 0.5, 2)
    if overrides.get("head_init") == "learned":
        assert config.inner_lr == 20.0


def test_the_lake_preset_s_plain_recipe_is_std_20w1s_s():
    from anil_fast.config import PLAIN_RECIPE
    family = scenario_config("std-20w1s")
    assert PLAIN_RECIPE["lake-20w1s"] == dict(meta_batch=family.meta_batch,
                                              outer_lr=family.outer_lr) == dict(meta_batch=8,
                                                                                outer_lr=0.001)
    note = scenario_config("lake-20w1s", head_init="learned").notes[0]
    assert "the preset's plain recipe, not the one it trains the prototype head with: " \
           "meta_batch 8, outer_lr 0.001" in note, note


def test_a_lake_20w1s_run_records_its_recipe(tmp_path, capsys):
    common = ("--meta-steps", 1, "--queries", 1, "--val-tasks", 2, "--test-tasks", 2,
              "--device", "cpu", "--no-progress")
    code, text = run_cli(capsys, "train", "--scenario", "lake-20w1s", *common, "--out", tmp_path / "p")
    assert code == 0, text
    recorded = json.loads((tmp_path / "p" / "config.json").read_text())
    assert (recorded["meta_batch"], recorded["outer_lr"]) == (1, 0.004)
    assert "the preset's plain recipe" not in text, text


def test_the_other_std_presets_train_on_their_test_tasks():
    for name in ("std-5w5s", "std-20w1s", "std-20w5s"):
        config = scenario_config(name)
        assert config.ways == config.test_ways and config.meta_batch == 8 and not config.notes


def test_the_std_5w1s_preset_keeps_its_reference_uncaveated(tmp_path, capsys):
    """The preset's own run (10-way training, 5-way test) and its learned-head run (the plain
    5-way tasks) both print MAML's number with no caveat about ways (only about the tiny run's
    queries and test tasks), and say what they trained on."""
    common = ("--meta-steps", 1, "--queries", 1, "--val-tasks", 2, "--test-tasks", 2,
              "--device", "cpu", "--no-progress")
    code, text = run_cli(capsys, "train", "--scenario", "std-5w1s", *common, "--out", tmp_path / "p")
    assert code == 0 and "trained with 10-way tasks, scored on 5-way ones" in text, text
    assert "reference: MAML" in text and "this run changed queries, test_tasks)" in text, text
    assert json.loads((tmp_path / "p" / "config.json").read_text())["meta_batch"] == 1
    code, text = run_cli(capsys, "train", "--scenario", "std-5w1s", "--head-init", "learned",
                         *common, "--out", tmp_path / "l")
    assert code == 0 and "reference: MAML" in text, text
    assert "this run changed queries, test_tasks)" in text, text
    assert "scored on" not in text and "the preset's plain recipe" in text, text
