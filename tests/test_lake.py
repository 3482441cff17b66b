"""Lake et al.'s 20 official one-shot runs: read and checked, keyed to the evaluation set's
characters; a background-trained 20-way model is scored on them, and a model whose training
characters include theirs (the standard split) is refused, naming how many."""
import json

import pytest

from anil_fast.use.lake import WAYS, load_runs, run_characters, score_lake_runs, training_characters
from anil_fast.config import describe_model, scenario_config
from anil_fast.training.run import train
from helpers import run_cli

pytestmark = pytest.mark.usefixtures("omniglot_dir", "offline")


@pytest.fixture(scope="module")
def runs(omniglot_dir):
    if not (omniglot_dir / "one_shot_runs.zip").is_file():
        pytest.skip("one_shot_runs.zip not in ANIL_FAST_DATA/omniglot")
    return load_runs()


def test_the_runs_are_drawings_of_200_evaluation_characters(runs):
    assert len(runs) == 20
    for run in runs:
        assert len(run.training) == len(run.test) == WAYS
        assert sorted(run.answers) == list(range(WAYS))
        assert {im.size for im in run.training + run.test} == {(105, 105)}
    characters = run_characters(runs)
    assert len(characters) == 200 and max(characters) < 659
    standard = training_characters(scenario_config("std-20w1s"))
    assert len(standard & characters) == 152  # the standard split's 1,200 hold most of them
    assert training_characters(scenario_config("s2")) == set()  # the background set only


def test_a_background_model_is_scored_and_a_standard_one_refused(runs, tmp_path, capsys):
    config = scenario_config("s2", ways=WAYS, image_size=28, meta_steps=3, meta_batch=2,
                             queries=1, test_tasks=2, tasks=None, device="cpu", inner_lr=0.4)
    train(config, tmp_path / "seed", progress=False)
    result = score_lake_runs(tmp_path / "seed", device="cpu")
    assert len(result["per_run"]) == 20 and result["items"] == 400
    assert all(round(20 * e) == 20 * e for e in result["per_run"])  # whole items of 20
    assert result["error"] == pytest.approx(sum(result["per_run"]) / 20)
    assert [r["method"] for r in result["references"]][:2] == ["people", "Bayesian Program Learning"]
    code, text = run_cli(capsys, "eval", "--checkpoint", tmp_path / "seed", "--lake-runs",
                         "--device", "cpu", "--json")
    assert code == 0 and json.loads(text.strip().splitlines()[-1])["error"] == result["error"]
    code, text = run_cli(capsys, "eval", "--checkpoint", tmp_path / "seed", "--split",
                         "validation", "--device", "cpu")
    assert code == 2 and "held no Omniglot characters out of training" in text, text
    code, text = run_cli(capsys, "eval", "--checkpoint", tmp_path / "seed", "--split",
                         "validation", "--lake-runs", "--device", "cpu")
    assert code == 2 and "--split validation does not apply" in text, text
    standard = scenario_config("std-20w1s", meta_steps=2, meta_batch=2, queries=1, test_tasks=2,
                               val_tasks=4, device="cpu", precision="fp32")
    train(standard, tmp_path / "std", progress=False)
    code, text = run_cli(capsys, "eval", "--checkpoint", tmp_path / "std", "--lake-runs",
                         "--device", "cpu")
    assert code == 2 and "trained or validated on 152 of the runs' characters" in text, text
    five = scenario_config("s2", image_size=28, meta_steps=1, meta_batch=2, queries=1,
                           test_tasks=2, tasks=None, device="cpu")
    train(five, tmp_path / "five", progress=False)
    code, text = run_cli(capsys, "eval", "--checkpoint", tmp_path / "five", "--lake-runs",
                         "--device", "cpu")
    assert code == 2 and "serves 5 ways" in text


