"""`anil-fast show-tasks`: a picture of sampled tasks, to check a preset's split and
preprocessing at a glance. Per task, one column per class (its label below): the support
images, a rule, then the query images, exactly as the sampler hands them to a meta-step."""
from __future__ import annotations

from pathlib import Path

import torch

from anil_fast.runs.build import split_images
from anil_fast.data import TaskSampler
from anil_fast.errors import InputError, is_int
from anil_fast.config import Config
from anil_fast.runs.settings import resolve

SPLITS = ("train", "validation", "test")


def task_grid(batch, task: int, ways: int, shots: int, queries: int) -> torch.Tensor:
    """One task's images as [rows, ways, C, H, W]: `shots` support rows, then query rows,
    column j holding class j (label j)."""
    def by_class(x, y, per_class):
        order = torch.argsort(y[task], stable=True)  # labels 0..ways-1, each per_class times
        return x[task][order].view(ways, per_class, *x.shape[2:]).transpose(0, 1)
    support = by_class(batch.support_x, batch.support_y, shots)
    query = by_class(batch.query_x, batch.query_y, queries)
    return torch.cat([support, query])


def show_tasks(config: Config, out, tasks: int = 3, split: str = "train",
               max_queries: int = 3) -> Path:
    """Write a PNG of `tasks` tasks drawn from `split` with the config's sampler settings to
    `out` (a .png file, or an existing folder: tasks_<split>.png there); returns its path."""
    out = Path(out)
    if out.is_dir():
        out = out / f"tasks_{split}.png"
    elif out.suffix.lower() != ".png":
        raise InputError(f"--out must be a .png file or an existing folder, got {str(out)!r}")
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    if not is_int(tasks) or not 1 <= tasks <= 16:
        raise InputError(f"tasks must be an int in 1..16, got {tasks!r}")
    from matplotlib.figure import Figure  # a figure of its own: no global backend switch

    config = resolve(config, "cpu").config  # checked and in today's terms
    images = split_images(config, split, "cpu")
    ways = config.ways if split == "train" else config.test_ways  # --eval-ways
    sampler = TaskSampler(images, ways, config.shots, config.queries, tasks,
                          rotations=config.rotations, seed=config.seed)
    batch = sampler.sample()
    shown_queries = min(config.queries, max_queries)
    rows = config.shots + shown_queries
    fig = Figure(figsize=(max(4.0, 0.6 * ways + 1), 0.6 * rows * tasks + 1))
    axes = fig.subplots(tasks, 1, squeeze=False)
    for t, ax in enumerate(axes[:, 0]):
        grid = task_grid(batch, t, ways, config.shots, config.queries)[:rows]
        r, w, c, h, wd = grid.shape
        picture = grid.permute(0, 3, 1, 4, 2).reshape(r * h, w * wd, c).clamp(0, 1).numpy()
        ax.imshow(picture[..., 0] if c == 1 else picture,
                  cmap="gray_r" if c == 1 else None, interpolation="nearest")
        ax.axhline(config.shots * h - 0.5, color="red", linewidth=1.5)
        ax.set_xticks([j * wd + wd / 2 - 0.5 for j in range(w)], [str(j) for j in range(w)],
                      fontsize=6)
        ax.set_yticks([config.shots * h / 2, config.shots * h + shown_queries * h / 2],
                      ["support", "query"], fontsize=7)
        ax.set_title(f"task {t}: {ways}-way {config.shots}-shot ({split}, labels on the "
                     f"axis; {shown_queries} of {config.queries} queries per class)", fontsize=7)
    source = (f"{config.protocol} protocol" if config.dataset == "omniglot" else
              config.data if config.dataset == "folder" else config.dataset)
    fig.suptitle(f"{config.scenario}: {source}, {config.image_size} px"
                 f"{', rotations as classes' if config.rotations else ''}", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
