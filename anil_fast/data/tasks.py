"""Few-shot tasks drawn on the images' device with tensor ops only (no Python loop per image or
per task), and the splits of the two Omniglot protocols."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from anil_fast.errors import InputError, InputTypeError, check_int, is_int
from anil_fast.config import PROTOCOLS
from anil_fast.env import check_allocation
from anil_fast.data.augment import check_shift, random_shifts, shift_images
from anil_fast.data.fewshot import FewShotImages
from anil_fast.data.omniglot import Omniglot, packaged_alphabets

DRAW_CHUNK = 65_536  # tasks drawn per call; pools up to it draw exactly as one call


@dataclass
class TaskBatch:
    """T tasks: support_x [T,S,C,H,W], support_y [T,S], query_x [T,Q,C,H,W], query_y [T,Q];
    S = ways*shots, Q = ways*queries, labels int64 in 0..ways-1."""
    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def __post_init__(self):
        for name in ("support_x", "query_x"):
            x = getattr(self, name)
            if not isinstance(x, torch.Tensor) or x.dim() != 5 or not x.is_floating_point():
                raise InputTypeError(f"{name} must be a float tensor [tasks, rows, C, H, W]")
        for name in ("support_y", "query_y"):
            y = getattr(self, name)
            if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.dim() != 2:
                raise InputTypeError(f"{name} must be an int64 tensor [tasks, rows]")
        if self.support_y.shape != self.support_x.shape[:2]:
            raise InputError(f"support_y has shape {tuple(self.support_y.shape)}, support_x "
                             f"has {tuple(self.support_x.shape[:2])} tasks x rows")
        if self.query_y.shape != self.query_x.shape[:2]:
            raise InputError(f"query_y has shape {tuple(self.query_y.shape)}, query_x "
                             f"has {tuple(self.query_x.shape[:2])} tasks x rows")
        if self.support_x.shape[0] != self.query_x.shape[0]:
            raise InputError("support_x and query_x hold different numbers of tasks")
        if self.support_x.shape[2:] != self.query_x.shape[2:]:
            raise InputError("support_x and query_x hold images of different shapes")

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def to(self, device) -> "TaskBatch":
        return TaskBatch(*(getattr(self, f.name).to(device) for f in fields(self)))

    def __getitem__(self, index) -> "TaskBatch":
        """A slice of the tasks (e.g. one rank's share): batch[2:4]."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TaskBatch(*(getattr(self, f.name)[index] for f in fields(self)))


@dataclass
class TaskIndices:
    """What defines a batch of tasks: characters [T,W], drawings [T,W,shots+queries],
    rotations [T,W] (quarter turns), and for training with augmentation each image's shift
    [T,W,shots+queries,2] (None: unshifted). Cheap to draw; materialised into images on demand."""
    characters: torch.Tensor
    drawings: torch.Tensor
    rotations: torch.Tensor
    shifts: torch.Tensor | None = None

    def __getitem__(self, index) -> "TaskIndices":
        return TaskIndices(self.characters[index], self.drawings[index], self.rotations[index],
                           None if self.shifts is None else self.shifts[index])


def _as_float(images: torch.Tensor) -> torch.Tensor:
    """8-bit storage to float in 0..1, per batch (float storage passes through)."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


class TaskSampler:
    """Draws meta-batches of N-way K-shot tasks from images [characters, drawings, C, H, W]
    (float, every class the same count, as Omniglot) or a FewShotImages (uint8 or float,
    classes of any size: each class's shots and queries come from its own images).

    With `rotations=True` every quarter turn of a character is a class of its own (the
    standard Omniglot protocol), so there are 4x as many classes; the default, False, is
    Config's (the presets turn rotations on where their protocol has them). With `num_tasks`
    the sampler
    draws a fixed pool of that many tasks once and walks through it in meta-batches (reshuffled
    each pass); without it, every batch is new. Deterministic for a seed; `state_dict()` and
    `load_state_dict()` carry the position for resumed runs.

    `groups` (an int per class of the images, e.g. each character's alphabet) with
    `within_group` = p: each task is drawn, with probability p, from the classes of one group
    (one alphabet, in one quarter turn), chosen uniformly among the groups with at least
    `ways` classes; the others as usual. Lake et al.'s one-shot runs are 20-way tasks within
    one alphabet: training on such tasks trains on their kind of confusions. p = 0 draws
    exactly as without groups.

    `max_shift` = m > 0 augments the training batches (next_indices, sample): every image of
    a batch moves by a random whole number of pixels in -m..m on each axis, drawn anew each
    time a task is used (a pool's tasks too); evaluation_indices never shifts.
    """

    def __init__(self, images: torch.Tensor, ways: int, shots: int, queries: int,
                 meta_batch: int, rotations: bool = False, seed: int = 0,
                 num_tasks: int | None = None, groups: torch.Tensor | None = None,
                 within_group: float = 0.0, max_shift: int = 0):
        if isinstance(images, Omniglot):
            images = images.images
        if isinstance(images, torch.Tensor):
            if images.dim() != 5:
                raise InputTypeError("images must be a tensor [characters, drawings, C, H, W] or a "
                                     "FewShotImages")
            if not images.is_floating_point():
                raise InputTypeError(f"images must be a floating-point tensor (e.g. values in 0..1), "
                                     f"got {images.dtype}; for 8-bit data use FewShotImages (uint8 "
                                     f"storage, converted per batch)")
            data = FewShotImages.from_grid(images)
        elif isinstance(images, FewShotImages):
            data = images
        else:
            raise InputTypeError(f"images must be a tensor [characters, drawings, C, H, W] or a "
                                 f"FewShotImages, got {type(images).__name__}")
        height, width = data.image_shape[-2:]
        if rotations and height != width:
            raise InputError(f"rotations=True needs square images, got {height}x{width} (a "
                             f"quarter turn would change their shape)")
        check_int("ways", ways, 2)
        check_int("shots", shots, 1)
        check_int("queries", queries, 1)
        check_int("meta_batch", meta_batch, 1)
        if num_tasks is not None:
            check_int("num_tasks", num_tasks, 1)
        data.check_examples(shots + queries)
        self.max_shift = check_shift("max_shift", max_shift, min(height, width))
        self.num_classes = data.num_classes * (4 if rotations else 1)
        if ways > self.num_classes:
            raise InputError(f"ways ({ways}) is larger than the {self.num_classes} classes of "
                             f"these images")
        self.data, self.ways, self.shots, self.queries = data, ways, shots, queries
        self.meta_batch, self.rotations, self.seed = meta_batch, rotations, seed
        self.device = data.device
        self.within_group, self.class_groups, self.eligible_groups = \
            self._check_groups(groups, within_group, data.num_classes)
        self.max_count = int(data.counts.max())
        self._uniform = bool((data.counts == self.max_count).all())
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.num_tasks = num_tasks
        if num_tasks is not None:  # the pool is drawn now: refuse one the memory cannot hold
            check_allocation(f"a pool of {num_tasks:,} tasks", num_tasks * ways * (shots + queries + 2) * 8,
                             "draw fewer tasks (or sample endlessly: num_tasks=None)")
        self._flat_bank = None
        self.pool = self.draw_indices(num_tasks) if num_tasks is not None else None
        self.position = 0  # next task of the pool
        self.order = None

    def _check_groups(self, groups, within_group, base_classes):
        """(p, the group of every class counting rotations [num_classes], the groups with at
        least `ways` classes); (0.0, None, None) without groups."""
        if isinstance(within_group, bool) or not isinstance(within_group, (int, float)) or \
                not 0.0 <= within_group <= 1.0:
            raise InputError(f"within_group must be a probability in 0..1, got {within_group!r}")
        if groups is None:
            if within_group:
                raise InputError("within_group > 0 needs groups (e.g. each character's alphabet)")
            return 0.0, None, None
        if not isinstance(groups, torch.Tensor) or groups.dtype not in (torch.int32, torch.int64) \
                or groups.shape != (base_classes,):
            raise InputTypeError(f"groups must be an integer tensor with one entry per class "
                                 f"({base_classes}), got "
                                 f"{tuple(groups.shape) if isinstance(groups, torch.Tensor) else type(groups).__name__}")
        if within_group == 0:
            return 0.0, None, None
        groups = groups.long().cpu()
        if groups.min() < 0:
            raise InputError("groups must be >= 0")
        count = int(groups.max()) + 1
        if self.rotations:  # a group per alphabet and quarter turn
            groups = torch.cat([groups + k * count for k in range(4)])
        sizes = torch.bincount(groups)
        eligible = (sizes >= self.ways).nonzero().flatten()
        if eligible.numel() == 0:
            raise InputError(f"within_group: no group has {self.ways} classes (the largest has "
                             f"{int(sizes.max())}); draw fewer ways or turn within_group off")
        return float(within_group), groups.to(self.device), eligible.to(self.device)

    # -- drawing -----------------------------------------------------------------------------
    def draw_indices(self, tasks: int) -> TaskIndices:
        """`tasks` tasks' indices, drawn DRAW_CHUNK tasks at a time (the random keys of one
        chunk are [chunk, classes]: a pool of a million tasks must not need them all at once)."""
        if tasks <= DRAW_CHUNK:
            return self._draw(tasks)
        parts = [self._draw(min(DRAW_CHUNK, tasks - start)) for start in range(0, tasks, DRAW_CHUNK)]
        return TaskIndices(*(torch.cat([getattr(p, name) for p in parts])
                             for name in ("characters", "drawings", "rotations")))

    def _draw(self, tasks: int) -> TaskIndices:
        g, dev = self.generator, self.device
        # Classes distinct within a task: the `ways` largest of uniform keys. Their order is
        # random, so class j of a task getting label j is a random labelling.
        keys = torch.rand(tasks, self.num_classes, generator=g, device=dev)
        if self.within_group:  # some tasks from one group: keys outside it sort below all others
            within = torch.rand(tasks, generator=g, device=dev) < self.within_group
            pick = torch.randint(len(self.eligible_groups), (tasks,), generator=g, device=dev)
            outside = self.class_groups[None, :] != self.eligible_groups[pick][:, None]
            keys = keys - 2.0 * (outside & within[:, None])
        classes = keys.topk(self.ways).indices
        base = self.data.num_classes
        characters = classes % base
        rotations = classes // base if self.rotations else torch.zeros_like(classes)
        # Support and query examples disjoint: the first shots+queries of a random permutation
        # of each class's own examples (keys past a class's count sort last).
        keys = torch.rand(tasks, self.ways, self.max_count, generator=g, device=dev)
        if not self._uniform:
            beyond = torch.arange(self.max_count, device=dev) >= self.data.counts[characters].unsqueeze(-1)
            keys = keys.masked_fill(beyond, 2.0)
        drawings = keys.argsort(dim=-1)[..., :self.shots + self.queries]
        return TaskIndices(characters, drawings, rotations)

    def _bank(self) -> torch.Tensor:
        """All images as [images, C, H, W]; with rotations, the four quarter turns are stored
        once (4x the memory, built at first use) so a batch is one index_select."""
        if self._flat_bank is None:
            pixels = self.data.pixels
            if self.rotations:
                pixels = torch.cat([pixels.rot90(k, (-2, -1)) for k in range(4)])
            self._flat_bank = pixels.contiguous()
        return self._flat_bank

    def materialise(self, idx: TaskIndices) -> TaskBatch:
        """Gather the images of the tasks `idx` describes (on the images' device)."""
        tasks, ways = idx.characters.shape
        s = self.shots
        total = self.data.pixels.shape[0]
        first = idx.rotations * total + self.data.offsets[idx.characters]  # row of example 0
        rows = first.unsqueeze(-1) + idx.drawings  # [T, W, s+q]
        bank = self._bank()
        support = _as_float(bank.index_select(0, rows[:, :, :s].reshape(-1)))
        query = _as_float(bank.index_select(0, rows[:, :, s:].reshape(-1)))
        if idx.shifts is not None:
            support = shift_images(support, idx.shifts[:, :, :s].reshape(-1, 2), self.max_shift)
            query = shift_images(query, idx.shifts[:, :, s:].reshape(-1, 2), self.max_shift)
        labels = torch.arange(ways, device=self.device).view(1, ways, 1)
        return TaskBatch(
            support_x=support.view(tasks, ways * s, *bank.shape[1:]),
            support_y=labels.expand(tasks, ways, s).reshape(tasks, ways * s),
            query_x=query.view(tasks, ways * self.queries, *bank.shape[1:]),
            query_y=labels.expand(tasks, ways, self.queries).reshape(tasks, ways * self.queries),
        )

    def next_indices(self) -> TaskIndices:
        """The indices of the next meta-batch (from the pool, or newly drawn), with random
        shifts when the sampler has a max_shift."""
        idx = self._next_tasks()
        if self.max_shift:  # drawn for the whole batch, so that every rank draws the same
            idx.shifts = random_shifts(idx.drawings.shape, self.max_shift, self.generator, self.device)
        return idx

    def _next_tasks(self) -> TaskIndices:
        if self.pool is None:
            return self.draw_indices(self.meta_batch)
        picked = []
        need = self.meta_batch
        while need > 0:
            if self.order is None or self.position >= self.num_tasks:
                self.order = torch.randperm(self.num_tasks, generator=self.generator,
                                            device=self.device) if self.position else \
                    torch.arange(self.num_tasks, device=self.device)
                self.position = 0
            take = min(need, self.num_tasks - self.position)
            picked.append(self.order[self.position:self.position + take])
            self.position += take
            need -= take
        return self.pool[torch.cat(picked)]

    def evaluation_indices(self, tasks: int):
        """The indices of `tasks` tasks in meta-batches, for an evaluation: a pool's first
        `tasks` tasks in the pool's own order (cycling past its end), from its start on every
        call and without moving the training position, so every evaluation over the pool
        scores the same tasks; without a pool, newly drawn batches."""
        done = 0
        while done < tasks:
            count = min(self.meta_batch, tasks - done)
            if self.pool is None:
                yield self._next_tasks()[:count]
            else:
                rows = torch.arange(done, done + count, device=self.device) % self.num_tasks
                yield self.pool[rows]
            done += count

    def sample(self) -> TaskBatch:
        return self.materialise(self.next_indices())

    def __iter__(self):
        while True:
            yield self.sample()

    # -- resumable state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "position": self.position,
                "order": None if self.order is None else self.order.cpu()}

    def load_state_dict(self, state: dict) -> None:
        """A state_dict() of a sampler over the same pool; an InputError for one that is not
        (another pool size, a damaged generator state), before anything changes."""
        order, position = state.get("order"), state.get("position")
        limit = self.num_tasks if self.num_tasks is not None else None
        if not is_int(position) or position < 0 or (limit is not None and position > limit):
            raise InputError(f"sampler state: position {position!r} is not a task of this "
                             f"sampler's pool ({limit} tasks)")
        if order is not None and (not isinstance(order, torch.Tensor) or order.dtype != torch.int64
                                  or limit is None or order.shape != (limit,)):
            raise InputError(f"sampler state: its order does not fit this sampler's pool of "
                             f"{limit} tasks")
        generator = torch.Generator(device=self.device)
        try:
            generator.set_state(state["generator"])
        except (RuntimeError, TypeError, KeyError) as exc:
            raise InputError(f"sampler state: its generator state is not a torch generator's "
                             f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from exc
        self.generator = generator
        self.position = position
        self.order = None if order is None else order.to(self.device)


BACKGROUND = 964  # characters of the background set (the evaluation set has 659)
STANDARD_TRAIN = 1200
STANDARD_SEED = 1623  # fixed seed of the standard protocol's character split


def load_split(protocol: str, split: str, image_size: int = 28, root=None, device="cpu",
               validation: int = 0, download: bool = True) -> torch.Tensor:
    """Images [characters, 20, 1, H, W] of one split of a protocol.

    "seed": train = the background set (964 characters), test = the evaluation set (659).
    "standard" (MAML/ANIL papers): all 1,623 characters permuted with a fixed seed; the first
    1,200 train, the other 423 test; `validation` characters are taken from the end of the
    training part for split="validation".
    "background" (Lake et al.'s: the evaluation set never seen in training): train = the
    background set less `validation` characters (a fixed random choice of them) held out for
    split="validation"; test = the evaluation set.
    """
    if protocol not in PROTOCOLS:
        raise InputError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if split not in ("train", "validation", "test"):
        raise InputError(f"split must be 'train', 'validation' or 'test', got {split!r}")
    check_int("validation", validation, 0)
    if protocol == "seed":
        if split == "validation":
            raise InputError("split='validation' exists only in the 'standard' and "
                             "'background' protocols")
        name = "background" if split == "train" else "evaluation"
        return Omniglot(name, image_size, root, device, download).images
    if protocol == "background":
        if split == "test":
            return Omniglot("evaluation", image_size, root, device, download).images
        if not validation < BACKGROUND:
            raise InputError(f"validation must be below {BACKGROUND}, got {validation}")
        characters = background_characters(split, validation)
        return Omniglot("background", image_size, root, "cpu", download).images[characters].to(device)
    if validation >= STANDARD_TRAIN:
        raise InputError(f"validation must be below {STANDARD_TRAIN}, got {validation}")
    characters = standard_characters(split, validation)
    both = torch.cat([Omniglot(s, image_size, root, "cpu", download).images
                      for s in ("background", "evaluation")])
    return both[characters].to(device)


def split_alphabets(protocol: str, split: str, validation: int = 0) -> torch.Tensor:
    """The alphabet (an index into the 50 official alphabets, background then evaluation) of
    every character of load_split(protocol, split, validation=...), in its order."""
    names = packaged_alphabets("background") + packaged_alphabets("evaluation")
    index = {name: i for i, name in enumerate(dict.fromkeys(names))}
    alphabets = torch.tensor([index[name] for name in names])
    if protocol == "seed":
        if split == "validation":
            raise InputError("split='validation' exists only in the 'standard' and "
                             "'background' protocols")
        return alphabets[:BACKGROUND] if split == "train" else alphabets[BACKGROUND:]
    if protocol == "background":
        if split == "test":
            return alphabets[BACKGROUND:]
        return alphabets[background_characters(split, validation)]
    return alphabets[standard_characters(split, validation)]


def background_characters(split: str, validation: int = 0) -> torch.Tensor:
    """Indices into the background set's 964 characters of the "background" protocol's
    training or validation split (the validation ones: a fixed random choice, sorted)."""
    order = torch.randperm(BACKGROUND, generator=torch.Generator().manual_seed(STANDARD_SEED))
    held = order[BACKGROUND - validation:] if validation else order[:0]
    chosen = held if split == "validation" else order[:BACKGROUND - validation]
    return chosen.sort().values


def standard_characters(split: str, validation: int = 0) -> torch.Tensor:
    """Indices into the 1,623 characters (background then evaluation) of a standard split."""
    order = torch.randperm(964 + 659, generator=torch.Generator().manual_seed(STANDARD_SEED))
    train_end = STANDARD_TRAIN - validation
    if split == "train":
        return order[:train_end]
    if split == "validation":
        return order[train_end:STANDARD_TRAIN]
    return order[STANDARD_TRAIN:]
