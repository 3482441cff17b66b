"""Omniglot (Lake et al., 2015) as one float tensor resident on a device.

Formats understood, looked for in `root`, then `$ANIL_FAST_DATA/omniglot`, then
`~/.cache/anil_fast/omniglot`:
- the compact arrays `images_{split}.npz` (bool [chars, 20, 105, 105], True = paper);
- the official archives `images_{split}.zip` and their unpacked folders `images_{split}/`,
  also under torchvision's `omniglot-py/` layout.
When nothing is found and `download=True`, the official archives are downloaded (the same
upstream files torchvision fetches) with a progress bar and an MD5 check.

The decoded, resized images are cached on disk as .npy next to the user cache so a second load
is a memory map plus one copy.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = {"background": 964, "evaluation": 659}
FIRST_ID = {"background": 1, "evaluation": 965}
DRAWINGS = 20
ORIGINAL_SIZE = 105

# The upstream archives torchvision's Omniglot dataset downloads, with its MD5 sums.
UPSTREAM_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
UPSTREAM_MD5 = {
    "background": "68d2efa1b9178cc56df9314c21c6e718",
    "evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
_PNG_NAME = re.compile(r"(\d{4})_(\d{2})\.png$")


def user_cache_dir() -> Path:
    return Path(os.environ.get("ANIL_FAST_CACHE", Path.home() / ".cache" / "anil_fast"))


def search_roots(root=None) -> list[Path]:
    """The folders searched for Omniglot files, in order."""
    roots = []
    if root is not None:
        roots.append(Path(root))
    if os.environ.get("ANIL_FAST_DATA"):
        roots.append(Path(os.environ["ANIL_FAST_DATA"]) / "omniglot")
    roots.append(user_cache_dir() / "omniglot")
    return roots


def _candidates(folder: Path, split: str) -> list[Path]:
    name = f"images_{split}"
    return [folder / f"{name}.npz", folder / f"{name}.zip", folder / name,
            folder / "omniglot-py" / f"{name}.zip", folder / "omniglot-py" / name]


def find_source(split: str, root=None) -> tuple[Path | None, list[Path]]:
    tried = []
    for folder in search_roots(root):
        for path in _candidates(folder, split):
            tried.append(path)
            if path.exists():
                return path, tried
    return None, tried


def _check_sha256(path: Path) -> None:
    """Verify `path` against a SHA256SUMS file beside it, when that file lists it."""
    sums = path.parent / "SHA256SUMS"
    if not sums.is_file():
        return
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == path.name:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != parts[0]:
                raise ValueError(f"Omniglot file {path} is corrupt: its SHA-256 does not match "
                                 f"{sums}; replace the file")
            return


def load_npz(path: Path) -> np.ndarray:
    """Ink mask, bool [chars, 20, 105, 105] (True = ink), from the compact arrays."""
    _check_sha256(path)
    try:
        with np.load(path) as arrays:
            paper = arrays["images"]
    except Exception as exc:  # zipfile.BadZipFile, KeyError, ValueError, EOFError...
        raise ValueError(f"Omniglot file {path} is unreadable or truncated ({exc})") from exc
    if paper.dtype != np.bool_ or paper.ndim != 4 or paper.shape[1:] != (DRAWINGS, 105, 105):
        raise ValueError(f"Omniglot file {path} holds images of shape {paper.shape} and dtype "
                         f"{paper.dtype}; expected bool (characters, 20, 105, 105)")
    return ~paper


def _decode_png(data: bytes, where: str) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("1"), dtype=bool)
    except Exception as exc:
        raise ValueError(f"Omniglot image {where} is unreadable ({exc})") from exc
    if arr.shape != (105, 105):
        raise ValueError(f"Omniglot image {where} has shape {arr.shape}, expected (105, 105)")
    return ~arr  # PNG: True = white paper


def _assemble(entries, source: Path):
    """entries: iterable of (alphabet, character_id, drawing, ink). Characters sorted by id."""
    by_char: dict[int, dict[int, np.ndarray]] = {}
    alphabet_of: dict[int, str] = {}
    for alphabet, cid, drawing, ink in entries:
        by_char.setdefault(cid, {})[drawing] = ink
        alphabet_of[cid] = alphabet
    if not by_char:
        raise ValueError(f"Omniglot source {source} holds no character images")
    ids = sorted(by_char)
    images = np.zeros((len(ids), DRAWINGS, 105, 105), dtype=bool)
    for i, cid in enumerate(ids):
        drawings = by_char[cid]
        if sorted(drawings) != list(range(DRAWINGS)):
            raise ValueError(f"Omniglot source {source}: character {cid} has drawings "
                             f"{sorted(d + 1 for d in drawings)}, expected 1..20")
        for d, ink in drawings.items():
            images[i, d] = ink
    return images, np.array(ids), [alphabet_of[c] for c in ids]


def _parse_member(name: str):
    """'images_background/Alphabet/character01/0108_01.png' -> (alphabet, 108, 0)."""
    match = _PNG_NAME.search(name)
    if not match:
        return None
    parts = Path(name).parts
    alphabet = parts[-3] if len(parts) >= 3 else ""
    return alphabet, int(match.group(1)), int(match.group(2)) - 1


def load_zip(path: Path):
    """Official archive -> (ink [chars,20,105,105], official ids, alphabet per character)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"Omniglot archive {path} is unreadable or truncated ({exc})") from exc

    def entries():
        with archive:
            for info in archive.infolist():
                parsed = _parse_member(info.filename)
                if parsed:
                    try:
                        data = archive.read(info)
                    except (zipfile.BadZipFile, OSError, EOFError) as exc:
                        raise ValueError(f"Omniglot archive {path} is corrupt at "
                                         f"{info.filename} ({exc})") from exc
                    yield (*parsed, _decode_png(data, f"{path}:{info.filename}"))
    return _assemble(entries(), path)


