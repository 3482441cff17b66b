"""timm bodies (`--model timm:NAME`): the batched body against the per-task loop in float64
for a BatchNorm and a LayerNorm model, per-task fallback for layers it cannot batch, a
training run through `train`, pretrained weights from a local file only, clear errors."""
import warnings

import pytest
import torch

pytest.importorskip("timm")

from anil_fast import MetaOptimizer
from anil_fast import models  # noqa: E402
from anil_fast.errors import InputError  # noqa: E402
from helpers import make, random_batch  # noqa: E402


def _step_alike(name, size=32, batched_warns=False):
    batch = lambda: random_batch(tasks=2, ways=3, shots=1, queries=2, size=size, channels=3)  # noqa: E731
    kw = dict(size=size, ways=3, channels=3, inner_lr=0.2, inner_steps=2, backend="reference",
              first_order=False)
    loop, batched = make(name, batched_body=False, **kw), make(name, batched_body=True, **kw)
    loop_opt, batched_opt = MetaOptimizer(loop), MetaOptimizer(batched)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = batched_opt.step(batch())["loss"]
    said = [str(w.message) for w in caught if "runs per task" in str(w.message)]
    assert bool(said) == batched_warns, said
    torch.testing.assert_close(got, loop_opt.step(batch())["loss"])
    for (n, p), q in zip(loop.named_parameters(), batched.parameters()):
        torch.testing.assert_close(q, p, msg=n)
    for (n, b), c in zip(loop.named_buffers(), batched.buffers()):
        torch.testing.assert_close(c, b, msg=n)


@pytest.mark.parametrize("name", ["timm:resnet10t", "timm:convnext_atto"])  # BatchNorm, LayerNorm
def test_batched_timm_body_equals_the_per_task_loop(name):
    _step_alike(name)


def test_a_body_it_cannot_batch_runs_per_task_and_says_so():
    # MobileNetV3's BatchNormAct2d applies an activation inside the norm layer
    from anil_fast.models.batchnorm import unbatchable_layers
    body, _ = models.build("timm:mobilenetv3_small_050", 3, 32, channels=3)
    assert any("BatchNormAct2d" in layer for layer in unbatchable_layers(body))
    _step_alike("timm:mobilenetv3_small_050", batched_warns=True)


@pytest.mark.usefixtures("omniglot_dir")
def test_a_timm_body_trains_through_the_cli(tmp_path, capsys, monkeypatch):
    import json
    from anil_fast.cli import main
    monkeypatch.setenv("ANIL_FAST_OFFLINE", "1")
    code = main(["train", "--scenario", "s2", "--model", "timm:resnet10t", "--image-size", "28",
                 "--meta-batch", "2", "--queries", "2", "--test-tasks", "4", "--meta-steps", "2",
                 "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["model"] == "timm:resnet10t" and results["meta_steps"] == 2


def test_pretrained_weights_come_from_a_local_file_only(tmp_path, monkeypatch):
    import timm
    import anil_fast.models.timm_bodies as timm_bodies
    source = timm.create_model("resnet10t", num_classes=1000)  # with its classifier, as published
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    body, _ = models.build("timm:resnet10t", 5, 32, channels=3, pretrained=True,
                           weights_file=str(tmp_path / "weights.pth"))
    for name, tensor in body.state_dict().items():
        torch.testing.assert_close(tensor, source.state_dict()[name], msg=name)
    monkeypatch.setattr(timm_bodies, "cached_weights", lambda arch: None)  # nothing cached
    with pytest.raises(InputError, match="no local copy.*--weights-file"):
        models.build("timm:resnet10t", 5, 32, channels=3, pretrained=True)


def test_bad_timm_names_and_settings_are_named(monkeypatch):
    from anil_fast.config import scenario_config
    from anil_fast.runs.settings import resolve
    with pytest.raises(InputError, match="no architecture 'resnet_nope'"):
        resolve(scenario_config("s2", model="timm:resnet_nope"))
    with pytest.raises(InputError, match="weights_file"):
        resolve(scenario_config("s2", model="conv4", weights_file="x.pth"))
    with pytest.raises(InputError, match="cannot take 8 px|could not be built"):
        models.build("timm:convnext_atto", 3, 8, channels=3)
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(
        ImportError("no timm")) if name == "timm" else real_import(name, *a, **k))
    with pytest.raises(InputError, match=r"pip install 'anil-fast\[timm\]'"):
        resolve(scenario_config("s2", model="timm:resnet10t"))
