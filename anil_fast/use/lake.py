"""Lake et al.'s 20 official one-shot classification runs (Science, 2015): the 20-way
within-alphabet benchmark that people and Bayesian Program Learning are scored on.

Each run holds 20 training images (one drawing of each of 20 characters of one alphabet) and
20 test images (another drawing of each), with the answer key. A 20-way model adapts its head
to each run's training images, as `predict` does, and answers each test image; the error is
over the 400 test items. Every image is a drawing of Omniglot's evaluation set, and the
standard split's training characters include many of the runs' characters: only a model that
never trained on them may be scored here, so a checkpoint whose training characters overlap
the runs' is refused, naming how many (train on the background set: `--protocol seed`).
"""
from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anil_fast.config import describe_model
from anil_fast.data.omniglot import search_roots
from anil_fast.errors import InputError

RUNS_FILE = "one_shot_runs.zip"
WAYS = 20
BACKGROUND_CHARACTERS = 964  # the standard split indexes background, then evaluation characters


@dataclass
class LakeRun:
    name: str
    training: list  # 20 PIL images, class01..class20
    test: list  # 20 PIL images, item01..item20
    answers: list[int]  # the training class (0..19) of each test item


def find_runs(root=None) -> Path:
    tried = [folder / RUNS_FILE for folder in search_roots(root)]
    for path in tried:
        if path.is_file():
            return path
    raise InputError(f"lake runs: {RUNS_FILE} not found (tried {', '.join(map(str, tried))}); "
                     f"put the official archive beside the Omniglot files")


def load_runs(root=None) -> list[LakeRun]:
    """The 20 runs of the official archive, checked: 20 training and 20 test images each, every
    test item keyed to one training class."""
    from PIL import Image
    path = find_runs(root)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"lake runs: {path} is not a readable zip ({exc})") from exc
    with archive:
        names = set(archive.namelist())
        runs = []
        for run in sorted({n.split("/")[0] for n in names if re.fullmatch(r"run\d\d/.*", n)}):
            def image(member):
                if member not in names:
                    raise InputError(f"lake runs: {path} lacks {member}")
                with Image.open(io.BytesIO(archive.read(member))) as im:
                    return im.convert("L")
            key = {}
            for line in archive.read(f"{run}/class_labels.txt").decode().split("\n"):
                if line.strip():
                    test, train = line.split()
                    key[test] = int(re.fullmatch(rf"{run}/training/class(\d\d)\.png", train).group(1)) - 1
            tests = [f"{run}/test/item{i:02d}.png" for i in range(1, WAYS + 1)]
            if sorted(key) != tests or sorted(key.values()) != list(range(WAYS)):
                raise InputError(f"lake runs: {path}: {run}'s answer key does not pair 20 test "
                                 f"items with 20 training classes")
            runs.append(LakeRun(run, [image(f"{run}/training/class{i:02d}.png") for i in range(1, WAYS + 1)],
                                [image(t) for t in tests], [key[t] for t in tests]))
    if len(runs) != 20:
        raise InputError(f"lake runs: {path} holds {len(runs)} runs, the official archive 20")
    return runs


def run_characters(runs: list[LakeRun], root=None) -> set[int]:
    """The evaluation-set characters (0..658) the runs' images are drawings of, found by their
    pixels in Omniglot's evaluation set."""
    from anil_fast.data import Omniglot
    ink = Omniglot("evaluation", 105, root, "cpu").images[:, :, 0].numpy() > 0.5  # [659, 20, H, W]
    index = {np.packbits(ink[c, d]).tobytes(): c for c in range(ink.shape[0]) for d in range(ink.shape[1])}
    found = set()
    for run in runs:
        for image in run.training + run.test:
            key = np.packbits(np.asarray(image) < 128).tobytes()
            if key not in index:
                raise InputError(f"lake runs: an image of {run.name} is no drawing of Omniglot's "
                                 f"evaluation set (another archive?)")
            found.add(index[key])
    return found


def training_characters(config) -> set[int]:
    """The evaluation-set characters (0..658) a run's config trained or validated on (a
    checkpoint selected on a character has seen it too)."""
    from anil_fast.data.tasks import standard_characters
    if config.dataset != "omniglot":
        raise InputError(f"lake runs: a model trained on {config.dataset} data; Lake's runs are "
                         f"Omniglot's, scored with Omniglot's preprocessing")
    if config.protocol in ("seed", "background"):  # the background set only
        return set()
    seen = standard_characters("train", config.validation).tolist() + \
        standard_characters("validation", config.validation).tolist()
    return {c - BACKGROUND_CHARACTERS for c in seen if c >= BACKGROUND_CHARACTERS}


def score_lake_runs(path, weights: str | None = None, device: str = "auto",
                    bn_mode: str | None = None, root=None, test_shifts: int = 0) -> dict:
    """The error of a checkpoint on the 20 runs: over the 400 items and per run, with its
    head adapted to each run's 20 training images (the run's inner steps and learning rate)
    and BatchNorm as predict uses it; the published errors beside it (references.json).
    test_shifts: test-time augmentation by whole-pixel shifts (FewShotClassifier's)."""
    from anil_fast.use.predict import FewShotClassifier
    from anil_fast.data.references import references
    clf = FewShotClassifier.from_checkpoint(path, weights, device, bn_mode=bn_mode,
                                            test_shifts=test_shifts)
    if clf.max_classes < WAYS:
        raise InputError(f"lake runs: the runs are 20-way; this model's head serves "
                         f"{clf.max_classes} ways (train with --ways 20)")
    runs = load_runs(root)
    overlap = training_characters(clf.config) & run_characters(runs, root)
    if overlap:
        raise InputError(f"lake runs: this checkpoint trained or validated on {len(overlap)} "
                         f"of the runs' characters (the {clf.config.protocol} protocol's "
                         f"training characters hold them), so its score would not be a one-shot "
                         f"one; train on the background set only (--protocol background or seed)")
    per_run = []
    for run in runs:
        predicted = clf.fit(run.training, list(range(WAYS))).predict(run.test)
        per_run.append(sum(int(p != a) for p, a in zip(predicted, run.answers)) / WAYS)
    table = references()
    return {"error": float(np.mean(per_run)), "per_run": per_run, "items": WAYS * len(runs),
            "bn_mode": clf.bn_mode, "test_shifts": clf.test_shifts,
            "copies": (2 * clf.test_shifts + 1) ** 2, "weights": clf.weights, "checkpoint": clf.checkpoint,
            "model_settings": describe_model(clf.config),
            "references": [{**r, "cite": table["cite"][r["source"]],
                            "source": table["sources"][r["source"]]} for r in table["lake"]]}
