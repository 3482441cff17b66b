"""The few-shot benchmarks ANIL users report on, as FewShotImages (uint8, on the device):

- mini-ImageNet (Vinyals et al. 2016) with the Ravi & Larochelle (ICLR 2017) split: 64/16/20
  classes of 600 images, given as train.csv / val.csv / test.csv ("filename,label") beside an
  images/ folder; 84 px. No download: ImageNet's terms ask every user for their own copy.
- CIFAR-FS (Bertinetto et al., ICLR 2019): 64/16/20 CIFAR-100 classes, 600 images each (the
  500 training and 100 test images of CIFAR-100 together); 32 px.
- FC100 (Oreshkin et al., NeurIPS 2018): CIFAR-100 split by superclass, 12/4/4 superclasses
  = 60/20/20 classes; 32 px.
The class lists are the papers' published splits (splits.json, with their sources). Both
CIFAR benchmarks are built from the official CIFAR-100 python archive, which is downloaded
(md5-checked, by torchvision) when it is not found; offline, the error lists every path tried.
The archive's pickles are read with an unpickler that builds nothing but numpy arrays.
"""
from __future__ import annotations

import csv
import json
import pickle
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from anil_fast.config import BENCHMARKS
from anil_fast.env import cache_dir, data_roots, offline
from anil_fast.errors import InputError
from anil_fast.data.fewshot import SPLITS, FewShotImages, decode_images, from_tensors
from anil_fast.data.omniglot import not_found

CLASSES_PER_SPLIT = {"mini-imagenet": (64, 16, 20), "cifar-fs": (64, 16, 20), "fc100": (60, 20, 20)}
NATIVE_SIZE = {"mini-imagenet": 84, "cifar-fs": 32, "fc100": 32}
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
MINI_CSV = {"train": "train.csv", "validation": "val.csv", "test": "test.csv"}


def published_splits() -> dict:
    return json.loads((files("anil_fast.data") / "splits.json").read_text())


def load_benchmark(name: str, split: str, image_size: int | None = None, root=None,
                   device="cpu", download: bool = True, progress: bool = False) -> FewShotImages:
    """One split ("train", "validation", "test") of a benchmark, at image_size (default: the
    benchmark's own, 84 or 32 px)."""
    if name not in BENCHMARKS:
        raise InputError(f"dataset must be one of {BENCHMARKS}, got {name!r}")
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    size = image_size or NATIVE_SIZE[name]
    if name == "mini-imagenet":
        data = mini_imagenet(split, size, root, progress)
    else:
        data = cifar_benchmark(name, split, size, root, download)
    return data.to(device)


def _check_classes(name: str, split: str, found: int, where) -> None:
    expected = CLASSES_PER_SPLIT[name][SPLITS.index(split)]
    if found != expected:
        raise InputError(f"{name}: the {split} split has {expected} classes in the published "
                         f"split; {where} gives {found}")


# -- mini-ImageNet -------------------------------------------------------------------------------
def find_mini_imagenet(root=None) -> tuple[Path | None, list[Path]]:
    tried = []
    for folder in data_roots("mini-imagenet", root):
        tried.append(folder)
        if all((folder / f).is_file() for f in MINI_CSV.values()) and (folder / "images").is_dir():
            return folder, tried
    return None, tried


