"""Whole-pixel shifts of images: random ones for training (TaskSampler's `max_shift`), every
one for test-time augmentation (FewShotClassifier's `test_shifts`).

A shift moves an image's content by (dy, dx) whole pixels and fills the uncovered border by
repeating the edge pixels (paper, for Omniglot's ink on paper). Whole pixels, because a
sub-pixel shift resamples, and so blurs, the image: on Lake's runs half-pixel shifts scored
worse than none (docs/how-to/evaluate.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from anil_fast.config import check_shift

__all__ = ["check_shift", "shift_images", "random_shifts", "all_shifts", "shifted_copies",
           "with_shifted_copies", "mean_over_copies"]


def shift_images(x: torch.Tensor, shifts: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Images x [N, C, H, W] moved by shifts [N, 2] (dy, dx; whole pixels in
    -max_shift..max_shift), the border filled with the edge pixels."""
    n, _, h, w = x.shape
    if max_shift == 0:
        return x
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")  # [N, C, H+2m, W+2m]
    rows = torch.arange(h, device=x.device) + max_shift - shifts[:, :1]  # [N, H]
    cols = torch.arange(w, device=x.device) + max_shift - shifts[:, 1:]  # [N, W]
    picked = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return picked.permute(0, 3, 1, 2)  # advanced indexing put the channels last


def random_shifts(shape: tuple, max_shift: int, generator: torch.Generator, device) -> torch.Tensor:
    """Shifts [*shape, 2] drawn uniformly from -max_shift..max_shift on each axis."""
    return torch.randint(-max_shift, max_shift + 1, (*shape, 2), generator=generator, device=device)


def all_shifts(max_shift: int, device=None) -> torch.Tensor:
    """Every shift within max_shift on each axis [(2m+1)^2, 2], the unshifted one first."""
    steps = torch.arange(-max_shift, max_shift + 1, device=device)
    grid = torch.cartesian_prod(steps, steps).reshape(-1, 2)
    return torch.cat([grid.new_zeros(1, 2), grid[grid.abs().sum(1) > 0]])


def shifted_copies(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """x [N, C, H, W] at every shift of all_shifts: [(2m+1)^2, N, C, H, W]."""
    shifts = all_shifts(max_shift, x.device)
    n = x.shape[0]
    moved = shift_images(x.repeat(len(shifts), 1, 1, 1), shifts.repeat_interleave(n, 0), max_shift)
    return moved.view(len(shifts), *x.shape)


def with_shifted_copies(batch, max_shift: int):
    """A TaskBatch whose every task holds its support and query images at every shift of
    all_shifts (copy after copy, labels repeated), and the number of copies; average a
    query's scores over them with mean_over_copies."""
    from anil_fast.data.tasks import TaskBatch
    if max_shift == 0:
        return batch, 1

    def copies(x):  # [T, N, C, H, W] -> [T, copies * N, C, H, W]
        moved = shifted_copies(x.flatten(0, 1), max_shift)  # [copies, T * N, C, H, W]
        return moved.view(len(moved), *x.shape).transpose(0, 1).flatten(1, 2)
    count = (2 * max_shift + 1) ** 2
    return TaskBatch(copies(batch.support_x), batch.support_y.repeat(1, count),
                     copies(batch.query_x), batch.query_y.repeat(1, count)), count


def mean_over_copies(logits: torch.Tensor, copies: int) -> torch.Tensor:
    """Query logits [T, copies * Q, N] of with_shifted_copies' batch -> log-probabilities
    [T, Q, N]: each query's log-softmax averaged over its copies, normalised again (the
    normalised geometric mean of its class probabilities)."""
    log_p = logits.float().log_softmax(-1)
    t, _, n = log_p.shape
    return log_p.view(t, copies, -1, n).mean(1).log_softmax(-1)
