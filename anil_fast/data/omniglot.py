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
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from anil_fast.env import cache_dir, data_roots, file_stamp, read_cached_array, write_cached_array
from anil_fast.errors import InputError, InputTypeError, is_int

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


def not_found(what: str, tried, advice: str) -> FileNotFoundError:
    """The offline error every loader gives: what is missing and why, every path tried, and
    where to put the files."""
    lines = "\n  ".join(str(p) for p in tried)
    return FileNotFoundError(f"{what}. Paths tried:\n  {lines}\n{advice}")


def search_roots(root=None) -> list[Path]:
    """The folders searched for Omniglot files, in order."""
    return data_roots("omniglot", root)


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


def _check_sha256(path: Path, digest: str | None = None) -> str:
    """Verify `path` against a SHA256SUMS file beside it, when that file lists it; returns the
    file's SHA-256 (`digest`, when the caller has computed it already)."""
    digest = digest or hashlib.sha256(path.read_bytes()).hexdigest()
    sums = path.parent / "SHA256SUMS"
    if not sums.is_file():
        return digest
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == path.name:
            if digest != parts[0]:
                raise InputError(f"Omniglot file {path} is corrupt: its SHA-256 does not match "
                                 f"{sums}; replace the file")
            break
    return digest


def source_fingerprint(source: Path) -> str:
    """What the decode cache is keyed on: the SHA-256 of a file's bytes (checked against
    SHA256SUMS where it is listed), or for an unpacked folder a hash of every PNG's relative
    path and `env.file_stamp` (size, modification and change times, inode). A changed source
    never meets an old cache entry."""
    if source.is_file():
        return _check_sha256(source)
    digest = hashlib.sha256(b"v2")
    for png in sorted(source.rglob("*.png")):
        digest.update(f"{png.relative_to(source)}|{file_stamp(png)}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def load_npz(path: Path) -> np.ndarray:
    """Ink mask, bool [chars, 20, 105, 105] (True = ink), from the compact arrays."""
    _check_sha256(path)
    try:
        with np.load(path) as arrays:
            paper = arrays["images"]
    except Exception as exc:  # zipfile.BadZipFile, KeyError, ValueError, EOFError...
        raise InputError(f"Omniglot file {path} is unreadable or truncated ({exc})") from exc
    if paper.dtype != np.bool_ or paper.ndim != 4 or paper.shape[1:] != (DRAWINGS, 105, 105):
        raise InputError(f"Omniglot file {path} holds images of shape {paper.shape} and dtype "
                         f"{paper.dtype}; expected bool (characters, 20, 105, 105)")
    return ~paper


def _decode_png(data: bytes, where: str) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("1"), dtype=bool)
    except Exception as exc:
        raise InputError(f"Omniglot image {where} is unreadable ({exc})") from exc
    if arr.shape != (105, 105):
        raise InputError(f"Omniglot image {where} has shape {arr.shape}, expected (105, 105)")
    return ~arr  # PNG: True = white paper


