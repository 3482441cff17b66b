"""Whole-pixel shifts (data/augment.py): against a loop written out by hand; in training
(TaskSampler's max_shift, Config.augment_shift) every image of a batch is its unshifted self
moved, drawn anew each batch, never in evaluation, deterministic and resumable; at test time
(FewShotClassifier's test_shifts) against the support and query copies built by hand."""
import pytest
import torch

from anil_fast import ANIL, FewShotClassifier, models
from anil_fast.config import scenario_config
from anil_fast.data import TaskBatch, TaskSampler
from anil_fast.data.augment import all_shifts, check_shift, shift_images, shifted_copies
from anil_fast.errors import InputError
from anil_fast.runs.build import task_sampler
from anil_fast.runs.settings import resolve


def shifted_by_hand(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """image [C, H, W] moved dy down and dx right, the border repeating the edge pixels."""
    c, h, w = image.shape
    out = torch.empty_like(image)
    for i in range(h):
        for j in range(w):
            out[:, i, j] = image[:, min(max(i - dy, 0), h - 1), min(max(j - dx, 0), w - 1)]
    return out


@pytest.mark.parametrize("shape, m", [((5, 1, 13, 11), 2), ((3, 3, 9, 9), 1), ((2, 2, 7, 10), 3)])
def test_shift_images_against_a_loop(shape, m):
    g = torch.Generator().manual_seed(sum(shape) + m)
    x = torch.rand(shape, generator=g)
    shifts = torch.randint(-m, m + 1, (shape[0], 2), generator=g)
    moved = shift_images(x, shifts, m)
    assert moved.shape == x.shape
    for n in range(shape[0]):
        torch.testing.assert_close(moved[n], shifted_by_hand(x[n], *shifts[n].tolist()),
                                   rtol=0, atol=0)
    assert torch.equal(shift_images(x, torch.zeros_like(shifts), m), x)


def test_all_shifts_and_the_copies():
    for m in (0, 1, 2):
        s = all_shifts(m)
        assert s.shape == ((2 * m + 1) ** 2, 2) and s[0].tolist() == [0, 0]
        assert len({tuple(r) for r in s.tolist()}) == len(s) and int(s.abs().max()) == m
    x = torch.rand(4, 1, 9, 9, generator=torch.Generator().manual_seed(3))
    copies = shifted_copies(x, 1)
    assert copies.shape == (9, 4, 1, 9, 9) and torch.equal(copies[0], x)
    for k, (dy, dx) in enumerate(all_shifts(1).tolist()):
        torch.testing.assert_close(copies[k, 2], shifted_by_hand(x[2], dy, dx), rtol=0, atol=0)


@pytest.mark.parametrize("value", [-1, 1.0, True, 5])
def test_bad_shifts_are_refused_naming_the_argument(value):
    with pytest.raises(InputError, match="max_shift must be a whole number of pixels"):
        check_shift("max_shift", value, 10)


def test_training_batches_are_their_unshifted_selves_moved(synthetic_characters):
    plain = TaskSampler(synthetic_characters, 5, 1, 2, 4, seed=7, rotations=True)
    shifted = TaskSampler(synthetic_characters, 5, 1, 2, 4, seed=7, rotations=True, max_shift=2)
    idx = shifted.next_indices()
    assert idx.shifts.shape == (4, 5, 3, 2) and int(idx.shifts.abs().max()) == 2
    first = plain.next_indices()  # the same tasks: the shifts are drawn after them
    assert torch.equal(first.characters, idx.characters) and first.shifts is None
    a, b = plain.materialise(first), shifted.materialise(idx)
    support = a.support_x.flatten(0, 1)
    expected = shift_images(support, idx.shifts[:, :, :1].reshape(-1, 2), 2)
    torch.testing.assert_close(b.support_x.flatten(0, 1), expected, rtol=0, atol=0)
    expected = shift_images(a.query_x.flatten(0, 1), idx.shifts[:, :, 1:].reshape(-1, 2), 2)
    torch.testing.assert_close(b.query_x.flatten(0, 1), expected, rtol=0, atol=0)
    assert torch.equal(a.support_y, b.support_y)
    assert not torch.equal(a.query_x, b.query_x)
    # a pool's task is shifted anew each time it is used
    pool = TaskSampler(synthetic_characters, 5, 1, 2, 3, seed=1, num_tasks=3, max_shift=1)
    assert not torch.equal(pool.next_indices().shifts, pool.next_indices().shifts)
    # evaluations never shift
    for sampler in (pool, shifted):
        assert all(i.shifts is None for i in sampler.evaluation_indices(5))


def test_shifted_sampling_is_deterministic_and_resumable(synthetic_characters):
    def sampler():
        return TaskSampler(synthetic_characters, 5, 1, 2, 4, seed=3, num_tasks=10, max_shift=1)
    a, b = sampler(), sampler()
    a.next_indices()
    state = a.state_dict()
    b.load_state_dict(state)
    x, y = a.sample(), b.sample()
    assert torch.equal(x.support_x, y.support_x) and torch.equal(x.query_x, y.query_x)
    assert torch.equal(sampler().sample().query_x, sampler().sample().query_x)


def test_the_config_shifts_the_training_split_only(omniglot_dir):
    config = scenario_config("std-5w1s", augment_shift=2, device="cpu", val_tasks=4,
                             test_tasks=4)
    assert task_sampler(config, "train", "cpu").max_shift == 2
    assert task_sampler(config, "validation", "cpu").max_shift == 0
    assert task_sampler(config, "test", "cpu").max_shift == 0
    for bad in (-1, 14, 1.5):
        with pytest.raises(InputError, match=r"augment_shift must be a whole number of pixels >= 0 below half the image size \(28 px\)"):
            resolve(scenario_config("std-5w1s", augment_shift=bad))


def blank_bordered(n: int, size: int, border: int, seed: int) -> torch.Tensor:
    """Images whose outer `border` pixels are 0, so that a shift within it is a roll."""
    x = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))
    x[..., :border, :] = 0
    x[..., -border:, :] = 0
    x[..., :border] = 0
    x[..., -border:] = 0
    return x


