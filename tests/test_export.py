"""An adapted classifier exported (torch.export, ONNX, TorchScript) gives predict_proba's
answers in a process that cannot import anil-fast; the docs' example runs as written on
Omniglot characters the model never saw; what cannot be exported is refused by name."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anil_fast import ANIL, FewShotClassifier
from anil_fast.cli import main
from anil_fast.use.export import resize_matrix
from anil_fast.config import scenario_config
from anil_fast.training.run import train
from helpers import colour_classes, make

RUNNER = Path(__file__).with_name("run_exported.py")
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("offline")  # never a download try (conftest)


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """A 3-way RGB model trained on colour classes, and a support folder of new classes."""
    root = tmp_path_factory.mktemp("export")
    colour_classes(root / "data", range(16), 5, seed=0)
    colour_classes(root / "support", (20, 21, 22), 2, seed=1, size=16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANIL_FAST_OFFLINE", "1")
        config = scenario_config("s2", data=str(root / "data"), image_size=16, ways=3, queries=2,
                                 meta_batch=2, meta_steps=4, test_tasks=2, device="cpu",
                                 inner_lr=0.1, tasks=None, head_init="proto", precision="fp32")
        train(config, root / "run", progress=False)
    return root


def run_exported(fmt, model, images: torch.Tensor, tmp_path) -> tuple[torch.Tensor, list]:
    np.save(tmp_path / "images.npy", images.numpy())
    done = subprocess.run([sys.executable, "-I", str(RUNNER), fmt, str(model),
                           str(tmp_path / "images.npy"), str(tmp_path / "out.npy")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.from_numpy(np.load(tmp_path / "out.npy")), json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fmt, suffix", [("export", ".pt2"), ("onnx", ".onnx"),
                                         ("torchscript", ".pt")])
def test_every_format_gives_predict_probas_answers_without_anil_fast(colour_run, tmp_path, fmt,
                                                                     suffix):
    if fmt == "onnx":  # the export extra (in dev): a machine without a package index may lack it
        for package in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(package)
    clf = FewShotClassifier.from_checkpoint(colour_run / "run", device="cpu").fit(colour_run / "support")
    g = torch.Generator().manual_seed(3)
    queries = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8, generator=g)
    expected = clf.predict_proba(queries)
    path = clf.export(tmp_path / f"model{suffix}")
    got, classes = run_exported(fmt, path, queries, tmp_path)
    assert classes == ["class_20", "class_21", "class_22"] == clf.classes
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # any batch size: the batch dimension is dynamic
    one, _ = run_exported(fmt, path, queries[:1], tmp_path)
    torch.testing.assert_close(one, expected[:1], rtol=1e-4, atol=1e-5)


def test_float_inputs_other_channels_and_sizes(colour_run, tmp_path):
    clf = FewShotClassifier.from_checkpoint(colour_run / "run", device="cpu").fit(colour_run / "support")
    queries = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    path = clf.export(tmp_path / "float.pt2", input_dtype="float")
    got, _ = run_exported("export", path, queries, tmp_path)
    torch.testing.assert_close(got, clf.predict_proba(queries), rtol=1e-4, atol=1e-5)
    grey = queries[:, :1]
    path = clf.export(tmp_path / "grey.pt2", input_dtype="float", input_channels=1)
    got, _ = run_exported("export", path, grey, tmp_path)
    torch.testing.assert_close(got, clf.predict_proba(grey.expand(-1, 3, -1, -1)), rtol=1e-4,
                               atol=1e-5)
    # images of another size: resized in the graph as predict resizes a file (Pillow's bilinear
    # filter; predict rounds its result to 8 bits, the graph does not)
    from PIL import Image
    big = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    path = clf.export(tmp_path / "big.pt2", input_size=40)
    got, _ = run_exported("export", path, big, tmp_path)
    files = []
    for i, image in enumerate(big):
        files.append(tmp_path / f"big{i}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(files[-1])
    torch.testing.assert_close(got, clf.predict_proba(files), rtol=0, atol=5e-3)


def test_the_resize_is_predicts_as_two_matmuls():
    from PIL import Image
    x = torch.rand(2, 1, 37, 37, generator=torch.Generator().manual_seed(6))
    area = resize_matrix(37, 16, omniglot=True)
    torch.testing.assert_close(area @ x @ area.T, F.interpolate(x, size=(16, 16), mode="area"),
                               rtol=1e-5, atol=1e-6)
    bilinear = resize_matrix(37, 16, omniglot=False)
    pil = np.asarray(Image.fromarray(x[0, 0].numpy(), mode="F").resize((16, 16), Image.BILINEAR))
    torch.testing.assert_close(bilinear @ x[0, 0] @ bilinear.T, torch.from_numpy(pil.copy()),
                               rtol=1e-5, atol=1e-6)


class DataDependent(nn.Module):
    """A layer whose control flow depends on its input's values (torch.export cannot trace)."""

    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_what_cannot_be_exported_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), DataDependent(), nn.Flatten())
    anil = ANIL(body, nn.Linear(4 * 14 * 14, 2), inner_lr=0.1, inner_steps=1)
    clf = FewShotClassifier(anil, 16, 1, bn_mode="support").fit(torch.rand(4, 1, 16, 16), [0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"layer that fails: body.2 \(DataDependent"):
        clf.export(tmp_path / "m.pt2")
    good = FewShotClassifier(make(size=16, ways=2).float(), 16, 1, bn_mode="transductive")
    good.fit(torch.rand(4, 1, 16, 16), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="each answer depend on the other images"):
        good.export(tmp_path / "m.pt2")
    good.bn_mode = "running"
    with pytest.raises(ValueError, match="no known suffix"):
        good.export(tmp_path / "m.bin")
    with pytest.raises(ValueError, match="fit\\(\\) the support set first"):
        FewShotClassifier(make(size=16, ways=2).float(), 16, 1).export(tmp_path / "m.pt2")
    path = good.export(tmp_path / "m.bin", format="export")  # running statistics, frozen
    queries = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    module = torch.export.load(path).module()
    torch.testing.assert_close(module((queries * 255).round().to(torch.uint8)),
                               good.predict_proba((queries * 255).round().to(torch.uint8)),
                               rtol=1e-4, atol=1e-5)


def docs_blocks(page: str, language: str) -> list[str]:
    text = (ROOT / "docs" / page).read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


@pytest.mark.usefixtures("omniglot_dir")
def test_the_docs_example_on_omniglot_characters_the_model_never_saw(tmp_path, capsys,
                                                                   monkeypatch):
    from PIL import Image

    from anil_fast.data import Omniglot
    config = scenario_config("s2", image_size=28, meta_batch=4, queries=5, meta_steps=15,
                             test_tasks=4, inner_steps=5, inner_lr=0.4, device="cpu", tasks=None,
                             checkpoint_every=5, precision="fp32")
    train(config, tmp_path / "runs" / "s2", progress=False)
    ink = Omniglot("evaluation", 105).images  # characters the background set never held
    characters = [3, 150, 301, 452, 600]
    for c in characters:  # as the official archive holds them: black ink on white, 105 px
        for d in range(6):
            folder = (tmp_path / "my_characters" / f"char_{c}") if d == 0 else tmp_path / "new_drawings"
            folder.mkdir(parents=True, exist_ok=True)
            paper = ((1 - ink[c, d, 0].numpy()) * 255).astype(np.uint8)
            Image.fromarray(paper).convert("1").save(folder / f"char_{c}_{d}.png")
    command, = docs_blocks("how-to/export.md", "bash")
    argv = command.split()
    assert argv[0] == "anil-fast"
    monkeypatch.chdir(tmp_path)  # the example's relative paths
    code = main(argv[1:])
    assert code == 0, capsys.readouterr().err
    script, = docs_blocks("how-to/export.md", "python")
    (tmp_path / "example.py").write_text(
        "import sys\nclass NoAnilFast:\n    def find_spec(self, name, *a):\n"
        "        if name.split('.')[0] == 'anil_fast':\n            raise ImportError(name)\n"
        "sys.meta_path.insert(0, NoAnilFast())\n" + script)
    done = subprocess.run([sys.executable, "-I", "example.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = dict(line.split(": ") for line in done.stdout.strip().splitlines())
    clf = FewShotClassifier.from_checkpoint(tmp_path / "runs" / "s2", device="cpu")
    clf.fit(tmp_path / "my_characters")
    files = sorted((tmp_path / "new_drawings").glob("*.png"))
    assert printed == {f.name: c for f, c in zip(files, clf.predict(files))}
    accuracy = np.mean([c == "_".join(f.split("_")[:2]) for f, c in printed.items()])
    assert accuracy > 0.5, accuracy  # 5-way 1-shot: chance is 0.2
