"""Few-shot image data resident on a device, and the producers that fill it from your data.

`FewShotImages` is the one type TaskSampler draws tasks from: every image of a split in one
tensor, grouped by class (class c holds rows offsets[c] .. offsets[c] + counts[c]), stored
as uint8 where the source is 8-bit (converted to float in 0..1 per batch: mini-ImageNet at
84 px is 1.3 GB as uint8, 5 GB as float32) or as float. Classes may hold different numbers
of examples; any channel count and image size.

Producers: Omniglot (`FewShotImages.from_grid`), a folder of class folders
(`image_folder`), tensors (`from_tensors`) and any torchvision-style dataset of
(image, label) pairs (`from_dataset`). Decoded folders are cached on disk, keyed on every
file's path, size, modification and change times and inode, the image size and the
channels, so a changed source is never served stale (`anil-fast cache clear` empties it).
"""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from anil_fast.env import (cache_dir, check_allocation, file_stamp, parse_json, read_cached_array,
                   write_cached_array)
from anil_fast.errors import InputError, InputTypeError, is_int

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
SPLITS = ("train", "validation", "test")
# folder names a dataset may use for its splits
SPLIT_FOLDERS = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}
DEFAULT_FRACTIONS = (0.64, 0.16, 0.20)  # mini-ImageNet's 64/16/20 when no split is given
SPLIT_SEED = 20_260_101


@dataclass
class FewShotImages:
    """pixels [total, C, H, W] (uint8 or float), grouped by class; counts [classes]."""
    pixels: torch.Tensor
    counts: torch.Tensor
    class_names: list = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.pixels, torch.Tensor) or self.pixels.dim() != 4:
            raise InputTypeError("pixels must be a tensor [images, C, H, W]")
        if self.pixels.dtype != torch.uint8 and not self.pixels.is_floating_point():
            raise InputTypeError(f"pixels must be uint8 (8-bit) or floating point, got {self.pixels.dtype}")
        counts = torch.as_tensor(self.counts, dtype=torch.int64)
        if counts.dim() != 1 or counts.numel() == 0 or bool((counts < 1).any()):
            raise InputError("counts must list at least one class, each with at least one image")
        if int(counts.sum()) != self.pixels.shape[0]:
            raise InputError(f"counts sum to {int(counts.sum())}, but there are "
                             f"{self.pixels.shape[0]} images")
        if self.class_names and len(self.class_names) != counts.numel():
            raise InputError(f"{len(self.class_names)} class names for {counts.numel()} classes")
        self.counts = counts.to(self.pixels.device)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts

    @classmethod
    def from_grid(cls, images: torch.Tensor, class_names=None) -> "FewShotImages":
        """From [classes, examples, C, H, W] (every class the same count, e.g. Omniglot)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 5:
            raise InputTypeError("images must be a tensor [classes, examples, C, H, W]")
        classes, examples = images.shape[:2]
        return cls(images.reshape(classes * examples, *images.shape[2:]),
                   torch.full((classes,), examples, dtype=torch.int64), list(class_names or []))

    @property
    def num_classes(self) -> int:
        return self.counts.numel()

    @property
    def image_shape(self) -> tuple:
        return tuple(self.pixels.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    def to(self, device) -> "FewShotImages":
        return FewShotImages(self.pixels.to(device), self.counts.to(device), list(self.class_names))

    def check_examples(self, needed: int) -> None:
        """A clear error naming a class with fewer than `needed` (shots + queries) images."""
        short = (self.counts < needed).nonzero().flatten().tolist()
        if short:
            c = short[0]
            name = f" ({self.class_names[c]!r})" if self.class_names else ""
            raise InputError(f"shots + queries = {needed}, but class {c}{name} has only "
                             f"{int(self.counts[c])} images ({len(short)} classes have fewer "
                             f"than {needed}); lower --shots/--queries or drop those classes")

    def __repr__(self) -> str:
        return (f"FewShotImages({self.num_classes} classes, {self.pixels.shape[0]} images of "
                f"{'x'.join(map(str, self.image_shape))}, {self.pixels.dtype}, {self.device})")


def from_tensors(images: torch.Tensor, labels: torch.Tensor, class_names=None) -> FewShotImages:
    """From images [N, C, H, W] (uint8 or float in 0..1) and integer labels [N]: grouped by
    label (classes in label order, examples in their original order)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise InputTypeError("images must be a tensor [N, C, H, W]")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise InputTypeError("labels must be an integer tensor [N]")
    if labels.numel() != images.shape[0]:
        raise InputError(f"{labels.numel()} labels for {images.shape[0]} images")
    classes, inverse, counts = torch.unique(labels.cpu(), return_inverse=True, return_counts=True)
    order = torch.sort(inverse, stable=True).indices
    names = list(class_names) if class_names is not None else [str(int(c)) for c in classes]
    return FewShotImages(images[order.to(images.device)], counts, names)


