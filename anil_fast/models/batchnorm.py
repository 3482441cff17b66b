"""BatchNorm for one batched body call over many tasks, with the semantics of a per-task loop.

A per-task loop runs the body once per task and per set, so every BatchNorm layer normalises
with the statistics of that one set. `grouped_batchnorm(body, groups)` makes a single call on
[groups * rows, ...] do exactly that: each BatchNorm layer splits its input into `groups`
equal consecutive chunks and normalises each with its own mean and (biased) variance.

Running statistics. The per-task loop updates them once per set, in the order
support_0, query_0, support_1, query_1, ...: r <- (1 - m) r + m s_i. The batched step makes
one call for all supports and one for all queries, records every group's statistics, and
`RunningStats.apply()` folds them in that same interleaved order afterwards, so running
statistics match the loop too (exactly, up to floating-point rounding).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

_BN = nn.modules.batchnorm._BatchNorm


def batchnorm_layers(module: nn.Module):
    return [m for m in module.modules() if isinstance(m, _BN)]


def batchnorm_parameter_names(module: nn.Module) -> set[str]:
    """Names (as module.named_parameters() gives them) of the BatchNorm layers' parameters."""
    names = set()
    for module_name, sub in module.named_modules():
        if isinstance(sub, _BN):
            for p_name, _ in sub.named_parameters(recurse=False):
                names.add(f"{module_name}.{p_name}" if module_name else p_name)
    return names


_PLAIN_FORWARDS = {nn.BatchNorm1d.forward, nn.BatchNorm2d.forward, nn.BatchNorm3d.forward,
                   _BN.forward}


def unbatchable_layers(body: nn.Module) -> list[str]:
    """Layers that keep grouped_batchnorm from reproducing the per-task loop: BatchNorm
    subclasses with a forward of their own (timm's BatchNormAct2d adds an activation, which
    the grouped forward would drop) and other layers that normalise over the batch (class
    names with "Batch" that are not BatchNorm, e.g. EvoNormBatch2d). Empty: batchable."""
    found = []
    for name, m in body.named_modules():
        if isinstance(m, _BN):
            if type(m).forward not in _PLAIN_FORWARDS:
                found.append(f"{name} ({type(m).__name__})")
        elif "Batch" in type(m).__name__:
            found.append(f"{name} ({type(m).__name__})")
    return found


class RunningStats:
    """Per-group statistics recorded during grouped calls, applied later in a chosen order."""

    def __init__(self):
        self.records: dict[nn.Module, list] = {}

    def record(self, bn, mean, var_unbiased):
        self.records.setdefault(bn, []).append((mean.detach(), var_unbiased.detach()))

    @torch.no_grad()
    def apply(self):
        """Fold recorded statistics into the running buffers in the per-task loop's order: with
        two calls per layer (supports [T,C], then queries [T,C]) that is s0, q0, s1, q1, ..."""
        for bn, calls in self.records.items():
            means = [c[0] for c in calls]
            variances = [c[1] for c in calls]
            if len(calls) == 2:
                means = torch.stack(means, 1).flatten(0, 1)  # [T*2, C]: s0, q0, s1, q1, ...
                variances = torch.stack(variances, 1).flatten(0, 1)
            else:
                means, variances = torch.cat(means), torch.cat(variances)
            steps = means.shape[0]
            m = bn.momentum
            if m is None:  # cumulative moving average, as nn.BatchNorm does with momentum=None
                for i in range(steps):
                    bn.num_batches_tracked += 1
                    f = 1.0 / float(bn.num_batches_tracked)
                    bn.running_mean.mul_(1 - f).add_(means[i] * f)
                    bn.running_var.mul_(1 - f).add_(variances[i] * f)
                continue
            # r_final = (1-m)^n r + sum_i m (1-m)^(n-1-i) s_i
            decay = (1 - m) ** torch.arange(steps - 1, -1, -1, dtype=means.dtype, device=means.device)
            weights = (m * decay).unsqueeze(1)
            keep = (1 - m) ** steps
            bn.running_mean.mul_(keep).add_((weights * means).sum(0).to(bn.running_mean.dtype))
            bn.running_var.mul_(keep).add_((weights * variances).sum(0).to(bn.running_var.dtype))
            bn.num_batches_tracked += steps
        self.records.clear()