@pytest.mark.parametrize("head_init, bn_mode", [("proto", "support"), ("learned", "running"),
                                                ("zero", "transductive")])
def test_test_time_shifts_against_copies_built_by_hand(head_init, bn_mode):
    torch.manual_seed(0)
    anil = ANIL(*models.build("conv4", 4, 18, channels=1), head_init=head_init, inner_lr=0.3,
                inner_steps=2)
    anil.eval()
    clf = FewShotClassifier(anil, 18, 1, bn_mode=bn_mode, test_shifts=1)
    support, query = blank_bordered(6, 18, 2, 1), blank_bordered(5, 18, 2, 2)
    labels = [0, 1, 2, 0, 1, 2]  # 3 of the model's 4 ways
    probabilities = clf.fit(support, labels).predict_proba(query)
    moves = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    rolled = lambda x: torch.cat([x.roll((dy, dx), (-2, -1)) for dy, dx in moves])
    batch = TaskBatch(rolled(support)[None], torch.tensor(labels * 9)[None], rolled(query)[None],
                      torch.zeros(1, 45, dtype=torch.int64))
    _, logits = anil.adapted_logits(batch, None, bn_mode, ways=3)
    expected = logits[0].log_softmax(-1).view(9, 5, 3).mean(0).softmax(-1)
    torch.testing.assert_close(probabilities, expected, rtol=1e-4, atol=1e-5)
    plain = FewShotClassifier(anil, 18, 1, bn_mode=bn_mode).fit(support, labels).predict_proba(query)
    assert not torch.allclose(plain, probabilities)
    if bn_mode != "transductive":  # each answer depends on its own image alone
        torch.testing.assert_close(clf.predict_proba(query[2:3]), probabilities[2:3],
                                   rtol=1e-4, atol=1e-5)


def test_test_shifts_are_checked_and_the_export_refuses_them(tmp_path):
    anil = ANIL(*models.build("conv4", 3, 16, channels=1), head_init="proto")
    for bad in (-1, 8):
        with pytest.raises(InputError, match="test_shifts"):
            FewShotClassifier(anil, 16, 1, test_shifts=bad)
    clf = FewShotClassifier(anil, 16, 1, bn_mode="support", test_shifts=1)
    clf.fit(torch.rand(3, 1, 16, 16), [0, 1, 2])
    with pytest.raises(InputError, match="test_shifts"):
        clf.export(tmp_path / "model.pt2")


def test_evaluation_with_test_shifts_against_copies_built_by_hand():
    from anil_fast.evaluation import evaluate
    torch.manual_seed(0)
    anil = ANIL(*models.build("conv4", 3, 16, channels=1), head_init="learned", inner_lr=0.5,
                inner_steps=2)
    images = blank_bordered(12 * 4, 16, 2, 5).view(12, 4, 1, 16, 16)
    sampler = TaskSampler(images, 3, 1, 2, 4, seed=2, num_tasks=7)
    result = evaluate(anil, sampler, 7, "transductive", test_shifts=1)
    moves = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    rolled = lambda x: torch.cat([x.roll((dy, dx), (-2, -1)) for dy, dx in moves], 1)
    expected = []
    for idx in sampler.evaluation_indices(7):
        b = sampler.materialise(idx)
        copies = TaskBatch(rolled(b.support_x), b.support_y.repeat(1, 9), rolled(b.query_x),
                           b.query_y.repeat(1, 9))
        _, after = anil.adapted_logits(copies, None, "transductive")
        log_p = after.log_softmax(-1).view(after.shape[0], 9, -1, 3).mean(1)
        expected.append((log_p.argmax(-1) == b.query_y).float().mean(1))
    assert result["per_task_after"] == torch.cat(expected).tolist()
    assert result["test_shifts"] == 1
    plain = evaluate(anil, sampler, 7, "transductive")
    assert plain["test_shifts"] == 0 and plain["per_task_after"] != result["per_task_after"]
    with pytest.raises(InputError, match="test_shifts"):
        evaluate(anil, sampler, 7, test_shifts=8)