def from_dataset(dataset, image_size: int | None = None, channels: int | None = None,
                 class_names=None) -> FewShotImages:
    """From any dataset of (image, label) pairs (a torchvision dataset, a list): PIL images or
    tensors [C, H, W]. PIL images are resized to image_size (when given) and converted to
    `channels` (1 or 3, when given); stored as uint8."""
    from PIL import Image
    images, labels = [], []
    for i in range(len(dataset)):
        image, label = dataset[i]
        if isinstance(image, Image.Image):
            try:
                image = pil_to_array(image, image_size, channels)
            except InputError as exc:
                raise InputError(f"dataset[{i}]: {exc}") from exc
            image = torch.from_numpy(image).permute(2, 0, 1)
        elif isinstance(image, np.ndarray):  # as Pillow reads it: 16-bit and float scaled
            try:
                image = Image.fromarray(image)
            except (TypeError, ValueError) as exc:
                raise InputTypeError(f"dataset[{i}]: an array Pillow cannot read as an image "
                                     f"({exc})") from exc
            image = torch.from_numpy(pil_to_array(image, image_size, channels)).permute(2, 0, 1)
        elif not isinstance(image, torch.Tensor):
            raise InputTypeError(f"dataset[{i}]: an image must be a PIL image, array or tensor, got "
                                 f"{type(image).__name__}")
        images.append(image)
        labels.append(int(label))
    if not images:
        raise InputError("dataset is empty")
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) != 1:
        raise InputError(f"images of several shapes {sorted(shapes)[:3]}: pass image_size")
    return from_tensors(torch.stack(images), torch.tensor(labels), class_names)


def pil_to_array(image, image_size, channels) -> np.ndarray:
    """uint8 [H, W, channels]: 8-bit modes as Pillow converts them; deeper ones scaled into
    0..255 first (`to_8bit`), never clipped."""
    from PIL import Image
    image = to_8bit(flatten_alpha(image))
    mode = {1: "L", 3: "RGB"}.get(channels, "RGB" if image.mode not in ("L", "1") else "L")
    image = image.convert(mode)
    if image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    array = np.array(image, dtype=np.uint8)  # a writable copy
    return array[..., None] if array.ndim == 2 else array


def flatten_alpha(image):
    """An image with transparency (an alpha band, or a palette or colour marked transparent)
    composited onto white paper, as a viewer shows it: dropping the alpha band would turn a
    drawing on transparent paper into all ink. Other images are returned as they are."""
    from PIL import Image
    if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in image.info:
        return image
    grey = image.mode in ("LA", "La", "L")
    rgba = image.convert("RGBA")
    paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(paper, rgba).convert("L" if grey else "RGB")


