import os
import shutil
from pathlib import Path

import pytest
import torch

# Triton kernels run under the interpreter where there is no GPU (how CI tests them); this
# must be set before triton decorates any kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _data_root():
    root = os.environ.get("ANIL_FAST_DATA")
    if root and (Path(root) / "omniglot" / "images_background.npz").exists():
        return Path(root) / "omniglot"
    return None


@pytest.fixture(scope="session")
def omniglot_dir():
    root = _data_root()
    if root is None:
        pytest.skip("Omniglot not found: set ANIL_FAST_DATA to a folder holding omniglot/ "
                    "(CI uses ../shared/data); tests never download")
    return root


@pytest.fixture(scope="session")
def background28(omniglot_dir):
    from anil_fast.data import Omniglot
    return Omniglot("background", 28, root=omniglot_dir, download=False)


@pytest.fixture(scope="session")
def evaluation28(omniglot_dir):
    from anil_fast.data import Omniglot
    return Omniglot("evaluation", 28, root=omniglot_dir, download=False)


@pytest.fixture(scope="session")
def synthetic_characters():
    """Omniglot-shaped images [964, 20, 1, 28, 28] that need no data: each character a fixed
    random pattern, its drawings that pattern plus noise (distinct images, learnable classes),
    for the tests of sampling and training mechanics."""
    g = torch.Generator().manual_seed(0)
    patterns = (torch.rand(964, 1, 1, 28, 28, generator=g) > 0.5).float()
    return (0.7 * patterns + 0.3 * torch.rand(964, 20, 1, 28, 28, generator=g)).contiguous()


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A fresh user cache folder for tests that exercise the disk cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ANIL_FAST_CACHE", str(cache))
    return cache


@pytest.fixture
def small_archive(omniglot_dir, tmp_path):
    src = omniglot_dir / "images_background_small1.zip"
    if not src.exists():
        pytest.skip("images_background_small1.zip not in ANIL_FAST_DATA/omniglot")
    dst = tmp_path / "images_background_small1.zip"
    shutil.copy(src, dst)
    return dst


@pytest.fixture
def offline(monkeypatch):
    """ANIL_FAST_OFFLINE=1: no download is ever tried (tests never depend on the network)."""
    monkeypatch.setenv("ANIL_FAST_OFFLINE", "1")
