"""Tasks drawn within one alphabet (TaskSampler's groups/within_group, Config.within_alphabet):
every such task's classes share an alphabet and a quarter turn, the share of such tasks is
the one asked for, a share of 0 draws exactly as before, and the alphabets of every split are
Omniglot's own."""
import json

import pytest
import torch

from anil_fast.config import scenario_config
from anil_fast.data import TaskSampler
from anil_fast.data.omniglot import packaged_alphabets
from anil_fast.data.tasks import BACKGROUND, background_characters, split_alphabets
from anil_fast.runs.build import task_sampler
from anil_fast.runs.settings import resolve
from helpers import run_cli

# 964 classes in 37 groups of uneven sizes (7..47, as alphabets are), one too small for 20 ways
SIZES = [7] + [26] * 35 + [47]
GROUPS = torch.repeat_interleave(torch.arange(len(SIZES)), torch.tensor(SIZES))


def class_groups(idx, rotations):
    """The group (and quarter turn) of every class of every task."""
    return GROUPS[idx.characters] + (idx.rotations * len(SIZES) if rotations else 0)


@pytest.mark.parametrize("rotations", [False, True])
def test_tasks_within_a_group_share_it(synthetic_characters, rotations):
    assert GROUPS.numel() == 964
    sampler = TaskSampler(synthetic_characters, 20, 1, 2, 8, rotations=rotations, seed=4,
                          groups=GROUPS, within_group=1.0)
    idx = sampler.draw_indices(300)
    groups = class_groups(idx, rotations)
    assert (groups == groups[:, :1]).all()  # one group (and one quarter turn) per task
    assert not (GROUPS[idx.characters] == 0).any()  # 7 classes cannot make 20 ways
    assert groups[:, 0].unique().numel() > 20  # the groups are drawn, not one of them
    for t in range(300):  # distinct classes
        assert len(set((idx.rotations[t] * 964 + idx.characters[t]).tolist())) == 20
    batch = sampler.materialise(idx[:2])
    assert batch.support_x.shape == (2, 20, 1, 28, 28)


def test_the_share_of_tasks_within_a_group(synthetic_characters):
    sampler = TaskSampler(synthetic_characters, 5, 1, 1, 8, seed=1, groups=GROUPS,
                          within_group=0.3)
    groups = class_groups(sampler.draw_indices(4000), False)
    one_group = (groups == groups[:, :1]).all(1).float().mean().item()
    # 30% asked; five classes drawn at random share a group about 0.0002 of the time
    assert 0.27 < one_group < 0.33


def test_a_share_of_zero_draws_as_before(synthetic_characters):
    plain = TaskSampler(synthetic_characters, 5, 1, 2, 8, seed=9, num_tasks=30)
    grouped = TaskSampler(synthetic_characters, 5, 1, 2, 8, seed=9, num_tasks=30,
                          groups=GROUPS, within_group=0.0)
    assert torch.equal(plain.pool.characters, grouped.pool.characters)
    assert torch.equal(plain.pool.drawings, grouped.pool.drawings)
    # and the same seed draws the same tasks within groups
    a, b = (TaskSampler(synthetic_characters, 5, 1, 2, 8, seed=9, groups=GROUPS,
                        within_group=0.5).draw_indices(50) for _ in range(2))
    assert torch.equal(a.characters, b.characters)


@pytest.mark.parametrize("kwargs, word", [
    (dict(within_group=0.5), "needs groups"),
    (dict(groups=GROUPS, within_group=1.5), "probability"),
    (dict(groups=GROUPS, within_group=True), "probability"),
    (dict(groups=GROUPS[:100], within_group=0.5), "one entry per class"),
    (dict(groups=GROUPS.float(), within_group=0.5), "integer tensor"),
    (dict(groups=torch.zeros(964, dtype=torch.long) - 1, within_group=0.5), ">= 0"),
    (dict(groups=torch.arange(964), within_group=0.5), "no group has 5 classes"),
])
def test_bad_groups_are_refused(synthetic_characters, kwargs, word):
    with pytest.raises((ValueError, TypeError), match=word):
        TaskSampler(synthetic_characters, 5, 1, 1, 4, **kwargs)


def test_the_alphabets_of_every_split():
    background, evaluation = packaged_alphabets("background"), packaged_alphabets("evaluation")
    assert len(background) == BACKGROUND and len(evaluation) == 659
    names = list(dict.fromkeys(background + evaluation))
    assert len(names) == 50
    seed_train = split_alphabets("seed", "train")
    assert [names[i] for i in seed_train] == background
    assert [names[i] for i in split_alphabets("seed", "test")] == evaluation
    train = split_alphabets("background", "train", validation=100)
    chosen = background_characters("train", 100)
    assert len(train) == 864 and [names[i] for i in train] == [background[i] for i in chosen]
    assert set(split_alphabets("background", "test").tolist()) == set(range(30, 50))
    standard = split_alphabets("standard", "train")
    assert len(standard) == 1200 and set(standard.tolist()) <= set(range(50))
    with pytest.raises(ValueError, match="validation"):
        split_alphabets("seed", "validation")


def test_the_config_draws_training_tasks_within_alphabets(omniglot_dir):
    config = resolve(scenario_config("lake-20w1s", within_alphabet=1.0, data_root=str(omniglot_dir),
                                     device="cpu", meta_batch=3)).config
    train = task_sampler(config, "train", "cpu")
    alphabets = split_alphabets("background", "train", config.validation)
    idx = train.draw_indices(40)
    drawn = alphabets[idx.characters] * 4 + idx.rotations
    assert (drawn == drawn[:, :1]).all()
    # validation and test tasks are drawn as always
    assert task_sampler(config, "validation", "cpu").within_group == 0.0
    for bad in (-0.1, 2, "all"):
        with pytest.raises(ValueError, match="within_alphabet"):
            resolve(scenario_config("lake-20w1s", within_alphabet=bad))
    with pytest.raises(ValueError, match="within_alphabet is for Omniglot"):
        resolve(scenario_config("cifarfs-5w1s", within_alphabet=0.5))


def test_the_command_line_trains_within_alphabets(omniglot_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, text = run_cli(capsys, "train", "--scenario", "lake-20w1s", "--within-alphabet", 0.5,
                         "--ways", 5, "--meta-steps", 2, "--meta-batch", 2, "--queries", 1,
                         "--test-tasks", 2, "--val-tasks", 2, "--precision", "fp32",
                         "--device", "cpu", "--no-progress", "--data-root", omniglot_dir,
                         "--out", out)
    assert code == 0 and "accuracy after adaptation" in text, text
    assert json.loads((out / "config.json").read_text())["within_alphabet"] == 0.5
