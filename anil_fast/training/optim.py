"""The optimisation side of ANIL training (the model side is anil.ANIL).

`MetaOptimizer(anil, lr, ...)` owns every decision about how the meta-parameters move:
- parameter groups: the head; the body by learning-rate multiplier (longest name prefix wins,
  0 freezes a parameter: no gradient is computed for it) with BatchNorm apart; a frozen body
  (ANIL(freeze_body=True)) leaves only its BatchNorm parameters;
- the optimizer: any torch.optim class (or a callable building one from parameter groups),
  Adam by default; or an optimizer the caller built (its groups are used as they are);
- learning rates each step: each group's base lr x schedule(step) (any callable of the step,
  as torch's LambdaLR takes), with the body groups other than BatchNorm held at 0 for the
  first `warmup_steps`;
- the meta-gradient's norm, reported by every step ("grad_norm") and, with `clip_grad_norm`,
  capped at that value (the whole gradient scaled down, as torch.nn.utils.clip_grad_norm_);
- the meta-step: `step(batch)` for eager training, and `device_step(batch)`, the device work
  alone, which `capture.MetaStepRunner` records into a CUDA graph. Both run `begin_step` /
  `end_step` around the same device work, so a per-step rule is written once.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from anil_fast.config import Config, check_learning_rates
from anil_fast.models import bodies
from anil_fast.models.anil import ANIL, require_batch
from anil_fast.models.batchnorm import batchnorm_layers, batchnorm_parameter_names
from anil_fast.data import TaskBatch
from anil_fast.errors import InputError, InputTypeError, check_optional_number, is_int
from anil_fast.models.bodies import count_parameters


def multiplier_for(name: str, multipliers: dict) -> float:
    """The longest prefix of `name` among the keys wins; else 'default'."""
    best = None
    for prefix in multipliers:
        if prefix != "default" and name.startswith(prefix) and (best is None or len(prefix) > len(best)):
            best = prefix
    return float(multipliers[best] if best is not None else multipliers.get("default", 1.0))


def check_multipliers(body: nn.Module, multipliers) -> None:
    if multipliers is None:
        return
    if not isinstance(multipliers, dict):
        raise InputTypeError("multipliers must be a dict of name prefix -> multiplier")
    names = [n for n, _ in body.named_parameters()]
    for prefix, mult in multipliers.items():
        if not isinstance(mult, (int, float)) or isinstance(mult, bool) or not math.isfinite(mult) \
                or mult < 0:
            raise InputError(f"multipliers[{prefix!r}] must be a finite number >= 0, got {mult!r}")
        if prefix != "default" and not any(n.startswith(prefix) for n in names):
            raise InputError(f"multipliers: prefix {prefix!r} matches no parameter of the body")


def parameter_groups(anil, lr: float, multipliers: dict | None = None) -> list[dict]:
    """The head's group and the body's groups (by multiplier, BatchNorm apart), as torch.optim
    parameter groups with "name", "multiplier", "batchnorm", "base_lr" and "warmup" (held at 0
    during warmup). Parameters left out (frozen, multiplier 0) get requires_grad=False."""
    check_multipliers(anil.body, multipliers)
    bn_names = batchnorm_parameter_names(anil.body)
    body_groups: dict[tuple, list] = {}
    for name, param in anil.body.named_parameters():
        is_bn = name in bn_names
        if anil.freeze_body and not is_bn:
            mult = 0.0
        elif multipliers is not None:
            mult = multiplier_for(name, multipliers)
        else:
            mult = 1.0
        param.requires_grad_(mult != 0.0)  # never updated: no gradient is computed for it
        if mult != 0.0:
            body_groups.setdefault((mult, is_bn), []).append((name, param))
    head = [(f"head.{n}", p) for n, p in anil.head.named_parameters()]
    if anil.head_init == "proto":
        head.append(("proto_scale", anil.proto_scale))  # the prototype head's scale
    if hasattr(anil, "query_scale"):
        head.append(("query_scale", anil.query_scale))  # normalised features' logit scale
    for _, p in head:
        p.requires_grad_(True)
    groups = [{"params": [p for _, p in head], "name": "head", "multiplier": 1.0,
               "batchnorm": False, "warmup": False, "base_lr": lr, "lr": lr,
               "names": [n for n, _ in head]}]
    for (mult, is_bn), named in sorted(body_groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        groups.append({"params": [p for _, p in named], "name": f"body{'-bn' if is_bn else ''}x{mult:g}",
                       "multiplier": mult, "batchnorm": is_bn, "warmup": not is_bn,
                       "base_lr": lr * mult, "lr": lr * mult,
                       "names": [f"body.{n}" for n, _ in named]})
    return groups


class MetaOptimizer:
    """Moves an ANIL model's meta-parameters: see the module docstring.

    optimizer: a torch.optim.Optimizer class or a callable (param_groups, lr=...) -> optimizer
    (extra keyword arguments go to it), or an optimizer already built over the model's
    parameters. schedule: a callable step -> factor of every group's base lr (None: 1)."""

    def __init__(self, anil, lr: float = 0.001, optimizer=torch.optim.Adam,
                 multipliers: dict | None = None, warmup_steps: int = 0,
                 schedule: Callable[[int], float] | None = None,
                 clip_grad_norm: float | None = None, **optimizer_kwargs):
        for message in check_learning_rates(0.0, lr):  # raises for impossible ones
            warnings.warn(message, stacklevel=2)
        self.clip_grad_norm = check_optional_number("clip_grad_norm", clip_grad_norm, 0, "no clipping")
        self.lr_scale = 1.0  # on top of the schedule: lowered by a loss-spike rollback
        if not is_int(warmup_steps) or warmup_steps < 0:
            raise InputError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if schedule is not None and not callable(schedule):
            raise InputTypeError(f"schedule must be a callable step -> factor, got {type(schedule).__name__}")
        self.anil, self.lr, self.warmup_steps, self.schedule = anil, float(lr), warmup_steps, schedule
        self.steps = 0
        if isinstance(optimizer, torch.optim.Optimizer):
            if multipliers is not None or optimizer_kwargs:
                raise InputError("multipliers and optimizer arguments apply to an optimizer built "
                                 "here; an optimizer passed in keeps its own groups")
            owned = {id(p) for p in anil.parameters()}
            held = [p for g in optimizer.param_groups for p in g["params"]]
            if not any(id(p) in owned for p in held):
                raise InputError("optimizer: the optimizer passed in holds none of the model's "
                                 "parameters (built over another model?); training would move "
                                 "nothing")
            foreign = sum(id(p) not in owned for p in held)
            if foreign:
                raise InputError(f"optimizer: the optimizer passed in holds {foreign} "
                                 f"parameter(s) that are not this model's (built over another "
                                 f"model?); the model's own would be left out of training")
            held_ids = {id(p) for p in held}
            missing = [n for n, p in anil.named_parameters()
                       if p.requires_grad and id(p) not in held_ids]
            if missing:
                warnings.warn(f"optimizer: the optimizer passed in leaves {len(missing)} of the "
                              f"model's trainable parameters untrained ({', '.join(missing[:3])}"
                              f"{' ...' if len(missing) > 3 else ''})", stacklevel=2)
            self.optimizer = optimizer
            self._adopt_groups()
        elif callable(optimizer):
            self.optimizer = optimizer(parameter_groups(anil, self.lr, multipliers), lr=self.lr,
                                       **optimizer_kwargs)
        else:
            raise InputTypeError(f"optimizer must be a torch.optim.Optimizer, its class or a factory, "
                                 f"got {type(optimizer).__name__}")
        self.set_learning_rates()

    def _adopt_groups(self) -> None:
        """Base lrs and warmup flags for a caller's optimizer: warmup holds the groups that
        hold only body parameters other than BatchNorm's."""
        bn_names = batchnorm_parameter_names(self.anil.body)
        bn = {id(p) for n, p in self.anil.body.named_parameters() if n in bn_names}
        body = {id(p) for p in self.anil.body.parameters()}
        for i, group in enumerate(self.optimizer.param_groups):
            ids = {id(p) for p in group["params"]}
            group.setdefault("name", f"group{i}")
            group.setdefault("base_lr", float(group["lr"]))
            group.setdefault("warmup", bool(ids) and ids <= body and not ids & bn)

    # -- learning rates ------------------------------------------------------------------------
    def factor(self) -> float:
        """The schedule's factor at this step; an InputError for one that is no number >= 0
        (a NaN would silently turn every parameter into NaN)."""
        if self.schedule is None:
            return 1.0
        value = self.schedule(self.steps)
        try:
            factor = float(value)
        except (TypeError, ValueError):
            factor = math.nan
        if isinstance(value, bool) or not 0 <= factor < math.inf:
            raise InputError(f"schedule: at step {self.steps} it returned {value!r}; a schedule "
                             f"returns a factor of the learning rate, a number >= 0")
        return factor

    def set_learning_rates(self) -> None:
        """Every group's lr for the coming step (tensor lrs of a capturable optimizer are
        filled in place: a captured graph reads them)."""
        factor, warm = self.factor() * self.lr_scale, self.steps < self.warmup_steps
        for group in self.optimizer.param_groups:
            lr = 0.0 if warm and group["warmup"] else group["base_lr"] * factor
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def learning_rates(self) -> dict:
        return {g["name"]: float(g["lr"]) for g in self.optimizer.param_groups}

    def groups_report(self) -> list[dict]:
        return [{"name": g["name"], "multiplier": g.get("multiplier"), "batchnorm": g.get("batchnorm"),
                 "parameters": sum(p.numel() for p in g["params"]), "names": g.get("names", [])}
                for g in self.optimizer.param_groups]

    # -- the meta-step -------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Host-side work before a step's device work: training modes, learning rates."""
        self.anil.train()
        self.set_learning_rates()

    def device_step(self, batch: TaskBatch, total_tasks: int | None = None, all_reduce=None) -> dict:
        """The device work of one meta-step (what a CUDA graph captures): the meta-gradient,
        the optimizer's update, metrics as device tensors. No host synchronisation."""
        self.optimizer.zero_grad(set_to_none=True)
        sums, total = self.anil.meta_backward(batch, total_tasks, all_reduce)
        norm = self.apply_gradients(sums.device)
        return {"loss": sums[0] / total, "accuracy": sums[1] / total, "grad_norm": norm}

    def apply_gradients(self, device) -> torch.Tensor:
        """The update from the gradients in .grad (device work, no host sync): their norm,
        the cap of clip_grad_norm, the optimizer's step. Returns the norm (a device tensor)."""
        # the meta-gradient's norm is logged (a rise warns of divergence) and, with
        # clip_grad_norm, capped: the whole gradient scaled down to that norm
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = (get_total_norm([p.grad for p in params]) if params
                else torch.zeros((), device=device))
        if self.clip_grad_norm is not None and params:
            clip_grads_with_norm_(params, self.clip_grad_norm, norm)  # reads p.grad
        self.optimizer.step()
        return norm

    def end_step(self) -> None:
        self.steps += 1

    def step(self, batch: TaskBatch, total_tasks: int | None = None, all_reduce=None) -> dict:
        """One meta-step. Returns detached 0-dim tensors (no host sync): the mean query loss
        and accuracy after adaptation. (total_tasks/all_reduce: data-parallel training, see
        ANIL.meta_backward.)"""
        require_batch(batch)
        self.begin_step()
        out = self.device_step(batch, total_tasks, all_reduce)
        self.end_step()
        return out

    def make_capturable(self) -> None:
        """Prepare the optimizer for CUDA-graph capture, keeping its state. An optimizer with
        a capturable mode (Adam, AdamW, RMSprop, ...) is rebuilt with capturable=True in every
        group, tensor learning rates and every state tensor (the step counts too) on the
        parameters' device, which the graph reads, so schedules and warmup still apply. One
        without (SGD, Adagrad) reads its learning rates on the host: a graph would replay the
        first step's, so it is captured only while they never change (no schedule, no
        warmup); otherwise an InputError says what to change."""
        if "capturable" not in self.optimizer.defaults:
            if self.schedule is not None or self.warmup_steps:
                name = type(self.optimizer).__name__
                raise InputError(
                    f"capture: {name} has no capturable mode, so a CUDA graph would replay its "
                    f"first learning rate while the schedule or warmup changes it; use an "
                    f"optimizer that has one (Adam, AdamW, RMSprop...), drop the schedule and "
                    f"warmup, or run without capture")
            return
        if self.capturable:
            return
        device = next(self.anil.head.parameters()).device
        state = self.optimizer.state_dict()
        # the saved groups carry capturable=False, which load_state_dict would put back (and
        # with it leave the step counts on the host)
        for group in state["param_groups"]:
            group["capturable"] = True
        groups = [{**{k: v for k, v in g.items() if k not in ("lr", "capturable")},
                   "lr": torch.tensor(float(g["lr"]), device=device)}
                  for g in self.optimizer.param_groups]
        self.optimizer = type(self.optimizer)(groups, capturable=True)
        self.optimizer.load_state_dict(state)  # state tensors to the parameters' device
        for group in self.optimizer.param_groups:  # load_state_dict put the saved floats back
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        self.set_learning_rates()

    @property
    def capturable(self) -> bool:
        """Whether the optimizer was made capturable (a CUDA graph may hold its tensors)."""
        return any(g.get("capturable") for g in self.optimizer.param_groups)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps,
                "lr_scale": self.lr_scale}

    def load_state_dict(self, state: dict) -> None:
        """The optimizer's state, step count and lr scale. The groups' base lrs stay this
        object's: a resumed run may change its learning rate. A capturable optimizer's state
        is copied into the tensors it already holds (a recorded CUDA graph reads those), its
        groups and tensor learning rates kept. A state that does not fit the parameters (other
        groups, sizes or shapes) is refused with an InputError before anything changes."""
        if not isinstance(state, dict) or not isinstance(state.get("optimizer"), dict):
            raise InputError("optimizer state: expected a MetaOptimizer.state_dict()")
        saved = state["optimizer"]
        steps, lr_scale = state.get("steps"), state.get("lr_scale", 1.0)  # no lr_scale before rollbacks
        if not is_int(steps) or steps < 0:
            raise InputError(f"optimizer state: steps must be an int >= 0, got {steps!r}")
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) \
                or not 0 < lr_scale < math.inf:
            raise InputError(f"optimizer state: lr_scale must be a number > 0, got {lr_scale!r}")
        by_index = self._check_fits(saved)
        if self.capturable:
            self._copy_state_in_place(saved, by_index)
        else:
            own = [{k: g[k] for k in ("base_lr", "warmup", "name")} for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(saved)
            for group, kept in zip(self.optimizer.param_groups, own):
                group.update(kept)
        self.steps, self.lr_scale = steps, float(lr_scale)
        self.set_learning_rates()

    def _check_fits(self, saved: dict) -> dict:
        """{index in the saved state: parameter} after checking that `saved` (a torch
        optimizer's state dict) fits this optimizer's groups and parameters."""
        groups, per_param = saved.get("param_groups"), saved.get("state")
        if not isinstance(groups, list) or not isinstance(per_param, dict) or not all(
                isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
            raise InputError("optimizer state: not a torch optimizer's state dict")
        own = self.optimizer.param_groups
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in own]:
            raise InputError(f"optimizer state: its parameter groups hold "
                             f"{[len(g['params']) for g in groups]} parameters, this model's "
                             f"{[len(g['params']) for g in own]} (another model or settings)")
        by_index = {i: p for saved_g, g in zip(groups, own) for i, p in zip(saved_g["params"], g["params"])}
        for index, values in per_param.items():
            param = by_index.get(index)
            if param is None or not isinstance(values, dict):
                raise InputError(f"optimizer state: entry {index!r} belongs to no parameter")
            for key, value in values.items():
                if isinstance(value, torch.Tensor) and value.numel() != 1 and value.shape != param.shape:
                    raise InputError(f"optimizer state: {key} of parameter {index} has shape "
                                     f"{tuple(value.shape)}, the parameter {tuple(param.shape)}")
        return by_index

    def _copy_state_in_place(self, saved: dict, by_index: dict) -> None:
        """A capturable optimizer's state loaded into the tensors it holds: a recorded graph
        keeps reading them (replacing them would leave it replaying the old state)."""
        with torch.no_grad():
            for index, param in by_index.items():
                new, current = saved["state"].get(index, {}), self.optimizer.state[param]
                for key, value in new.items():
                    if not isinstance(value, torch.Tensor):
                        current[key] = value
                    elif isinstance(current.get(key), torch.Tensor):
                        current[key].copy_(value)
                    else:  # no step taken yet: no graph holds this state
                        dtype = torch.float32 if key == "step" else param.dtype
                        current[key] = value.to(param.device, dtype).clone()
                for key, value in current.items():
                    if key not in new and isinstance(value, torch.Tensor):
                        value.zero_()  # a parameter without saved state: a fresh start


def parameter_counts(anil, optimizer: MetaOptimizer) -> dict:
    """Parameters of the model: in all, trained by `optimizer`, of the body, head and BatchNorm."""
    bn = sum(p.numel() for m in batchnorm_layers(anil.body) for p in m.parameters(recurse=False))
    body = count_parameters(anil.body)
    head = count_parameters(anil.head)
    trainable = sum(g["parameters"] for g in optimizer.groups_report())
    return {"total_parameters": body + head, "trainable_parameters": trainable,
            "body_parameters": body, "head_parameters": head, "batchnorm_parameters": bn}


def meta_optimizer(config: Config, anil: ANIL, schedule=None) -> MetaOptimizer:
    """The presets' optimisation: Adam at config.outer_lr, the preset's learning-rate
    multipliers, warmup of the body, `schedule` (step -> factor) and the config's cap on the
    meta-gradient's norm."""
    return MetaOptimizer(anil, lr=config.outer_lr, optimizer=torch.optim.Adam,
                         multipliers=bodies.lr_multipliers(config.model, config.multipliers,
                                                           anil.body),
                         warmup_steps=config.warmup_steps, schedule=schedule,
                         clip_grad_norm=config.clip_grad_norm)
