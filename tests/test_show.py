"""`anil-fast show-tasks`: the picture of sampled tasks puts each class in its own column,
support above query."""
import torch

from anil_fast.cli import main
from anil_fast.data import TaskSampler
from anil_fast.experiments.show import task_grid


def test_task_grid_columns_are_classes():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(30, 20, 1, 8, 8, generator=g)
    sampler = TaskSampler(images, 4, 2, 3, 2, rotations=True, seed=1)
    batch = sampler.sample()
    for t in range(2):
        grid = task_grid(batch, t, 4, 2, 3)
        assert grid.shape == (5, 4, 1, 8, 8)
        for label in range(4):
            support = batch.support_x[t][batch.support_y[t] == label]
            query = batch.query_x[t][batch.query_y[t] == label]
            assert torch.equal(grid[:2, label], support) and torch.equal(grid[2:, label], query)


def test_show_tasks_cli(tmp_path, omniglot_dir, capsys):
    out = tmp_path / "pics" / "tasks.png"
    assert main(["show-tasks", "--scenario", "std-20w1s", "--tasks", "2", "--split",
                 "validation", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["show-tasks", "--scenario", "s2", "--image-size", "28", "--split",
                 "validation", "--out", str(out)]) == 2  # the seed protocol has no validation
    assert main(["show-tasks", "--scenario", "s2", "--tasks", "0", "--out", str(out)]) == 2
