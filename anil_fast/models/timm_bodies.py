"""Any timm model as an ANIL body: `--model timm:NAME` (the optional extra: pip install
'anil-fast[timm]'). The model is built without its classifier (num_classes=0), so it gives
pooled feature vectors, with `in_chans` set to the data's channels and, where the
architecture takes one (ViTs), `img_size` to the run's image size.

Pretrained weights never come from the network: `--pretrained` loads them from timm's local
caches (the Hugging Face hub cache, or torch hub's checkpoints folder for URL weights), or
from the file given with `--weights-file`; without either it is an error that says how to get
them. `weights_source` says which file was used."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from anil_fast.config import TIMM_PREFIX as PREFIX
from anil_fast.config import is_timm
from anil_fast.errors import InputError

__all__ = ["is_timm", "check_name", "timm_body", "weights_source"]


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise InputError("model timm:NAME needs the timm package: pip install "
                         "'anil-fast[timm]' (or pip install timm)") from exc
    return timm


def check_name(name: str) -> None:
    """An InputError unless timm is installed and knows the architecture."""
    arch = name[len(PREFIX):]
    if not _timm().is_model(arch):
        raise InputError(f"model {name!r}: timm has no architecture {arch!r} (timm.list_models() "
                         f"lists them)")


def cached_weights(arch: str) -> str | None:
    """The local file of timm's default pretrained weights for `arch`, or None."""
    cfg = _timm().models.get_pretrained_cfg(arch, allow_unregistered=True)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        repo = cfg.hf_hub_id.split("@")[0]
        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, filename)
            if isinstance(hit, str):
                return hit
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / cfg.url.rsplit("/", 1)[-1]
        if path.is_file():
            return str(path)
    return None


def weights_source(name: str, weights_file: str | None) -> str:
    """The local file pretrained weights of `name` come from (an InputError when none)."""
    if weights_file is not None:
        if not Path(weights_file).is_file():
            raise InputError(f"weights_file: {weights_file} is not a file")
        return str(weights_file)
    arch = name[len(PREFIX):]
    found = cached_weights(arch)
    if found is None:
        raise InputError(
            f"--pretrained {name}: no local copy of timm's weights for {arch} (anil-fast never "
            f"downloads them during a run); fetch them once with python -c \"import timm; "
            f"timm.create_model('{arch}', pretrained=True)\", or pass --weights-file PATH")
    return found


def timm_body(name: str, channels: int, image_size: int, pretrained: bool = False,
              weights_file: str | None = None) -> nn.Module:
    timm = _timm()
    check_name(name)
    arch = name[len(PREFIX):]
    kwargs = dict(num_classes=0, in_chans=channels)
    if pretrained:
        kwargs.update(pretrained=True,
                      pretrained_cfg_overlay=dict(file=weights_source(name, weights_file)))
    try:
        try:  # ViTs and other fixed-size models take the image size
            return timm.create_model(arch, img_size=image_size, **kwargs)
        except TypeError:
            return timm.create_model(arch, **kwargs)
    except (RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"model {name!r} could not be built for {channels} channels at "
                         f"{image_size} px ({str(exc).splitlines()[0][:200]})") from exc
