"""The objects of a run, from its resolved settings (settings.py): the model (ANIL), the images
of any dataset's split, the task samplers of the train, validation and test splits, and the
RNG states a checkpoint keeps. Training, evaluation, show and the CLI take them from here."""
from __future__ import annotations

import torch

from anil_fast.config import MAX_SEED, Config
from anil_fast.data import TaskSampler, image_folder, load_benchmark, load_split
from anil_fast.data.fewshot import default_split_names
from anil_fast.data.tasks import split_alphabets
from anil_fast.errors import InputError
from anil_fast.models import bodies
from anil_fast.models.anil import ANIL
from anil_fast.runs.settings import Settings

__all__ = ["build_anil", "load_model_state", "default_split", "split_images", "task_sampler",
           "own_rng", "rng_state", "set_rng_state"]

# Seed offsets of the held-out task pools: validation and test tasks never share a stream with
# training tasks, and every scenario of one seed scores the same test tasks.
_POOL_SEED = {"train": 0, "validation": 20_000, "test": 10_000}


def build_anil(settings: Settings) -> ANIL:
    """The model of a run, on its device, initialised from its seed, with the choices its
    settings resolved (precision, layout, batched body)."""
    config, device = settings.config, settings.device
    torch.manual_seed(config.seed)
    body, head = bodies.build(config.model, config.ways, config.image_size,
                              channels=config.input_channels, pretrained=config.pretrained,
                              hidden=config.hidden, weights_file=config.weights_file)
    return ANIL(body.to(device), head.to(device), inner_lr=config.inner_lr,
                inner_steps=config.inner_steps, freeze_body=config.freeze_body,
                first_order=config.first_order, backend=config.backend,
                batched_body=settings.batched_body, precision=config.precision,
                compile=config.compile, channels_last=settings.channels_last,
                joint_batchnorm=config.bn_mode == "joint", head_init=config.head_init,
                feature_norm=config.feature_norm)


def load_model_state(anil: ANIL, state: dict) -> None:
    """A checkpoint's weights into `anil`; an InputError when they do not fit it."""
    try:
        anil.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(f"checkpoint: its weights do not fit this model ({exc})") from exc


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
    groups = None  # training tasks within one alphabet, some of them (config.within_alphabet)
    if split == "train" and config.dataset == "omniglot" and config.within_alphabet:
        groups = split_alphabets(config.protocol, split, config.validation)
    try:
        ways = config.ways if split == "train" else config.test_ways
        return TaskSampler(images, ways, config.shots, config.queries, batch,
                           rotations=config.rotations,
                           seed=(_POOL_SEED[split] + config.seed) % (MAX_SEED + 1), num_tasks=pool,
                           groups=groups, within_group=config.within_alphabet if groups is not None else 0.0,
                           max_shift=config.augment_shift if split == "train" else 0)
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