def _assemble(entries, source: Path):
    """entries: iterable of (alphabet, character_id, drawing, ink). Characters sorted by id."""
    by_char: dict[int, dict[int, np.ndarray]] = {}
    alphabet_of: dict[int, str] = {}
    for alphabet, cid, drawing, ink in entries:
        by_char.setdefault(cid, {})[drawing] = ink
        alphabet_of[cid] = alphabet
    if not by_char:
        raise InputError(f"Omniglot source {source} holds no character images")
    ids = sorted(by_char)
    images = np.zeros((len(ids), DRAWINGS, 105, 105), dtype=bool)
    for i, cid in enumerate(ids):
        drawings = by_char[cid]
        if sorted(drawings) != list(range(DRAWINGS)):
            raise InputError(f"Omniglot source {source}: character {cid} has drawings "
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
        raise InputError(f"Omniglot archive {path} is unreadable or truncated ({exc})") from exc

    def entries():
        with archive:
            for info in archive.infolist():
                parsed = _parse_member(info.filename)
                if parsed:
                    try:
                        data = archive.read(info)
                    except (zipfile.BadZipFile, OSError, EOFError) as exc:
                        raise InputError(f"Omniglot archive {path} is corrupt at "
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


def _official_table(split: str) -> list[dict]:
    return json.loads((Path(__file__).parent / "omniglot_alphabets.json").read_text())[split]


def packaged_alphabets(split: str) -> list[str]:
    """Alphabet name of every character of an official split (from alphabets.json)."""
    names = []
    for entry in _official_table(split):
        names += [entry["alphabet"]] * (entry["last_id"] - entry["first_id"] + 1)
    return names


def check_complete(ids, alphabets, split: str, source: Path, partial: bool = False) -> None:
    """The characters read from `source` against the official split: ids in its range, each
    under its official alphabet, none missing. partial=True admits whole alphabets missing
    (e.g. the official images_background_small1 archive), never part of one."""
    first, count = FIRST_ID[split], SPLITS[split]
    ids = [int(i) for i in ids]
    outside = [i for i in ids if not first <= i < first + count]
    if outside:
        raise InputError(f"Omniglot source {source} holds character ids {outside[0]}..{outside[-1]}, "
                         f"outside the {split} set's {first}..{first + count - 1}: is it the other "
                         f"split?")
    official = packaged_alphabets(split)
    wrong = [(i, a) for i, a in zip(ids, alphabets) if a and a != official[i - first]]
    if wrong:
        i, a = wrong[0]
        raise InputError(f"Omniglot source {source}: character id {i} is filed under {a!r}, but "
                         f"belongs to {official[i - first]!r} ({len(wrong)} such characters)")
    present = set(ids)
    whole, characters = [], []  # alphabets missing entirely; characters missing from the rest
    for entry in _official_table(split):
        span = range(entry["first_id"], entry["last_id"] + 1)
        absent = [i for i in span if i not in present]
        if len(absent) == len(span):
            whole.append(entry["alphabet"])
        else:
            characters += [f"{entry['alphabet']}/character{i - entry['first_id'] + 1:02d} (id {i})"
                           for i in absent]
    if characters or (whole and not partial):
        parts = []
        if characters:
            parts.append(", ".join(characters[:8]) +
                         (f" and {len(characters) - 8} more characters" if len(characters) > 8 else ""))
        if whole and not partial:
            parts.append(f"{len(whole)} whole alphabets ({', '.join(whole[:5])}"
                         f"{', ...' if len(whole) > 5 else ''}; partial=True admits those)")
        raise InputError(f"Omniglot source {source} is incomplete: the {split} set has {count} "
                         f"characters, {len(present)} were found; missing: {'; '.join(parts)}")


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
    Every character of the official split must be there (an error names the missing ones);
    `partial=True` admits whole alphabets missing, e.g. for images_background_small1.zip.
    """

    def __init__(self, split: str, image_size: int = 28, root=None, device="cpu",
                 download: bool = True, partial: bool = False):
        if split not in SPLITS:
            raise InputError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if not is_int(image_size):
            raise InputTypeError(f"image_size must be an int, got {type(image_size).__name__}")
        if not 8 <= image_size <= ORIGINAL_SIZE:
            raise InputError(f"image_size must be between 8 and {ORIGINAL_SIZE}, got {image_size}")
        self.split, self.image_size = split, image_size
        source, tried = find_source(split, root)
        if source is None:
            source = self._download_or_explain(split, tried, download)
        self.source = source
        images, ids, alphabets = self._load_cached(source, split, image_size)
        check_complete(ids, alphabets, split, source, partial)
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
        target = cache_dir() / "omniglot"
        if allowed:
            try:
                return download(split, target)
            except Exception as exc:  # offline: URLError, socket errors, checksum failure
                reason = f"the download failed ({type(exc).__name__}: {exc})"
        else:
            reason = "download=False"
        raise not_found(
            f"Omniglot split {split!r} not found and {reason}", tried,
            f"Place images_{split}.npz or the official images_{split}.zip (or its unpacked "
            f"folder) in one of these folders, or set ANIL_FAST_DATA to a folder holding "
            f"omniglot/.")

    @staticmethod
    def _load_cached(source: Path, split: str, image_size: int):
        key = hashlib.sha256(f"{source_fingerprint(source)}|{split}|{image_size}|v2".encode())
        cache = cache_dir() / "omniglot" / "decoded" / f"{split}_{image_size}_{key.hexdigest()[:24]}"
        cached = _read_cache(cache, image_size)
        if cached is not None:
            return cached
        if source.suffix == ".npz":
            ink = load_npz(source)
            if ink.shape[0] != SPLITS[split]:
                raise InputError(f"Omniglot file {source} holds {ink.shape[0]} characters; the "
                                 f"{split} set has {SPLITS[split]}")
            ids = np.arange(ink.shape[0]) + FIRST_ID[split]
            alphabets = packaged_alphabets(split)
        elif source.suffix == ".zip":
            ink, ids, alphabets = load_zip(source)
        else:
            ink, ids, alphabets = load_folder(source)
        images = resize_ink(torch.from_numpy(ink), image_size)
        stored = ink.astype(np.uint8) if image_size == ORIGINAL_SIZE else images.numpy()
        write_cached_array(cache, stored, {"character_ids": [int(i) for i in ids],
                                     "alphabets": list(alphabets), "source": str(source)})
        return images, np.asarray(ids), list(alphabets)


def _read_cache(cache: Path, image_size: int):
    """A cached Omniglot decode, verified (shape, dtype, checksum, value range, and the shape
    this size needs: an entry of another shape is rebuilt)."""
    cached = read_cached_array(cache)
    if cached is None:
        return None
    array, meta = cached
    if array.ndim != 5 or tuple(array.shape[-2:]) != (image_size, image_size) \
            or len(meta.get("character_ids", [])) != array.shape[0] or not (
            array.size == 0 or (0 <= array.min() and array.max() <= 1)):
        return None
    images = torch.from_numpy(array)
    if image_size == ORIGINAL_SIZE:  # cached as the uint8 ink mask
        images = resize_ink(images, image_size)
    return images, np.array(meta["character_ids"]), meta["alphabets"]