def test_the_background_protocol_holds_validation_out_of_the_background_set(runs, tmp_path,
                                                                           capsys):
    from anil_fast.data import load_split
    from anil_fast.data.tasks import background_characters
    train_chars = set(background_characters("train", 100).tolist())
    val_chars = set(background_characters("validation", 100).tolist())
    assert len(train_chars) == 864 and len(val_chars) == 100 and not train_chars & val_chars
    assert train_chars | val_chars == set(range(964))
    assert load_split("background", "validation", 28, validation=100).shape[0] == 100
    assert load_split("background", "test", 28).shape[0] == 659
    config = scenario_config("lake-20w1s", meta_steps=2, meta_batch=2, queries=1, test_tasks=2,
                             val_tasks=4, device="cpu", precision="fp32")
    summary = train(config, tmp_path / "bg", progress=False)
    assert summary["validation"]["best"] is not None  # validated on background characters
    assert len(score_lake_runs(tmp_path / "bg", device="cpu")["per_run"]) == 20  # accepted
    # the preset trains as the runs test: tasks within one alphabet, shifted images
    assert (config.within_alphabet, config.augment_shift) == (0.5, 2)
    assert describe_model(config).endswith("; trained with 50% of its tasks within one "
                                           "alphabet and images shifted by up to 2 px")
    shifted = score_lake_runs(tmp_path / "bg", device="cpu", test_shifts=1)
    assert (shifted["test_shifts"], shifted["copies"], len(shifted["per_run"])) == (1, 9, 20)
    code, text = run_cli(capsys, "eval", "--checkpoint", tmp_path / "bg", "--lake-runs",
                         "--test-shifts", 1, "--device", "cpu")
    assert code == 0 and "each image at 9 shifts of up to 1 px" in text, text
    code, text = run_cli(capsys, "eval", "--checkpoint", tmp_path / "bg", "--test-shifts", 1,
                         "--tasks", 3, "--device", "cpu")
    assert code == 0 and "test tasks: 3 (BatchNorm: transductive, each image at 9 shifts" in text, text
    code, text = run_cli(capsys, "eval", "--checkpoint", tmp_path / "bg", "--test-shifts", 14,
                         "--tasks", 3, "--device", "cpu")
    assert code == 2 and "test_shifts must be a whole number of pixels >= 0 below half the image size (28 px)" in text, text
    assert scenario_config("std-5w1s", protocol="background").validation == 100


def test_test_time_settings_are_chosen_on_the_validation_characters(tmp_path, capsys):
    """eval --split validation scores the run's held-out background characters, the same
    pool as a direct evaluation of the validation sampler, and not the test split's."""
    from anil_fast.evaluation import evaluate, evaluate_checkpoint
    from anil_fast.runs.build import own_rng, task_sampler
    from anil_fast.runs.load import load_run
    config = scenario_config("lake-20w1s", meta_steps=2, meta_batch=2, queries=1, test_tasks=2,
                             val_tasks=4, device="cpu", precision="fp32", seed=3)
    train(config, tmp_path / "bg", progress=False)
    run = load_run(tmp_path / "bg", None, "cpu")
    scored = {}
    for split in ("validation", "test"):
        with own_rng(run.settings.device):
            sampler = task_sampler(run.settings.config, split, run.settings.device, 23)
            direct = evaluate(run.anil, sampler, 23, config.bn_mode, test_shifts=1)
        result = evaluate_checkpoint(tmp_path / "bg", 23, device="cpu", progress=False,
                                     test_shifts=1, split=split)
        assert result["split"] == split
        assert result["accuracy_after"] == direct["accuracy_after"]
        assert result["accuracy_before"] == direct["accuracy_before"]
        scored[split] = direct["per_task_after"]
    assert scored["validation"] != scored["test"]  # 23 tasks of other characters
    code, text = run_cli(capsys, "eval", "--checkpoint", tmp_path / "bg", "--split",
                         "validation", "--tasks", 3, "--device", "cpu")
    assert code == 0 and "validation tasks: 3 (BatchNorm: transductive)" in text, text
    code, text = run_cli(capsys, "eval", "--checkpoint", tmp_path / "bg", "--split", "validation",
                         "--bn-mode", "support", "--test-shifts", 1, "--tasks", 2, "--json")
    assert code == 0, text
    result = json.loads(text.strip().splitlines()[-1])
    assert (result["split"], result["bn_mode"], result["test_shifts"]) == ("validation", "support", 1)
    with pytest.raises(ValueError, match="split must be one of"):
        evaluate_checkpoint(tmp_path / "bg", 3, device="cpu", split="val")

