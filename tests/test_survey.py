"""The hostile-user survey's cases (issue 30), each as a test: the switches that crashed
(per-task backend in evaluation, joint BatchNorm in predict), evaluations that scored other
tasks, a reseeded caller's RNG, and every bad or weak input of the survey, now a clear error,
a warning or the right answer."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from anil_fast import ANIL, FewShotClassifier, MetaOptimizer
from anil_fast import models
from anil_fast.runs.build import task_sampler
from anil_fast.cli import main
from anil_fast.evaluation import evaluate, evaluate_checkpoint
from anil_fast.runs.folder import load_checkpoint
from anil_fast.runs.settings import resolve
from anil_fast.config import scenario_config
from anil_fast.training.run import train
from helpers import colour_classes, make, random_batch, run_cli


pytestmark = pytest.mark.usefixtures("offline")  # never a download try (conftest)


def folder_config(data, **overrides):
    values = dict(data=str(data), image_size=16, ways=3, queries=2, meta_batch=2, meta_steps=4,
                  test_tasks=6, device="cpu", inner_lr=0.1, inner_steps=2, checkpoint_every=2,
                  log_every=2, tasks=None)
    values.update(overrides)
    return scenario_config("s2", **values)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """A folder of 16 colour classes (the default 64/16/20 split: 10/3/3)."""
    return colour_classes(tmp_path_factory.mktemp("colours") / "data", range(16), 6, seed=0)


@pytest.fixture(scope="module")
def joint_run(colours, tmp_path_factory):
    out = tmp_path_factory.mktemp("joint") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANIL_FAST_OFFLINE", "1")
        train(folder_config(colours, bn_mode="joint"), out, progress=False)
    return out


# -- items 2-5 of the issue ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["per_task", "loop"])
def test_the_per_task_backend_evaluates_as_the_reference_does(backend):
    batch = random_batch(seed=3)
    reference = make(inner_lr=0.3, inner_steps=3, backend="reference").evaluate(batch)
    loop = make(inner_lr=0.3, inner_steps=3, backend=backend).evaluate(batch)
    for key in ("per_task_before", "per_task_after"):
        torch.testing.assert_close(loop[key], reference[key])
    assert loop["loss_after"] == pytest.approx(reference["loss_after"], rel=1e-9)


def test_train_with_the_per_task_backend_ends_with_its_test(colours, tmp_path):
    summary = train(folder_config(colours, backend="per_task"), tmp_path / "run", progress=False)
    assert summary["evaluation"]["tasks"] == 6 and 0 <= summary["evaluation"]["accuracy_after"] <= 1


def test_predict_of_a_joint_batchnorm_run_answers_each_image_on_its_own(joint_run, tmp_path):
    clf = FewShotClassifier.from_checkpoint(joint_run, device="cpu")
    assert clf.bn_mode == "support"
    g = torch.Generator().manual_seed(1)
    support, queries = torch.rand(6, 3, 16, 16, generator=g), torch.rand(18, 3, 16, 16, generator=g)
    clf.fit(support, [0, 1, 2, 0, 1, 2])
    alone = clf.predict_proba(queries)
    with_blanks = clf.predict_proba(torch.cat([queries, torch.zeros(30, 3, 16, 16)]))[:18]
    torch.testing.assert_close(with_blanks, alone)


def test_from_checkpoint_leaves_the_callers_rng_alone(joint_run):
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    FewShotClassifier.from_checkpoint(joint_run, device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_every_evaluation_of_a_pool_scores_the_same_tasks(colours):
    config = resolve(folder_config(colours)).config
    sampler = task_sampler(config, "test", "cpu", 120)  # over 50, not a multiple of 50
    anil = ANIL(*models.build("conv4", 3, 16, channels=3), inner_lr=0.1, inner_steps=1)
    first = evaluate(anil, sampler, 120)
    second = evaluate(anil, sampler, 120)
    assert first["per_task_after"] == second["per_task_after"]
    assert first["gain"] == first["accuracy_after"] - first["accuracy_before"]
    assert first["ci95_gain"] >= 0  # the paired differences' CI
    drawn = [sampler.pool.characters[i] for i in range(120)]
    scored = torch.cat([i.characters for i in sampler.evaluation_indices(120)])
    assert torch.equal(scored, torch.stack(drawn)) and sampler.position == 0


def test_trains_best_checkpoint_test_equals_eval_of_best(tmp_path, omniglot_dir):
    config = scenario_config("std-5w1s", meta_steps=6, val_every=2, val_every_s=None,
                             val_tasks=120, test_tasks=120, device="cpu", meta_batch=2,
                             checkpoint_every=2, log_every=2, precision="fp32")
    summary = train(config, tmp_path / "run", progress=False)
    again = evaluate_checkpoint(tmp_path / "run", 120, weights="best", device="cpu", progress=False)
    assert again["accuracy_after"] == summary["evaluation"]["accuracy_after"]
    records = [json.loads(x) for x in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert len(records) == 3


# -- the survey's bad cases ---------------------------------------------------------------------

def deep_json(depth=100_000) -> str:
    return "[" * depth + "]" * depth


def test_json_nested_too_deeply_is_an_input_error(colours, tmp_path, capsys):
    (tmp_path / "deep.json").write_text(deep_json())
    code, text = run_cli(capsys, "train", "--config", tmp_path / "deep.json", "--out", tmp_path / "a")
    assert code == 2 and "nested too deeply" in text
    code, text = run_cli(capsys, "train", "--data", colours, "--split-file", tmp_path / "deep.json",
                         "--out", tmp_path / "b", "--device", "cpu")
    assert code == 2 and "split_file" in text and "nested too deeply" in text
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "reproduce.json").write_text(deep_json())
    code, text = run_cli(capsys, "reproduce", "--suite", "seed", "--smoke", "--out", tmp_path / "r")
    assert code == 2 and "not a report anil-fast wrote" in text


def copied(run, to):
    shutil.copytree(run, to)
    return to


@pytest.mark.parametrize("damage, words", [
    ("metrics-loss", "its loss is 'x'"), ("metrics-null", "its loss is None"),
    ("metrics-deep", None), ("validation-elapsed", "elapsed_s"),
    ("step", "its step is '4'"), ("sampler", "sampler state"), ("rng", "RNG state"),
    ("adam-shape", "optimizer state")])
def test_damaged_run_files_are_refused_on_resume_with_one_line(joint_run, tmp_path, capsys,
                                                               damage, words):
    run = copied(joint_run, tmp_path / "run")
    if damage.startswith("metrics"):
        line = {"metrics-loss": '{"step": 1, "loss": "x", "accuracy": 0.5, "elapsed_s": 1}',
                "metrics-null": '{"step": 1, "loss": null, "accuracy": 0.5, "elapsed_s": 1}',
                "metrics-deep": deep_json()}[damage]
        (run / "metrics.jsonl").write_text(line + "\n" + (run / "metrics.jsonl").read_text())
    elif damage == "validation-elapsed":
        (run / "validation.jsonl").write_text('{"step": 2, "accuracy": 0.5, "ci95": 0.1}\n')
    else:
        ckpt = load_checkpoint(run)
        if damage == "step":
            ckpt["step"] = "4"
        elif damage == "sampler":
            ckpt["sampler"]["generator"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
        elif damage == "rng":
            ckpt["rng"]["torch"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
        else:
            state = next(iter(ckpt["optimizer"]["optimizer"]["state"].values()))
            state["exp_avg"] = torch.zeros(5, 5, 5)
        torch.save(ckpt, run / "checkpoint.pt")
    args = ("train", "--config", run / "config.json", "--out", run, "--resume", "--meta-steps",
            "6", "--no-progress")
    if words is None:  # a line that does not parse is skipped with a warning (a torn line)
        with pytest.warns(UserWarning, match="skipped a line"):
            code, text = run_cli(capsys, *args)
        assert code == 0, text
    else:
        code, text = run_cli(capsys, *args)
        assert code == 2 and words in text and "Traceback" not in text, text


def test_an_unknown_scenario_in_a_config_is_refused_before_training(colours, tmp_path, capsys):
    values = folder_config(colours).to_dict()
    values["scenario"] = "bogus"
    (tmp_path / "c.json").write_text(json.dumps(values))
    code, text = run_cli(capsys, "train", "--config", tmp_path / "c.json", "--out", tmp_path / "run")
    assert code == 2 and "scenario must be one of" in text
    assert not (tmp_path / "run").exists()  # refused before the folder was made


@pytest.mark.parametrize("flag, value, words", [
    ("--ways", 10**12, "meta-batch"), ("--hidden", 10**12, "conv4 with"),
    ("--meta-batch", 10**7, "meta-batch of 10,000,000"),
    ("--inner-steps", 10**12, "inner_steps must be at most"),
    ("--eval-inner-steps", 10**12, "eval_inner_steps must be at most")])
def test_sizes_beyond_the_memory_or_reason_are_refused_before_anything(tmp_path, capsys, flag,
                                                                       value, words):
    code, text = run_cli(capsys, "train", "--out", tmp_path / "run", flag, value, "--device", "cpu")
    assert code == 2 and words in text, text
    assert not (tmp_path / "run").exists()


def transparent_drawing(path, size=40):
    """Black ink strokes on fully transparent paper (RGBA), as drawing programs save them."""
    from PIL import Image
    pixels = np.zeros((size, size, 4), np.uint8)
    pixels[size // 2 - 2:size // 2 + 2, 5:-5] = (0, 0, 0, 255)  # a horizontal stroke
    Image.fromarray(pixels, "RGBA").save(path)
    return path


def test_drawings_on_transparent_paper_keep_their_paper(tmp_path):
    from PIL import Image

    from anil_fast.data.fewshot import pil_to_array
    path = transparent_drawing(tmp_path / "a.png")
    grey = pil_to_array(Image.open(path), 40, 1)[..., 0]
    assert (grey == 255).mean() > 0.85 and grey.min() == 0  # white paper, black ink
    clf = FewShotClassifier(make(size=28, ways=2).float(), 28, 1, omniglot=True)
    ink = clf.images([path])
    assert 0 < ink.mean() < 0.15  # Omniglot's ink 1 on paper 0: mostly paper


def test_a_class_folder_added_after_training_changes_no_test_class(colours, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(colours, data)
    train(folder_config(data), tmp_path / "run", progress=False)
    recorded = load_checkpoint(tmp_path / "run")["classes"]
    before = evaluate_checkpoint(tmp_path / "run", 6, device="cpu", progress=False)
    colour_classes(data, [40], 6, seed=9)  # one more class: the default split reshuffles
    from anil_fast.data.fewshot import default_split_names
    assert default_split_names(data) != recorded
    after = evaluate_checkpoint(tmp_path / "run", 6, device="cpu", progress=False)
    assert after["accuracy_after"] == before["accuracy_after"]
    assert set(recorded["test"]).isdisjoint(recorded["train"])


def test_a_rewritten_cache_entry_is_never_served(tmp_path):
    from anil_fast.env import read_cached_array, write_cached_array
    entry = tmp_path / "entry"
    array = np.arange(64, dtype=np.uint8).reshape(4, 4, 4)
    write_cached_array(entry, array, {"files": 4})
    assert len(json.loads(entry.with_suffix(".json").read_text())["blake2b"]) == 64
    tampered = array.copy()
    tampered[0, 0, 0] ^= 1
    np.save(entry.with_suffix(".npy"), tampered)
    assert read_cached_array(entry) is None
    np.save(entry.with_suffix(".npy"), array.reshape(4, 16)[:, :12].reshape(4, 4, 3).copy())
    assert read_cached_array(entry, {"shape": [4, 4, 4]}) is None  # another shape: rebuilt


def test_validation_leaves_the_validation_sampler_where_it_was(colours):
    config = resolve(folder_config(colours, validation=1, val_every=2, val_tasks=7)).config
    sampler = task_sampler(config, "validation", "cpu")
    state = sampler.state_dict()
    anil = ANIL(*models.build("conv4", 3, 16, channels=3), inner_lr=0.1, inner_steps=1)
    evaluate(anil, sampler, 7)
    assert sampler.position == state["position"] and sampler.order is None


# -- the survey's weak cases --------------------------------------------------------------------

def test_capture_on_the_cpu_is_said(colours, tmp_path, capsys):
    code, text = run_cli(capsys, "train", "--data", colours, "--image-size", 16, "--ways", 3,
                         "--queries", 2, "--meta-steps", 2, "--test-tasks", 2, "--endless",
                         "--meta-batch", 2, "--device", "cpu", "--capture", "--no-progress",
                         "--out", tmp_path / "run")
    assert code == 0 and "capture: CUDA graphs need a CUDA device" in text


def test_a_run_refused_at_set_up_leaves_no_folder_and_a_dangling_link_is_named(tmp_path, capsys):
    code, text = run_cli(capsys, "train", "--data", tmp_path / "nowhere", "--out", tmp_path / "run",
                         "--device", "cpu")
    assert code == 2 and not (tmp_path / "run").exists()
    os.symlink(tmp_path / "gone", tmp_path / "link")
    code, text = run_cli(capsys, "train", "--out", tmp_path / "link", "--device", "cpu")
    assert code == 2 and "symbolic link to nowhere" in text


def test_resume_into_an_empty_folder_says_it_starts_at_step_0(colours, tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.warns(UserWarning, match="holds no run to resume"):
        train(folder_config(colours, meta_steps=1, test_tasks=2), tmp_path / "run", resume=True,
              progress=False)


def test_predict_json_names_non_utf8_files_with_escapes(joint_run, tmp_path, capsys):
    colour_classes(tmp_path / "support", (30, 31), 1, seed=3)
    (tmp_path / "query").mkdir()
    name = os.fsdecode(b"q\xff.png")
    shutil.copy(tmp_path / "support" / "class_30" / "0.png", tmp_path / "query" / name)
    code, text = run_cli(capsys, "predict", "--checkpoint", joint_run, "--support",
                         tmp_path / "support", "--query", tmp_path / "query", "--json",
                         "--device", "cpu")
    assert code == 0
    record = json.loads(text.strip().splitlines()[-1])
    assert record["image"].endswith("q\\xff.png")
    record["image"].encode("utf-8")  # no lone surrogates


def test_predict_refuses_tensors_it_would_misread(joint_run):
    clf = FewShotClassifier.from_checkpoint(joint_run, device="cpu")
    ok = torch.rand(4, 3, 16, 16)
    for bad, words in ((ok * 255, "divide by 255"), ((ok * 255).long(), "uint8"),
                       (ok.clone().fill_(float("nan")), "NaN"), (torch.zeros(0, 3, 16, 16), "no images"),
                       (torch.empty(4, 3, 16, 16, device="meta"), "meta")):
        with pytest.raises(ValueError, match=words):
            clf.fit(bad, [0, 1, 0, 1])
    with pytest.raises(TypeError, match="hashable"):
        clf.fit(ok, [[0], [1], [0], [1]])
    clf.fit(ok.double(), [0, 1, 0, 1])  # other float dtypes are converted
    with pytest.raises(ValueError, match="no images"):
        clf.predict(torch.zeros(0, 3, 16, 16))
    assert clf.fit((ok * 255).to(torch.uint8), [0, 1, 0, 1]).predict(ok[:1]) in ([0], [1])


def test_the_model_names_batches_that_do_not_fit_it():
    anil = make(inner_lr=0.1, inner_steps=1)  # float64, 1 channel
    with pytest.raises(ValueError, match="3 channels, the body takes 1"):
        anil.evaluate(random_batch(channels=3))
    with pytest.raises(TypeError, match="float32, the model's weights torch.float64"):
        anil.evaluate(random_batch(dtype=torch.float32))
    batch = random_batch()
    meta = type(batch)(*(t.to("meta") for t in (batch.support_x, batch.support_y,
                                                 batch.query_x, batch.query_y)))
    with pytest.raises(ValueError, match="on meta"):
        anil.evaluate(meta)


def test_nan_weights_are_refused_and_nan_logits_warned(joint_run, tmp_path):
    run = copied(joint_run, tmp_path / "run")
    ckpt = load_checkpoint(run)
    key = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][key] = torch.full_like(ckpt["model"][key], float("nan"))
    torch.save(ckpt, run / "checkpoint.pt")
    with pytest.raises(ValueError, match="NaN or infinite"):
        evaluate_checkpoint(run, 2, device="cpu", progress=False)
    anil = make(inner_lr=0.1, inner_steps=1)
    with torch.no_grad():
        anil.head.weight.fill_(float("nan"))
    with pytest.warns(UserWarning, match="not finite"):
        anil.evaluate(random_batch())


def test_optimizers_and_schedules_that_would_train_nothing_are_refused():
    anil = make(inner_lr=0.1, inner_steps=1)
    stranger = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="1 parameter"):
        MetaOptimizer(anil, optimizer=torch.optim.Adam([stranger, anil.head.weight]))
    with pytest.warns(UserWarning, match="untrained"):
        MetaOptimizer(anil, optimizer=torch.optim.Adam([anil.head.weight, anil.head.bias]))
    opt = MetaOptimizer(anil, schedule=lambda step: float("nan") if step else 1.0)
    opt.step(random_batch())
    before = [p.detach().clone() for p in anil.parameters()]
    with pytest.raises(ValueError, match="schedule: at step 1"):
        opt.step(random_batch())
    assert all(torch.equal(p, q) for p, q in zip(anil.parameters(), before))


def test_alphabet_character_folders_are_named_as_a_level_too_high(tmp_path):
    from anil_fast.data import image_folder
    for alphabet in range(4):
        colour_classes(tmp_path / "data" / f"alphabet{alphabet}", range(3 * alphabet, 3 * alphabet + 3),
                       2, seed=alphabet)
    with pytest.raises(ValueError, match="a level above the classes"):
        image_folder(tmp_path / "data", "train", 16)
    clf = FewShotClassifier(make(size=16, ways=3, channels=3).float(), 16, 3)
    with pytest.raises(ValueError, match="a level above the classes"):
        clf.fit(tmp_path / "data")


def test_bench_repetitions_zero_version_and_a_tensorboard_file(tmp_path, capsys):
    code, text = run_cli(capsys, "bench", "--quick", "--repetitions", 0, "--device", "cpu")
    assert code == 2 and "repetitions must be >= 1" in text
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("anil-fast ")
    (tmp_path / "tb").write_text("")
    code, text = run_cli(capsys, "train", "--out", tmp_path / "run", "--tensorboard", tmp_path / "tb",
                         "--device", "cpu")
    assert code == 2 and "--tensorboard" in text and "is a file" in text
