"""A trained model as a few-shot classifier: "here are a few labelled examples of each of my
classes, what are these new images?"

    clf = FewShotClassifier.from_checkpoint("runs/s2")      # best.pt when the run has one
    clf.fit(support_images, support_labels)                 # paths, PIL images or tensors
    clf.predict(query_images)                               # one label per image
    clf.predict_proba(query_images)                         # [Q, classes], columns: clf.classes

`fit` keeps the support set; `predict_proba` adapts the head on it as evaluation does (the
run's inner steps, initial head and inner learning rate) and scores the queries. BatchNorm:
the run's mode, except that a run evaluated transductively (queries normalised with their own
statistics, which would make each answer depend on the other images scored with it) or
jointly (support and queries in one call: the same dependence) predicts with its support
set's statistics ("support"): every query is classified on its own. Images given as paths or
PIL images get the preprocessing of the checkpoint's data: Omniglot's (grey ink on white
paper inverted, area-resized) or, for every other dataset, the folder loader's (RGB or grey,
16-bit and float images scaled, bilinear resize). Tensors are taken as model inputs: float
[N, C, H, W] in 0..1 at the model's channels and image size (uint8 is divided by 255).

`test_shifts` = m > 0 is test-time augmentation: the support set and every query image are
also taken at each whole-pixel shift within m pixels ((2m+1)^2 copies, data/augment.py); the
head adapts to all the support copies (with the prototype head: each class's prototype is the
mean over its copies) and a query's class probabilities are the normalised geometric mean over
its own copies, so each answer still depends on its own image alone (with "support" or
"running" BatchNorm). On Lake's runs it lowered the error of a background-trained 20-way
model (docs/how-to/evaluate.md).
"""
from __future__ import annotations

import math
from collections.abc import Hashable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from anil_fast.config import BN_MODES
from anil_fast.models.anil import ANIL
from anil_fast.data import TaskBatch
from anil_fast.data.augment import check_shift, mean_over_copies, with_shifted_copies
from anil_fast.data.fewshot import (IMAGE_SUFFIXES, check_class_folder, decode_file, flatten_alpha,
                            pil_to_array, to_8bit)
from anil_fast.errors import InputError, InputTypeError, is_int

__all__ = ["FewShotClassifier", "image_paths"]

# BatchNorm modes whose statistics include the query images (each answer would depend on the
# others scored with it); predict replaces them with "support"
QUERY_DEPENDENT_BN_MODES = ("transductive", "joint")


def image_paths(paths) -> list[Path]:
    """Image files from files and folders (a folder: its image files, sorted, recursively)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise InputError(f"query: {p} is neither an image file nor a folder")
    return found


def support_folder(path) -> tuple[list[Path], list[str]]:
    """(image files, class names) of a folder holding one folder of images per class."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"support: {path} is not a folder (expected one folder of images per class)")
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"support: {path} holds no class folders")
    files, labels = [], []
    for folder in classes:
        check_class_folder(folder, "support")
        images = image_paths(folder)
        if not images:
            raise InputError(f"support: class folder {folder} holds no images "
                             f"({', '.join(IMAGE_SUFFIXES)})")
        files += images
        labels += [folder.name] * len(images)
    return files, labels