def load_folder(path: Path):
    def entries():
        for png in sorted(path.rglob("*.png")):
            parsed = _parse_member(str(png.relative_to(path.parent)))
            if parsed:
                yield (*parsed, _decode_png(png.read_bytes(), str(png)))
    return _assemble(entries(), path)


def packaged_alphabets(split: str) -> list[str]:
    """Alphabet name of every character of an official split (from alphabets.json)."""
    table = json.loads((Path(__file__).parent / "omniglot_alphabets.json").read_text())[split]
    names = []
    for entry in table:
        names += [entry["alphabet"]] * (entry["last_id"] - entry["first_id"] + 1)
    return names


def resize_ink(ink: torch.Tensor, image_size: int) -> torch.Tensor:
    """bool/uint8 [chars, 20, 105, 105] -> float32 [chars, 20, 1, s, s], area interpolation."""
    images = ink.to(torch.float32).unsqueeze(2)
    if image_size == ORIGINAL_SIZE:
        return images
    chars = images.shape[0]
    flat = images.reshape(chars * DRAWINGS, 1, ORIGINAL_SIZE, ORIGINAL_SIZE)
    out = torch.empty(chars * DRAWINGS, 1, image_size, image_size)
    for start in range(0, flat.shape[0], 4096):  # chunks keep peak memory small
        out[start:start + 4096] = F.interpolate(flat[start:start + 4096],
                                                size=(image_size, image_size), mode="area")
    return out.reshape(chars, DRAWINGS, 1, image_size, image_size)


def download(split: str, folder: Path) -> Path:
    from torchvision.datasets.utils import download_url
    filename = f"images_{split}.zip"
    download_url(f"{UPSTREAM_URL}/{filename}", str(folder), filename, UPSTREAM_MD5[split])
    return folder / filename


