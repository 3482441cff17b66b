"""From a trained model to answers: FewShotClassifier and `anil-fast predict` on a user-style
folder of generated images and on Omniglot characters the model never saw, against the
evaluation path (same adaptation, same preprocessing), and their errors."""
import json

import numpy as np
import pytest
import torch

from anil_fast import FewShotClassifier
from anil_fast.cli import main
from anil_fast.data import TaskBatch
from anil_fast.config import scenario_config
from anil_fast.training.run import train
from helpers import colour_classes


pytestmark = pytest.mark.usefixtures("offline")  # never a download try (conftest)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A 3-way model trained for a few steps on 16 colour classes (user-style folder)."""
    root = tmp_path_factory.mktemp("predict")
    data = colour_classes(root / "data", range(16), 6, seed=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANIL_FAST_OFFLINE", "1")
        patch.setenv("ANIL_FAST_CACHE", str(root / "cache"))
        config = scenario_config("s2", data=str(data), image_size=16, ways=3, queries=2,
                                 meta_batch=4, meta_steps=6, test_tasks=4, device="cpu",
                                 inner_lr=0.1, checkpoint_every=3)
        train(config, root / "run", progress=False)
    return root


def test_new_classes_from_a_folder_are_recognised(folder_run, tmp_path):
    # classes the model never saw: 2 support images each, 4 queries each
    colour_classes(tmp_path / "support", (20, 21, 22), 2, seed=1)
    colour_classes(tmp_path / "query", (20, 21, 22), 4, seed=2)
    clf = FewShotClassifier.from_checkpoint(folder_run / "run", device="cpu")
    assert clf.weights == "last (step 6)" and clf.max_classes == 3
    clf.fit(tmp_path / "support")
    assert clf.classes == ["class_20", "class_21", "class_22"]
    queries = sorted((tmp_path / "query").rglob("*.png"))
    predicted = clf.predict(queries)
    truth = [q.parent.name for q in queries]
    accuracy = np.mean([p == t for p, t in zip(predicted, truth)])
    assert accuracy > 2 / 3, (accuracy, predicted)  # chance is 1/3
    probabilities = clf.predict_proba(queries)
    assert probabilities.shape == (12, 3) and torch.allclose(probabilities.sum(1), torch.ones(12))
    # two classes of a 3-way model: the head serves fewer ways than it was trained for
    two = clf.fit([queries[0], queries[4], queries[8], queries[9]],
                  ["a", "b", "c", "c"]).predict(queries[:1])
    assert two == ["a"]


def test_predict_is_evaluation_on_one_task(folder_run):
    # the same support and query tensors through ANIL.evaluate's path give the same logits
    clf = FewShotClassifier.from_checkpoint(folder_run / "run", device="cpu", inner_steps=3)
    g = torch.Generator().manual_seed(0)
    support, query = torch.rand(6, 3, 16, 16, generator=g), torch.rand(5, 3, 16, 16, generator=g)
    labels = [2, 0, 1, 1, 0, 2]
    probabilities = clf.fit(support, labels).predict_proba(query)
    batch = TaskBatch(support[None], torch.tensor([labels]), query[None],
                      torch.zeros(1, 5, dtype=torch.int64))
    _, logits = clf.anil.adapted_logits(batch, 3, clf.bn_mode)
    assert torch.allclose(probabilities, logits[0].softmax(-1), atol=1e-6)


def test_predict_command_prints_and_writes_json(folder_run, tmp_path, capsys):
    colour_classes(tmp_path / "support", (30, 31), 1, seed=3)
    colour_classes(tmp_path / "query", (30, 31), 2, seed=4)
    capsys.readouterr()
    code = main(["predict", "--checkpoint", str(folder_run / "run"), "--support",
                 str(tmp_path / "support"), "--query", str(tmp_path / "query"), "--top", "2",
                 "--json", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 4
    first = json.loads(lines[0])
    assert first["image"].endswith(".png") and [p["class"] for p in first["predictions"]] != []
    assert len(first["predictions"]) == 2
    assert abs(sum(p["probability"] for p in first["predictions"]) - 1) < 1e-3
    code = main(["predict", "--checkpoint", str(folder_run / "run"), "--support",
                 str(tmp_path / "support"), "--query", str(tmp_path / "query" / "class_30"),
                 "--device", "cpu"])
    text = capsys.readouterr().out
    assert code == 0 and "last (step 6)" in text and text.count(".png: class_3") == 2


def test_bad_support_sets_are_refused(folder_run, tmp_path, capsys):
    clf = FewShotClassifier.from_checkpoint(folder_run / "run", device="cpu")
    colour_classes(tmp_path / "four", (1, 2, 3, 4), 1, seed=5)
    with pytest.raises(ValueError, match="4 classes.*at most 3"):
        clf.fit(tmp_path / "four")
    (tmp_path / "four" / "class_1" / "0.png").unlink()
    with pytest.raises(ValueError, match="class_1 holds no images"):
        clf.fit(tmp_path / "four")
    with pytest.raises(ValueError, match="1 class given"):
        clf.fit(torch.rand(2, 3, 16, 16), ["x", "x"])
    with pytest.raises(ValueError, match="3 labels for 2"):
        clf.fit(torch.rand(2, 3, 16, 16), ["x", "y", "z"])
    with pytest.raises(ValueError, match=r"\[N, 3, 16, 16\]"):
        clf.fit(torch.rand(2, 1, 28, 28), ["x", "y"])
    with pytest.raises(ValueError, match="fit\\(\\) the support set first"):
        FewShotClassifier.from_checkpoint(folder_run / "run", device="cpu").predict(torch.rand(1, 3, 16, 16))
    code = main(["predict", "--checkpoint", str(folder_run / "run"), "--support",
                 str(tmp_path / "nowhere"), "--query", str(tmp_path), "--device", "cpu"])
    assert code == 2 and "not a folder" in capsys.readouterr().err


@pytest.mark.usefixtures("omniglot_dir")
def test_omniglot_characters_the_model_never_saw(tmp_path):
    # PNGs written as the official archive holds them (black ink on white, 105 px) from the
    # evaluation set, which a seed-protocol run never trains on
    from PIL import Image
    from anil_fast.data import Omniglot
    config = scenario_config("s2", image_size=28, meta_batch=4, queries=2, meta_steps=15,
                             test_tasks=4, inner_steps=5, inner_lr=0.4, device="cpu", tasks=None,
                             checkpoint_every=5)
    train(config, tmp_path / "run", progress=False)
    ink = Omniglot("evaluation", 105).images  # [659, 20, 1, 105, 105], ink 1.0
    characters = [3, 150, 301, 452, 600]
    for c in characters:
        for d in range(6):
            folder = tmp_path / ("support" if d == 0 else "query") / f"char_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            paper = ((1 - ink[c, d, 0].numpy()) * 255).astype(np.uint8)
            Image.fromarray(paper).convert("1").save(folder / f"{d}.png")
    clf = FewShotClassifier.from_checkpoint(tmp_path / "run", device="cpu")
    # the files go through Omniglot's own preprocessing: the same pixels as the loader's
    expected = Omniglot("evaluation", 28).images[characters[0], :2]
    got = clf.images(sorted((tmp_path / "support" / f"char_{characters[0]}").glob("*.png")) +
                     [tmp_path / "query" / f"char_{characters[0]}" / "1.png"])
    assert torch.allclose(got, expected, atol=1e-6)
    clf.fit(tmp_path / "support")
    queries = sorted((tmp_path / "query").rglob("*.png"))
    predicted = clf.predict(queries)
    accuracy = np.mean([p == q.parent.name for p, q in zip(predicted, queries)])
    assert accuracy > 0.5, accuracy  # 5-way 1-shot: chance is 0.2 (0.84 on the dev machine)


def test_a_prototype_head_predicts_as_it_evaluates():
    from anil_fast import ANIL
    from anil_fast import models
    torch.manual_seed(0)
    anil = ANIL(*models.build("conv4", 4, 16, channels=3), head_init="proto", inner_lr=0.2,
                inner_steps=2)
    with torch.no_grad():
        anil.proto_scale.fill_(0.7)
    clf = FewShotClassifier(anil, 16, 3, bn_mode="support")
    g = torch.Generator().manual_seed(1)
    support, query = torch.rand(6, 3, 16, 16, generator=g), torch.rand(4, 3, 16, 16, generator=g)
    labels = ["a", "b", "c", "a", "b", "c"]  # 3 of the model's 4 ways
    probabilities = clf.fit(support, labels).predict_proba(query)
    batch = TaskBatch(support[None], torch.tensor([[0, 1, 2, 0, 1, 2]]), query[None],
                      torch.zeros(1, 4, dtype=torch.int64))
    _, logits = anil.adapted_logits(batch, None, "support", ways=3)
    torch.testing.assert_close(probabilities, logits[0].softmax(-1))
    # the scale is the model's: another scale gives other probabilities
    with torch.no_grad():
        anil.proto_scale.fill_(1.3)
    assert not torch.allclose(clf.predict_proba(query), probabilities)