def mini_imagenet(split: str, image_size: int = 84, root=None, progress: bool = False) -> FewShotImages:
    folder, tried = find_mini_imagenet(root)
    if folder is None:
        raise not_found(
            "mini-ImageNet not found (no download: ImageNet's terms ask each user for their "
            "own copy)", tried,
            "Place train.csv, val.csv, test.csv (Ravi & Larochelle's split, 'filename,label') "
            "and an images/ folder holding those files in one of these folders, or set "
            "ANIL_FAST_DATA to a folder holding mini-imagenet/.")
    tables = {name: _read_mini_csv(folder / MINI_CSV[name]) for name in SPLITS}
    _check_disjoint(tables)
    table, by_class = folder / MINI_CSV[split], tables[split]
    _check_classes("mini-imagenet", split, len(by_class), table)
    names = sorted(by_class)
    image_files = [folder / "images" / f for name in names for f in by_class[name]]
    missing = [f for f in image_files if not f.is_file()]
    if missing:
        raise InputError(f"mini-ImageNet: {len(missing)} images listed in {table} are missing, "
                         f"e.g. {missing[0]}")
    pixels = decode_images(image_files, image_size, 3, f"mini-imagenet_{split}", progress=progress)
    return FewShotImages(pixels, torch.tensor([len(by_class[n]) for n in names]), names)


def _read_mini_csv(table: Path) -> dict[str, list[str]]:
    """{label: [file names]} of a mini-ImageNet CSV, read as spreadsheets save it (a UTF-8
    byte-order mark, CRLF line ends, spaces around the fields)."""
    try:
        with open(table, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"mini-ImageNet: {table} is not a readable CSV ({exc})") from exc
    if not rows or [c.strip() for c in rows[0][:2]] != ["filename", "label"]:
        raise InputError(f"mini-ImageNet: {table} must start with the header 'filename,label'")
    by_class: dict[str, list[str]] = {}
    for number, row in enumerate(rows[1:], 2):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise InputError(f"mini-ImageNet: {table}:{number} is not 'filename,label'")
        name = row[0].strip()
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise InputError(f"mini-ImageNet: {table}:{number}: {name!r} is not a file name inside "
                             f"images/")
        by_class.setdefault(row[1].strip(), []).append(name)
    return by_class


def _check_disjoint(tables: dict[str, dict[str, list[str]]]) -> None:
    """No class and no image in two splits, no image twice: else a test accuracy would be
    measured on what the model trained on."""
    class_owner, file_owner = {}, {}
    for split, by_class in tables.items():
        csv_name = MINI_CSV[split]
        for label, names in by_class.items():
            if label in class_owner:
                raise InputError(f"mini-ImageNet: class {label!r} is in both "
                                 f"{MINI_CSV[class_owner[label]]} and {csv_name}; the splits "
                                 f"must not share classes")
            class_owner[label] = split
            for name in names:
                if name in file_owner:
                    where = (f"twice in {csv_name}" if file_owner[name] == split else
                             f"in both {MINI_CSV[file_owner[name]]} and {csv_name}")
                    raise InputError(f"mini-ImageNet: image {name!r} is listed {where}")
                file_owner[name] = split