class FewShotClassifier:
    """A trained ANIL model that adapts its head to your classes (see the module docstring).

    anil: the trained model; image_size, channels: its inputs; omniglot: Omniglot's
    preprocessing for paths and PIL images; inner_steps, bn_mode: the adaptation (those of
    the run by default, as evaluation uses them); test_shifts: test-time augmentation by
    whole-pixel shifts (module docstring; 0: none)."""

    def __init__(self, anil: ANIL, image_size: int, channels: int, omniglot: bool = False,
                 inner_steps: int | None = None, bn_mode: str = "transductive",
                 test_shifts: int = 0):
        if not isinstance(anil, ANIL):
            raise InputTypeError(f"anil must be an ANIL model, got {type(anil).__name__}")
        if inner_steps is not None and (not is_int(inner_steps) or inner_steps < 0):
            raise InputError(f"inner_steps must be an int >= 0, got {inner_steps!r}")
        if bn_mode not in BN_MODES:
            raise InputError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        self.test_shifts = check_shift("test_shifts", test_shifts, image_size)
        self.anil, self.image_size, self.channels, self.omniglot = anil, image_size, channels, omniglot
        self.inner_steps, self.bn_mode = inner_steps, bn_mode
        self.device = next(anil.parameters()).device
        self.classes: list = []
        self._support = None

    @classmethod
    def from_checkpoint(cls, path, weights: str | None = None, device: str = "auto",
                        inner_steps: int | None = None, bn_mode: str | None = None,
                        test_shifts: int = 0):
        """From a run folder (best.pt when it has one, else checkpoint.pt; `weights` "best" or
        "last" chooses) or a checkpoint file."""
        from anil_fast.runs.load import load_run
        run = load_run(path, weights, device)
        anil, config = run.anil, run.settings.config
        # transductive and joint BatchNorm would make each answer depend on the other query
        # images: a run evaluated that way predicts with its support set's statistics instead
        default = "support" if config.bn_mode in QUERY_DEPENDENT_BN_MODES else config.bn_mode
        clf = cls(anil, config.image_size, config.input_channels, config.dataset == "omniglot",
                  config.eval_inner_steps if inner_steps is None else inner_steps,
                  bn_mode or default, test_shifts)
        clf.checkpoint, clf.weights, clf.config = str(run.file), run.weights, config
        return clf

    @property
    def max_classes(self) -> int:
        return self.anil.head.out_features

    # -- images --------------------------------------------------------------------------------
    def images(self, images) -> torch.Tensor:
        """Model inputs float [N, C, S, S] in 0..1 on the model's device from paths (files or
        folders), PIL images, or a tensor [N, C, S, S]."""
        from PIL import Image
        if isinstance(images, torch.Tensor):
            return self._tensor(images)
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        if not isinstance(images, (list, tuple)):
            raise InputTypeError(f"images must be paths, PIL images or a tensor [N, C, H, W], got "
                                 f"{type(images).__name__}")
        rows = []
        for item in images:
            if isinstance(item, Image.Image):
                rows.append(self._pil(item))
            elif isinstance(item, (str, Path)):
                for f in image_paths(item):
                    rows.append(decode_file(f, self._pil))
            else:
                raise InputTypeError(f"images: each must be a path or a PIL image, got "
                                     f"{type(item).__name__}")
        if not rows:
            raise InputError("images: no images given")
        return torch.stack(rows).to(self.device)

    def _tensor(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise InputError(f"images: a tensor must be [N, {', '.join(map(str, expected))}] (the "
                             f"model's inputs), got {list(x.shape)}; pass paths or PIL images to "
                             f"have them resized")
        if x.device.type == "meta":
            raise InputError("images: a tensor on the meta device holds no values")
        if x.shape[0] == 0:
            raise InputError("images: the tensor holds no images (N = 0)")
        if x.dtype == torch.uint8:
            return x.to(self.device).float().div(255)
        if not x.is_floating_point():
            raise InputTypeError(f"images: a tensor must be uint8 (0..255) or float (0..1), got "
                                 f"{x.dtype}; for integer pixels in 0..255 pass x.to(torch.uint8)")
        x = x.to(self.device, torch.float32)
        low, high = (float(v) for v in torch.stack([x.amin(), x.amax()]))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise InputError("images: the tensor holds NaN or infinite values")
        if low < 0 or high > 1:
            raise InputError(f"images: float pixels must lie in 0..1, got {low:g}..{high:g}"
                             + ("; for 0..255 values divide by 255 (or pass uint8)" if high <= 255 else ""))
        return x

    def _pil(self, image) -> torch.Tensor:
        if not self.omniglot:
            array = pil_to_array(image, self.image_size, self.channels)
            return torch.from_numpy(array).permute(2, 0, 1).float() / 255
        # Omniglot: ink 1.0 on paper 0.0, area-resized, as the Omniglot loader stores it
        grey = np.asarray(to_8bit(flatten_alpha(image)).convert("L"), dtype=np.float32)
        ink = torch.from_numpy(1.0 - grey / 255.0)[None, None]
        return F.interpolate(ink, size=(self.image_size, self.image_size), mode="area")[0]

    # -- fit and predict -----------------------------------------------------------------------
    def fit(self, images, labels=None) -> "FewShotClassifier":
        """Keep a support set: images (paths, PIL images or a tensor) with one label each (any
        hashable: class names or numbers), or a folder of class folders with labels None."""
        if labels is None:
            if not isinstance(images, (str, Path)):
                raise InputError("labels: give one label per image, or a folder of class folders "
                                 "as images")
            images, labels = support_folder(images)
        x = self.images(images)
        if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__"):
            raise InputTypeError(f"labels: give a list of labels, one per image, got "
                                 f"{type(labels).__name__}")
        labels = list(labels.tolist() if isinstance(labels, torch.Tensor) else labels)
        if len(labels) != x.shape[0]:
            raise InputError(f"labels: {len(labels)} labels for {x.shape[0]} support images")
        for label in labels:
            if not isinstance(label, Hashable):
                raise InputTypeError(f"labels: each label must be a class name or number "
                                     f"(hashable), got a {type(label).__name__}: {label!r:.60}")
        classes = sorted(set(labels), key=lambda c: (str(type(c)), c))
        if len(classes) < 2:
            raise InputError(f"support: {len(classes)} class given; a few-shot task needs at "
                             f"least 2")
        if len(classes) > self.max_classes:
            raise InputError(f"support: {len(classes)} classes, but this model's head serves at "
                             f"most {self.max_classes} (the ways it was trained for)")
        index = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([index[c] for c in labels], device=self.device)
        self.classes, self._support = classes, (x, y)
        return self

    @property
    def support(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fitted support set (images as the body takes them, labels 0..len(classes)-1),
        or None before fit()."""
        return self._support

    def predict_proba(self, images) -> torch.Tensor:
        """Class probabilities [Q, len(classes)] of the query images (columns: self.classes)."""
        if self._support is None:
            raise InputError("fit() the support set first")
        x, y = self._support
        q = self.images(images)
        batch = TaskBatch(x[None], y[None], q[None], torch.zeros(1, q.shape[0], dtype=torch.int64,
                                                                device=self.device))
        batch, copies = with_shifted_copies(batch, self.test_shifts)  # every image at every shift
        # your classes may be fewer than the model's ways: the head's first rows serve them
        _, logits = self.anil.adapted_logits(batch, self.inner_steps, self.bn_mode,
                                             ways=len(self.classes))
        return mean_over_copies(logits, copies)[0].exp().cpu()

    def predict(self, images) -> list:
        """The most probable class of each query image."""
        return [self.classes[i] for i in self.predict_proba(images).argmax(-1).tolist()]

    def export(self, path, format: str | None = None, input_size: int | None = None,
               input_channels: int | None = None, input_dtype: str = "uint8"):
        """The classifier adapted to the support set as a file that runs without anil-fast:
        a torch.export program (.pt2), ONNX (.onnx) or TorchScript (.pt); see export.py."""
        from anil_fast.use.export import export
        return export(self, path, format, input_size, input_channels, input_dtype)
