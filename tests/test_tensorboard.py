"""`train --tensorboard`: scalars written during training and read back with TensorBoard's own
reader; a clear error, before anything starts, when the package is missing."""
import pytest

from anil_fast.cli import main
from anil_fast.config import scenario_config
from anil_fast.training.run import train

pytestmark = pytest.mark.usefixtures("omniglot_dir", "offline")


def test_scalars_are_written_and_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    config = scenario_config("std-5w1s", meta_steps=6, meta_batch=2, test_tasks=4, log_every=2,
                             checkpoint_every=3, validation=20, val_tasks=4, val_every=3,
                             val_every_s=None, device="cpu")
    summary = train(config, tmp_path / "run", progress=False, tensorboard=tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "train/it_s", "lr/head", "validation/accuracy",
            "memory/peak_rss_MiB"} <= tags, tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("validation/accuracy")] == [3, 6]
    last_val = events.Scalars("validation/accuracy")[-1].value
    assert abs(last_val - summary["validation"]["records"][-1]["accuracy"]) < 1e-6
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    import json
    assert abs(events.Scalars("train/loss")[0].value - json.loads(lines[0])["loss"]) < 1e-6


def test_the_cli_default_folder_and_the_missing_package(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    args = ["train", "--scenario", "s2", "--image-size", "28", "--meta-batch", "2", "--queries",
            "2", "--test-tasks", "4", "--meta-steps", "2", "--device", "cpu", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "run"), "--tensorboard"]) == 0
    assert any((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "other"), "--tensorboard"]) == 2
    assert "pip install 'anil-fast[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()  # refused before anything started