# -- CIFAR-100 and the benchmarks built from it ----------------------------------------------------
class _ArraysOnly(pickle.Unpickler):
    """Builds numpy arrays, lists, dicts, strings and numbers; any other object is refused."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("_codecs", "encode")}  # bytes in a protocol-2 pickle written by Python 3

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to build {module}.{name}")


def _read_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArraysOnly(f, encoding="latin1").load()
    except Exception as exc:
        raise InputError(f"CIFAR-100: {path} is not a CIFAR-100 python file ({exc})") from exc


def find_cifar100(root=None) -> tuple[Path | None, list[Path]]:
    tried = []
    for folder in data_roots("cifar100", root):
        for candidate in (folder / "cifar-100-python", folder):
            tried.append(candidate)
            if all((candidate / f).is_file() for f in ("train", "test", "meta")):
                return candidate, tried
    return None, tried


def cifar100(root=None, download: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(images [60000, 3, 32, 32] uint8, fine labels, coarse labels, meta) of CIFAR-100's
    training and test files together."""
    folder, tried = find_cifar100(root)
    if folder is None:
        reason = "download=False" if not download else None
        if download and offline():
            reason = "ANIL_FAST_OFFLINE=1"
        if reason is None:
            target = cache_dir() / "cifar100"
            try:
                from torchvision.datasets.utils import download_and_extract_archive
                download_and_extract_archive(CIFAR100_URL, str(target), md5=CIFAR100_MD5)
                folder, more = find_cifar100(target)
                tried += more
            except Exception as exc:  # offline, or a checksum mismatch
                reason = f"the download failed ({type(exc).__name__}: {exc})"
        if folder is None:
            raise not_found(
                f"CIFAR-100 not found and {reason}", tried,
                f"Place the official cifar-100-python folder (train, test, meta; from "
                f"{CIFAR100_URL}) in one of these folders, or set ANIL_FAST_DATA to a folder "
                f"holding cifar100/.")
    parts = [_read_cifar_pickle(folder / name) for name in ("train", "test")]
    meta = _read_cifar_pickle(folder / "meta")
    try:
        raw = [np.asarray(p["data"]) for p in parts]
        fine = np.concatenate([_labels(p["fine_labels"], 100, folder, "fine") for p in parts])
        coarse = np.concatenate([_labels(p["coarse_labels"], 20, folder, "coarse") for p in parts])
        meta = {k: list(meta[k]) for k in ("fine_label_names", "coarse_label_names")}
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"CIFAR-100: {folder} does not hold CIFAR-100's python files ({exc})") from exc
    if any(r.dtype != np.uint8 for r in raw):  # a float copy would be cast to 0/1 silently
        bad = next(r.dtype for r in raw if r.dtype != np.uint8)
        raise InputError(f"CIFAR-100: {folder}: pixels must be uint8 (0..255) as in the official "
                         f"archive, got {bad}")
    data = np.concatenate(raw)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or not len(data) == len(fine) == len(coarse):
        raise InputError(f"CIFAR-100: {folder}: images must be rows of 3,072 bytes with one "
                         f"fine and one coarse label each")
    return data.reshape(-1, 3, 32, 32), fine, coarse, meta


def _labels(values, count: int, folder: Path, kind: str) -> np.ndarray:
    labels = np.asarray(values)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise InputError(f"CIFAR-100: {folder}: {kind} labels must be a list of integers")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= count):
        raise InputError(f"CIFAR-100: {folder}: {kind} labels must lie in 0..{count - 1}, found "
                         f"{int(labels.min())}..{int(labels.max())}")
    return labels


def cifar_benchmark(name: str, split: str, image_size: int = 32, root=None,
                    download: bool = True) -> FewShotImages:
    images, fine, coarse, meta = cifar100(root, download)
    listed = published_splits()[name][split]
    if name == "cifar-fs":
        index = {n: i for i, n in enumerate(meta["fine_label_names"])}
        unknown = [n for n in listed if n not in index]
        if unknown:
            raise InputError(f"CIFAR-100's meta has no class {unknown[0]!r}")
        classes = [index[n] for n in listed]
    else:  # FC100: every fine class of the split's superclasses
        index = {n: i for i, n in enumerate(meta["coarse_label_names"])}
        unknown = [n for n in listed if n not in index]
        if unknown:
            raise InputError(f"CIFAR-100's meta has no superclass {unknown[0]!r}")
        wanted = {index[n] for n in listed}
        classes = sorted({int(f) for f, c in zip(fine, coarse) if int(c) in wanted})
    keep = np.isin(fine, classes)
    _check_classes(name, split, len(np.unique(fine[keep])), "CIFAR-100")
    pixels = torch.from_numpy(images[keep])
    if image_size != 32:
        pixels = torch.nn.functional.interpolate(pixels.float(), size=(image_size, image_size),
                                                 mode="bilinear", antialias=True, align_corners=False)
        pixels = pixels.round().clamp(0, 255).to(torch.uint8)
    # labels renumbered in the listed order of classes
    order = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([order[int(f)] for f in fine[keep]])
    names = [meta["fine_label_names"][c] for c in classes]
    return from_tensors(pixels, labels, names)