def to_8bit(image):
    """A single-band image of more than 8 bits as an 8-bit one ("L"), scaled, not clipped
    (Pillow's own convert("L") clips 16-bit values to 255 and floats to 0/1):
    - 16-bit ("I;16*"): x * 255 / 65535;
    - 32-bit integer ("I"): by the smallest of the 8-, 16- and 32-bit ranges that holds its
      values (16-bit PNGs open as "I" in older Pillows);
    - float ("F"): values in 0..1 times 255, values in 0..255 as they are.
    Negative values, non-finite floats and floats above 255 are refused (a ValueError);
    every other mode is returned as it is."""
    from PIL import Image
    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return image
    values = np.asarray(image, dtype=np.float64)
    if values.size and not np.isfinite(values).all():
        raise InputError(f"a {image.mode} image holds NaN or infinite values")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0:
        raise InputError(f"a {image.mode} image holds negative values (down to {low:g}); "
                         f"anil-fast reads unsigned pixel values")
    if image.mode.startswith("I;16"):
        top = 65535.0
    elif image.mode == "I":
        top = next(t for t in (255.0, 65535.0, 4294967295.0) if high <= t)
    else:  # "F"
        if high > 255:
            raise InputError(f"a float image holds values up to {high:g}; anil-fast reads "
                             f"float pixels in 0..1 or 0..255")
        top = 1.0 if high <= 1 else 255.0
    scaled = np.rint(values * (255.0 / top)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(scaled)  # 2-D uint8: mode "L"


# -- a folder of class folders -------------------------------------------------------------------
def _class_folders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_class_folder(folder: Path, what: str) -> None:
    """A class folder must hold its images itself (in subfolders too, as extra images of the
    class): one that holds only folders of images is a level above the classes (Omniglot's
    alphabet/character layout), which would merge its classes into one without a word."""
    entries = list(folder.iterdir())
    if any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in entries):
        return
    nested = sorted(p.name for p in entries if p.is_dir() and any(
        f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir()))
    if nested:
        raise InputError(f"{what}: {folder} holds no images of its own but folders of images "
                         f"({', '.join(nested[:3])}{' ...' if len(nested) > 3 else ''}): a level "
                         f"above the classes (an alphabet/character layout?); anil-fast reads "
                         f"one folder of images per class, so point it at the folder that holds "
                         f"the classes, or move the class folders up one level")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _is_split_folder(folder: Path) -> bool:
    """A train/ (val/, test/) folder of class folders; a folder of that name holding images
    directly is a class of its own."""
    return folder.is_dir() and any(p.is_dir() and not p.name.startswith(".")
                                   for p in folder.iterdir()) and not any(
        p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def _read_split_file(path: Path, split_file) -> dict[str, list[Path]]:
    """A split file's class folders, checked: lists of names, each a folder inside `path`,
    no name twice, no class in two splits. `split_file` may also be the mapping itself (a
    run's recorded split, `default_split_names`)."""
    if isinstance(split_file, dict):
        listed, split_file = split_file, "the run's recorded split"
    else:
        try:
            listed = parse_json(Path(split_file).read_text(encoding="utf-8-sig"))
        except (OSError, ValueError) as exc:
            raise InputError(f"split_file: {split_file} is not readable JSON ({exc})") from exc
    if not isinstance(listed, dict) or not set(listed) <= set(SPLITS) or "train" not in listed:
        raise InputError(f"split_file: {split_file} must map 'train' (and optionally "
                         f"'validation', 'test') to lists of class folder names")
    root = Path(os.path.normpath(path))  # lexical: a class folder may be a symlink to elsewhere
    splits, owner = {}, {}
    for split, names in listed.items():
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise InputError(f"split_file: {split_file}: '{split}' must be a list of class folder "
                             f"names (strings), got {type(names).__name__}"
                             + (f" {names!r}" if not isinstance(names, list) else ""))
        folders = []
        for name in names:
            folder = Path(os.path.normpath(path / name))
            if Path(name).is_absolute() or not folder.is_relative_to(root) or folder == root:
                raise InputError(f"split_file: {split_file}: '{split}' names {name!r}, which is not "
                                 f"a class folder inside the data folder {path}")
            if folder in owner:
                where = "twice in" if owner[folder] == split else f"in '{owner[folder]}' and in"
                raise InputError(f"split_file: {split_file}: class {name!r} is listed {where} "
                                 f"'{split}'; every class must appear once, in one split (a test "
                                 f"class seen in training makes the test accuracy meaningless)")
            if not folder.is_dir():
                missing = [n for n in names if not (path / n).is_dir()]
                raise InputError(f"split_file: {len(missing)} classes of '{split}' have no "
                                 f"folder in {path}, e.g. {missing[0]!r}")
            owner[folder] = split
            folders.append(folder)
        splits[split] = folders
    return splits


def folder_splits(path, split_file=None) -> dict[str, list[Path]]:
    """The class folders of each split: from `split_file` (JSON {"train": [class names],
    "validation": [...], "test": [...]}, names of folders inside `path`, each class in one
    split once; or that mapping itself), else from split folders (train/, val/ or validation/, test/, each holding
    class folders), else a fixed random 64/16/20 split of the classes."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"data: {path} is not a folder (expected one folder per class, or "
                         f"train/ val/ test/ folders of class folders)")
    if split_file is not None:
        return _read_split_file(path, split_file)
    present = {split: next((path / n for n in names if _is_split_folder(path / n)), None)
               for split, names in SPLIT_FOLDERS.items()}
    if present["train"] is not None:
        splits = {split: _class_folders(folder) for split, folder in present.items() if folder}
        seen = {}
        for split, folders in splits.items():
            for folder in folders:
                if folder.name in seen:
                    raise InputError(f"data: class {folder.name!r} is in both {seen[folder.name]}/ "
                                     f"and {folder.parent.name}/ of {path}; the splits must not "
                                     f"share classes")
                seen[folder.name] = folder.parent.name
        return splits
    classes = _class_folders(path)
    if len(classes) < 3:
        raise InputError(f"data: {path} holds {len(classes)} class folders; a split needs at "
                         f"least 3 (or give train/ val/ test/ folders or a split file)")
    order = list(classes)
    random.Random(SPLIT_SEED).shuffle(order)
    n_train = max(1, round(DEFAULT_FRACTIONS[0] * len(order)))
    n_val = max(1, round(DEFAULT_FRACTIONS[1] * len(order)))
    n_train = min(n_train, len(order) - n_val - 1)
    return {"train": sorted(order[:n_train]), "validation": sorted(order[n_train:n_train + n_val]),
            "test": sorted(order[n_train + n_val:])}


def default_split_names(path) -> dict[str, list[str]] | None:
    """The class folder names of each split when `path` is split by the fixed random default
    (no split folders; the caller gave no split file), else None. A run records them: adding
    a class folder later reshuffles the default split, and the run must keep testing on
    classes it never trained on (resume and eval pass them back as the split)."""
    path = Path(path)
    if any(_is_split_folder(path / n) for n in SPLIT_FOLDERS["train"]):
        return None
    return {split: [f.name for f in folders] for split, folders in folder_splits(path).items()}


def _fingerprint(files: list[Path], image_size: int, channels: int) -> str:
    """The decode cache's key: the size and channels, and every file's path and
    `env.file_stamp` (size, modification and change times, inode): an edited file is never
    served from the cache, even with its size and modification time put back."""
    digest = hashlib.sha256(f"v2|{image_size}|{channels}".encode())
    for f in files:
        digest.update(f"{f}|{file_stamp(f)}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:24]


def decode_images(files: list[Path], image_size: int, channels: int, name: str,
                  cache: bool = True, progress: bool = False) -> torch.Tensor:
    """The images `files` names, decoded with Pillow and resized: uint8 [N, channels, size,
    size]. 16-bit and float images are scaled into 0..255 (`to_8bit`). Refused before any
    decoding: more pixels than half the machine's memory holds. Cached in the user cache
    under `_fingerprint`'s key; an entry is verified (shape, dtype, checksum) before use."""
    check_allocation(f"{len(files)} images of {image_size}x{image_size}x{channels}",
                     len(files) * image_size * image_size * channels,
                     "lower --image-size or use fewer images")
    entry = cache_dir() / "decoded" / f"{name}_{image_size}_{channels}_{_fingerprint(files, image_size, channels)}"
    # an entry of any other shape than this decode's is rebuilt, never served
    shape = [len(files), image_size, image_size, channels]
    cached = read_cached_array(entry, {"files": len(files), "shape": shape}) if cache else None
    if cached is not None:
        array = cached[0]
    else:
        from tqdm import tqdm
        array = np.empty((len(files), image_size, image_size, channels), dtype=np.uint8)
        for i, f in enumerate(tqdm(files, desc=f"decode {name}", disable=not progress, unit="img")):
            array[i] = read_image(f, image_size, channels)
        if cache:
            write_cached_array(entry, array, {"files": len(files)})
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def read_image(path: Path, image_size: int | None, channels: int | None) -> np.ndarray:
    """One image file as uint8 [H, W, C] (`pil_to_array`), errors as `decode_file` gives them."""
    return decode_file(path, lambda image: pil_to_array(image, image_size, channels))


def decode_file(path: Path, decode):
    """decode(the PIL image of `path`), with an InputError naming the file for anything Pillow
    cannot open, a decompression bomb (more pixels than Pillow's limit,
    PIL.Image.MAX_IMAGE_PIXELS x 2) or pixel values anil-fast cannot scale."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            return decode(image)
    except Image.DecompressionBombError as exc:
        raise InputError(f"data: {path} is larger than Pillow's limit for one image ({exc}); "
                         f"shrink it or remove it") from exc
    except InputError as exc:
        raise InputError(f"data: {path}: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"data: {path} is not an image Pillow can read ({exc})") from exc


def image_folder(path, split: str = "train", image_size: int = 84, channels: int = 3,
                 split_file=None, device="cpu", cache: bool = True, progress: bool = False) -> FewShotImages:
    """One split of a folder of class folders (any images Pillow reads), resized to
    image_size x image_size, `channels` 1 or 3, as uint8 on `device`."""
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    if channels not in (1, 3):
        raise InputError(f"channels must be 1 or 3, got {channels}")
    if not is_int(image_size) or image_size < 8:
        raise InputError(f"image_size must be an int >= 8, got {image_size!r}")
    splits = folder_splits(path, split_file)
    if split not in splits or not splits[split]:
        raise InputError(f"data: {path} has no '{split}' split")
    classes = splits[split]
    for folder in classes:
        check_class_folder(folder, "data")
    per_class = [_image_files(c) for c in classes]
    empty = [c.name for c, found in zip(classes, per_class) if not found]
    if empty:
        raise InputError(f"data: class folder {empty[0]!r} of {path} holds no images "
                         f"({', '.join(IMAGE_SUFFIXES)})")
    pixels = decode_images([f for group in per_class for f in group], image_size, channels,
                           f"folder_{split}", cache, progress)
    return FewShotImages(pixels.to(device), torch.tensor([len(g) for g in per_class]),
                         [c.name for c in classes])