def _grouped_batch_norm(bn, x, groups: int, sink: RunningStats | None):
    shape = x.shape
    rows, channels = shape[0] // groups, shape[1]
    # Put the groups into the channel dimension, [B, G*C, ...], so that one native batch_norm
    # call computes per-(group, channel) statistics (a copy each way, but far faster than
    # composing the normalisation from elementwise autograd ops).
    xt = x.reshape(groups, rows, channels, -1).transpose(0, 1).reshape(rows, groups * channels, -1)
    weight = bn.weight.repeat(groups) if bn.affine else None
    bias = bn.bias.repeat(groups) if bn.affine else None
    record = sink is not None and bn.track_running_stats
    # momentum=1 turns the scratch buffers into this call's mean and unbiased variance.
    # in fp32 under bf16/fp16 autocast, as the layer's own buffers (the CPU kernel refuses
    # statistics in the input's reduced precision)
    stats = dict(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    mean = torch.zeros(groups * channels, **stats) if record else None
    var = torch.ones(groups * channels, **stats) if record else None
    y = F.batch_norm(xt, mean, var, weight, bias, True, 1.0, bn.eps)
    if record:
        sink.record(bn, mean.view(groups, channels), var.view(groups, channels))
    return y.reshape(rows, groups, channels, -1).transpose(0, 1).reshape(shape)


class _GroupedBatchNormMixin:
    """Put in front of a BatchNorm layer's class while grouped_batchnorm() is active: in
    training mode it normalises per group; otherwise it is the layer's own forward. A fixed
    method (not a per-call patch) so torch.compile traces it."""
    _anil_groups = 0
    _anil_sink = None

    def forward(self, x):
        if self._anil_groups and self.training:
            return _grouped_batch_norm(self, x, self._anil_groups, self._anil_sink)
        return super().forward(x)


_grouped_classes: dict[type, type] = {}


def _grouped_class(cls: type) -> type:
    if cls not in _grouped_classes:
        _grouped_classes[cls] = type(f"Grouped{cls.__name__}", (_GroupedBatchNormMixin, cls), {})
    return _grouped_classes[cls]


@contextmanager
def grouped_batchnorm(body: nn.Module, groups: int, sink: RunningStats | None = None):
    """Inside the context, every BatchNorm layer of `body` that is in training mode uses
    per-group batch statistics (groups = consecutive equal chunks of the batch) and records
    them in `sink` (or leaves running statistics untouched when sink is None). Layers in eval
    mode keep using their running statistics.

    The layers' classes are swapped for the grouped ones only inside the context and restored
    on exit, so the caller's modules keep their own classes (torch.save of the whole model
    pickles them; isinstance and type checks see what they built)."""
    layers = [(bn, type(bn)) for bn in batchnorm_layers(body)
              if not isinstance(bn, _GroupedBatchNormMixin)]  # nested: the outer one restores
    for bn, cls in layers:
        bn.__class__ = _grouped_class(cls)
    names = ("_anil_groups", "_anil_sink")
    saved = [(bn, {k: bn.__dict__[k] for k in names if k in bn.__dict__})
             for bn in batchnorm_layers(body)]
    for bn, _ in saved:
        bn._anil_groups, bn._anil_sink = groups, sink
    try:
        yield
    finally:
        for bn, before in saved:  # the settings of an enclosing context, or none
            for name in names:
                bn.__dict__.pop(name, None)
                if name in before:
                    bn.__dict__[name] = before[name]
        for bn, cls in layers:
            bn.__class__ = cls


@contextmanager
def batchnorm_training_mode(body: nn.Module, enabled: bool = True):
    """Inside the block every BatchNorm layer of `body` is in training mode (batch
    statistics; with grouped_batchnorm and no sink, running statistics stay untouched);
    each layer's own mode is restored on exit. enabled=False: a no-op."""
    saved = [(bn, bn.training) for bn in batchnorm_layers(body)] if enabled else []
    for bn, _ in saved:
        bn.train()
    try:
        yield
    finally:
        for bn, mode in saved:
            bn.train(mode)


@contextmanager
def batch_statistics_without_update(body: nn.Module):
    """BatchNorm layers use the batch's statistics and leave running statistics untouched
    (transductive evaluation with the per-task loop)."""
    saved = []
    for bn in batchnorm_layers(body):
        saved.append((bn, bn.training, bn.track_running_stats))
        bn.train()
        bn.track_running_stats = False  # batch statistics, no update, no counter increment
    try:
        yield
    finally:
        for bn, training, track in saved:
            bn.track_running_stats = track
            bn.train(training)


def batch_statistics_of(forward, body: nn.Module, x: torch.Tensor):
    """(forward(x), {BatchNorm layer: (mean, biased variance)}): each layer's batch statistics
    of x (in fp32 under bf16), as training mode normalises with; running statistics untouched."""
    captured = {}

    def capture(bn, inputs):
        v = inputs[0].to(torch.promote_types(inputs[0].dtype, torch.float32))  # bf16: in fp32
        dims = [0, *range(2, v.dim())]
        captured[bn] = (v.mean(dims), v.var(dims, unbiased=False))
    handles = [bn.register_forward_pre_hook(capture) for bn in batchnorm_layers(body)]
    try:
        with batch_statistics_without_update(body):
            out = forward(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, captured


def features_with_support_statistics(forward, body: nn.Module, support: torch.Tensor,
                                     query: torch.Tensor):
    """(forward(support), forward(query)) for one task with every BatchNorm layer normalising
    both sets with the support set's batch statistics (mean and biased variance, as training
    mode computes them), so a query's features do not depend on the other queries (the mode
    TaskNorm argues for). Running statistics are left as they were."""
    layers = batchnorm_layers(body)
    fs, captured = batch_statistics_of(forward, body, support)
    saved = [(bn, bn.training, bn.running_mean, bn.running_var) for bn in layers]
    try:
        for bn in layers:  # eval mode reads running_mean/var as given: the support's statistics
            bn.running_mean, bn.running_var = captured[bn]
            bn.eval()
        fq = forward(query)
    finally:
        for bn, training, mean, var in saved:
            bn.running_mean, bn.running_var = mean, var
            bn.train(training)
    return fs, fq
