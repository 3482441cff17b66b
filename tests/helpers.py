"""Shared test helpers: random head problems and an explicit per-task loop."""
import torch

from anil_fast import ANIL, MetaOptimizer
from anil_fast import models
from anil_fast.data import TaskBatch
from anil_fast.models.functional import per_task_adapted_query_loss


def head_problem(tasks, s_rows, q_rows, dim, ways, dtype=torch.float64, seed=0, device="cpu",
                 scale=1.0):
    g = torch.Generator().manual_seed(seed)
    fs = (torch.randn(tasks, s_rows, dim, generator=g, dtype=dtype) * scale).to(device)
    fq = (torch.randn(tasks, q_rows, dim, generator=g, dtype=dtype) * scale).to(device)
    ys = torch.randint(0, ways, (tasks, s_rows), generator=g).to(device)
    yq = torch.randint(0, ways, (tasks, q_rows), generator=g).to(device)
    w = (torch.randn(ways, dim, generator=g, dtype=dtype) / dim ** 0.5).to(device)
    b = (torch.randn(ways, generator=g, dtype=dtype) * 0.1).to(device)
    return fs, ys, fq, yq, w, b


def per_task_loop(fs, ys, fq, yq, w, b, inner_lr, inner_steps, first_order):
    """The ANIL head as the write-ups show it: one task at a time, autograd for each step."""
    return per_task_adapted_query_loss(fs, ys, fq, yq, w, b, inner_lr=inner_lr,
                                       inner_steps=inner_steps, first_order=first_order)


def grads_of(fn, inputs, seed=0):
    """Gradients of a random linear functional of fn's (losses, logits) w.r.t. inputs."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    losses, logits = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    cl = torch.randn(losses.shape, generator=g, dtype=torch.float64).to(losses)
    cq = torch.randn(logits.shape, generator=g, dtype=torch.float64).to(logits)
    total = (losses * cl).sum() + (logits * cq).sum()
    grads = torch.autograd.grad(total, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(inputs, grads)]
    return losses.detach(), logits.detach(), grads


def random_batch(tasks=3, ways=4, shots=2, queries=3, size=16, seed=0, dtype=torch.float64,
                 channels=1):
    g = torch.Generator().manual_seed(seed)
    s, q = ways * shots, ways * queries
    return TaskBatch(torch.rand(tasks, s, channels, size, size, generator=g, dtype=dtype),
                     torch.randint(0, ways, (tasks, s), generator=g),
                     torch.rand(tasks, q, channels, size, size, generator=g, dtype=dtype),
                     torch.randint(0, ways, (tasks, q), generator=g))


def make(name="conv4", size=16, ways=4, seed=0, channels=1, hidden=None, **kwargs):
    """An ANIL model (float64 conv4 by default); kwargs go to ANIL."""
    torch.manual_seed(seed)
    body, head = models.build(name, ways, size, channels=channels, hidden=hidden)
    return ANIL(body.double(), head.double(), **kwargs)


OPTIMIZER_KWARGS = ("lr", "optimizer", "multipliers", "warmup_steps", "schedule", "momentum")


def make_trainable(*args, **kwargs):
    """(ANIL, its MetaOptimizer): kwargs named in OPTIMIZER_KWARGS go to the optimizer (Adam,
    lr 0.001 unless told), the rest to the model."""
    opt_kwargs = {k: kwargs.pop(k) for k in OPTIMIZER_KWARGS if k in kwargs}
    anil = make(*args, **kwargs)
    return anil, MetaOptimizer(anil, **opt_kwargs)


def assert_trains_alike(expected, actual, steps=2):
    """Two ANIL models take the same meta-steps (Adam, lr 0.001): equal losses, then equal
    weights."""
    expected_opt, actual_opt = MetaOptimizer(expected), MetaOptimizer(actual)
    for step in range(steps):
        batch = random_batch(seed=step)
        torch.testing.assert_close(actual_opt.step(batch)["loss"], expected_opt.step(batch)["loss"])
    for (name, p), q in zip(expected.named_parameters(), actual.parameters()):
        torch.testing.assert_close(q, p, msg=name)


def colour_classes(root, classes, per_class, seed, size=20):
    """Class folders of easy images: each class a colour of its own, each image that colour
    with noise and a random size."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in classes:
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        colour = np.array([(37 * c) % 256, (91 * c + 50) % 256, (53 * c + 120) % 256])
        for e in range(per_class):
            side = int(rng.integers(size - 4, size + 8))
            pixels = np.clip(colour + rng.normal(0, 12, (side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{e}.png")
    return root


def pairwise(dimensions: dict) -> list[dict]:
    """Rows (dicts name -> value) in which every pair of values of every two dimensions occurs
    at least once: a greedy covering array (deterministic), far fewer rows than the product."""
    names = list(dimensions)
    uncovered = {((a, va), (b, vb)) for i, a in enumerate(names) for b in names[i + 1:]
                 for va in dimensions[a] for vb in dimensions[b]}
    rows = []
    while uncovered:
        (a, va), (b, vb) = min(uncovered, key=lambda p: (names.index(p[0][0]), names.index(p[1][0]),
                                                         str(p[0][1]), str(p[1][1])))
        row = {a: va, b: vb}
        for name in names:
            if name in row:
                continue
            def gain(value):
                return sum(((k, row[k]), (name, value)) in uncovered or
                           ((name, value), (k, row[k])) in uncovered for k in row)
            row[name] = max(dimensions[name], key=gain)  # ties: the first value
        ordered = {n: row[n] for n in names}
        rows.append(ordered)
        uncovered -= {((x, ordered[x]), (y, ordered[y])) for i, x in enumerate(names)
                      for y in names[i + 1:]}
    return rows


def run_cli(capsys, *args) -> tuple[int, str]:
    """`anil-fast ARGS` in this process (every argument as a string): (exit code, its output)."""
    from anil_fast.cli import main
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err