class Omniglot:
    """One official Omniglot split as a tensor on `device`.

    Attributes: `images` float32 [characters, 20, 1, H, W] (ink 1.0, paper 0.0), `alphabets`
    (the alphabet of every character), `character_ids` (official ids), `source` (file read).
    """

    def __init__(self, split: str, image_size: int = 28, root=None, device="cpu",
                 download: bool = True):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int):
            raise TypeError(f"image_size must be an int, got {type(image_size).__name__}")
        if not 8 <= image_size <= ORIGINAL_SIZE:
            raise ValueError(f"image_size must be between 8 and {ORIGINAL_SIZE}, got {image_size}")
        self.split, self.image_size = split, image_size
        source, tried = find_source(split, root)
        if source is None:
            source = self._download_or_explain(split, tried, download)
        self.source = source
        images, ids, alphabets = self._load_cached(source, split, image_size)
        self.images = images.to(device)
        self.character_ids = ids
        self.alphabets = alphabets

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        return (f"Omniglot(split={self.split!r}, characters={len(self)}, "
                f"image_size={self.image_size}, device={self.images.device}, source={self.source})")

    @staticmethod
    def _download_or_explain(split, tried, allowed):
        target = user_cache_dir() / "omniglot"
        if allowed:
            try:
                return download(split, target)
            except Exception as exc:  # offline: URLError, socket errors, checksum failure
                reason = f"the download failed ({type(exc).__name__}: {exc})"
        else:
            reason = "download=False"
        lines = "\n  ".join(str(p) for p in tried)
        raise FileNotFoundError(
            f"Omniglot split {split!r} not found and {reason}. Paths tried:\n  {lines}\n"
            f"Place images_{split}.npz or the official images_{split}.zip (or its unpacked "
            f"folder) in one of these folders, or set ANIL_FAST_DATA to a folder holding "
            f"omniglot/.")

    @staticmethod
    def _load_cached(source: Path, split: str, image_size: int):
        stat = source.stat()
        key = hashlib.sha1(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|v1".encode())
        cache = user_cache_dir() / "omniglot" / "decoded" / f"{split}_{image_size}_{key.hexdigest()[:16]}"
        images_file, meta_file = cache.with_suffix(".npy"), cache.with_suffix(".json")
        if images_file.exists() and meta_file.exists():
            try:
                meta = json.loads(meta_file.read_text())
                array = np.load(images_file, mmap_mode="r")
                images = torch.from_numpy(np.array(array))  # one copy out of the memory map
                if image_size == ORIGINAL_SIZE:  # cached as the uint8 ink mask
                    images = resize_ink(images, image_size)
                return images, np.array(meta["character_ids"]), meta["alphabets"]
            except Exception:  # a broken cache is rebuilt, never trusted
                pass
        if source.suffix == ".npz":
            ink = load_npz(source)
            ids = np.arange(ink.shape[0]) + FIRST_ID[split]
            alphabets = packaged_alphabets(split)
            if len(alphabets) != ink.shape[0]:
                alphabets = [""] * ink.shape[0]
        elif source.suffix == ".zip":
            ink, ids, alphabets = load_zip(source)
        else:
            ink, ids, alphabets = load_folder(source)
        ink_t = torch.from_numpy(ink)
        images = resize_ink(ink_t, image_size)
        try:  # write then rename, so a killed process never leaves a half-written cache
            cache.parent.mkdir(parents=True, exist_ok=True)
            stored = ink.astype(np.uint8) if image_size == ORIGINAL_SIZE else images.numpy()
            tmp = images_file.with_suffix(".tmp.npy")
            np.save(tmp, stored)
            os.replace(tmp, images_file)
            meta_file.write_text(json.dumps({"character_ids": [int(i) for i in ids],
                                             "alphabets": list(alphabets), "source": str(source)}))
        except OSError:
            pass  # a read-only home only costs the next load its decoding time
        return images, np.asarray(ids), list(alphabets)
