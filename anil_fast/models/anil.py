"""ANIL, the model side: body, head, adaptation, meta-loss, evaluation (optim.py moves it)."""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from anil_fast.models.batchnorm import (RunningStats, batch_statistics_without_update, batchnorm_layers,
                        batchnorm_parameter_names, batchnorm_training_mode,
                        features_with_support_statistics, grouped_batchnorm, unbatchable_layers)
from anil_fast.data import TaskBatch
from anil_fast.config import (BN_MODES, FEATURE_NORMS, HEAD_INITS, LEGACY_BACKENDS, PRECISIONS, backend_name,
                              check_learning_rates)
from anil_fast.env import cpu_has_native_bf16
from anil_fast.errors import InputError, InputTypeError, is_int
from anil_fast.models.functional import adapted_query_loss

def prefers_channels_last(device, precision: str, backend: str) -> bool:
    """Where channels_last is faster: bf16 on CUDA (tensor cores) and the fast path on the CPU
    (oneDNN convolutions; measured 1.5x on conv4). The same numbers either way."""
    device = torch.device(device)
    return (precision == "bf16" and device.type == "cuda") or (
        device.type == "cpu" and LEGACY_BACKENDS.get(backend, backend) not in ("reference", "per_task"))


# feature_norm's query scale at the start of meta-training. Measured at std-20w1s, learned
# head, unit features, inner_lr 20, second order, 150 s at one thread, 200 test tasks: the
# scale held at 1, 81.4%; held at 3, 90.9% (the prototype head: 90.3%). It is meta-learned
# from there (docs/how-to/reproduce.md, "The learned head").
QUERY_SCALE_INIT = 3.0


def task_feature_scale(support_features: torch.Tensor) -> torch.Tensor:
    """1 / the root-mean-square L2 norm of each task's support features [..., S, D] -> [...]
    (feature_norm "task")."""
    squared = support_features.pow(2).sum(-1).mean(-1)
    return squared.clamp_min(torch.finfo(torch.float32).tiny).rsqrt()


def require_batch(batch) -> None:
    if not isinstance(batch, TaskBatch):
        raise InputTypeError(f"batch must be a TaskBatch (e.g. TaskSampler.sample()), got "
                             f"{type(batch).__name__}")


class ANIL(nn.Module):
    """Almost No Inner Loop (Raghu et al., 2020).

    The model side of ANIL: the inner loop adapts only `head` (an nn.Linear) on each task's
    support features; `meta_loss` / `meta_backward` give the outer loop's loss and gradient,
    `evaluate` the accuracies. How the meta-parameters then move (optimizer, parameter groups,
    learning-rate multipliers, warmup, schedules) is optim.MetaOptimizer's.

    backend: "reference" runs the body once per task and per set (support, then query) and
    the plain-autograd head; "per_task" is the per-task loop of the ANIL write-ups (the speed
    baseline). The fast backends ("auto", "fused") use the fused head and run
    the body either once per set for all tasks, with per-task BatchNorm statistics
    (batchnorm.py), or per task: batched_body=None picks batched on CUDA and per task on the
    CPU (faster there); both give the same numbers.
    """

    def __init__(self, body: nn.Module, head: nn.Linear, inner_lr: float = 0.01,
                 inner_steps: int = 5, freeze_body: bool = False, first_order: bool = True,
                 backend: str = "auto", batched_body: bool | None = None,
                 precision: str = "fp32", compile: bool | str = False,
                 channels_last: bool = False, joint_batchnorm: bool = False,
                 head_init: str = "learned", feature_norm: str = "none"):
        super().__init__()
        if not isinstance(body, nn.Module):
            raise InputTypeError(f"body must be an nn.Module, got {type(body).__name__}")
        if not isinstance(head, nn.Linear):
            raise InputTypeError(f"head must be an nn.Linear, got {type(head).__name__}")
        if head.bias is None:
            raise InputError("head must have a bias (nn.Linear(features, ways, bias=True)): the "
                             "inner loop adapts weight and bias")
        if head.out_features < 2:
            raise InputError(f"head must have one output per way (at least 2), got "
                             f"{head.out_features}")
        for message in check_learning_rates(inner_lr, 0.0, feature_norm):
            warnings.warn(message, stacklevel=2)
        if not is_int(inner_steps):
            raise InputTypeError(f"inner_steps must be an int, got {type(inner_steps).__name__}")
        if inner_steps < 0:
            raise InputError(f"inner_steps must be >= 0, got {inner_steps}")
        backend = backend_name(backend)
        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.body, self.head = body, head
        self.inner_lr, self.inner_steps = float(inner_lr), inner_steps
        self.freeze_body, self.first_order, self.backend = freeze_body, first_order, backend
        if freeze_body:  # a frozen body trains its BatchNorm parameters only
            trained = batchnorm_parameter_names(body)
            for name, param in body.named_parameters():
                param.requires_grad_(name in trained)
        self.batched_body = batched_body
        self.precision = precision
        self._set_head_init(head_init, feature_norm)
        # meta-training normalises each task's support and query together (bn_mode "joint")
        self.joint_batchnorm = bool(joint_batchnorm)
        self._labels_checked = False  # the first training batch's labels are checked once
        self._unbatchable = None  # layers that keep the body from running batched (found once)
        # channels_last: the body's weights are converted here, once, in place (the caller
        # asked for it); inputs are converted per call. Nothing else changes the body's layout.
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.body.to(memory_format=torch.channels_last)
        # torch.compile'd forward of the body (True: default backend, or a backend name). Kept
        # outside the module tree so state dicts keep the body's own names.
        self.__dict__["_body_forward"] = self.body if not compile else torch.compile(
            self.body, **({} if compile is True else {"backend": compile}))

    # -- modes -------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        """nn.Module.train, except that a frozen body (freeze_body=True) stays in eval mode
        with its BatchNorm layers in training mode (batch statistics, running updates)."""
        super().train(mode)
        if mode and self.freeze_body:
            self.body.eval()
            for bn in batchnorm_layers(self.body):
                bn.train()
        return self

    @contextmanager
    def precision_context(self, device: torch.device):
        """bf16: autocast the body (the head op accumulates in fp32); tf32: TF32 matmuls and
        convolutions. The global TF32 flags are restored on exit."""
        if self.precision == "bf16":
            if device.type == "cpu" and cpu_has_native_bf16() is False:
                warnings.warn("precision='bf16' on a CPU without native bf16 (no AVX-512 BF16, "
                              "AMX or Arm BF16) runs many times slower than fp32", stacklevel=3)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                yield
            return
        with self._tf32_scope():
            yield

    @contextmanager
    def _tf32_scope(self):
        """precision="tf32": TF32 matmuls and convolutions inside the block (forward and, in
        meta_backward, backward); the caller's global flags are restored on exit."""
        if self.precision != "tf32":
            yield
            return
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    def uses_fused_head(self) -> bool:
        return self.backend not in ("reference", "per_task")

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if (
            self.channels_last and x.dim() == 4) else x

    # -- features ----------------------------------------------------------------------------
    def features(self, batch: TaskBatch, bn_mode: str = "train"):
        """Body features (support [T,S,D], query [T,Q,D]).

        bn_mode "train": BatchNorm statistics of each task's set, running statistics updated as
        a per-task loop does; "transductive": the same statistics without updating running
        statistics; "running": running statistics (BatchNorm in eval mode); "support": both
        sets normalised with the task's support statistics (evaluation only; per task);
        "joint": support and query in one call per task, one set of statistics (learn2learn's
        convention; "train" does the same when the model was built with joint_batchnorm)."""
        require_batch(batch)
        if bn_mode == "joint" or (bn_mode == "train" and self.joint_batchnorm):
            return self._joint_features(batch, training=bn_mode == "train")
        tasks, s_rows = batch.support_y.shape
        q_rows = batch.query_y.shape[1]
        if bn_mode == "support":
            # the eager body: the statistics are read by forward hooks, which a compiled graph
            # traced without them skips (dynamo does not guard on hooks; evaluation only)
            pairs = [features_with_support_statistics(
                self.body, self.body, self._layout(batch.support_x[t]),
                self._layout(batch.query_x[t])) for t in range(tasks)]
            return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        # First order: the support features get no gradient, so compute them without autograd.
        # (a prototype head is made of them: then they need it in both orders)
        support_grad = not (self.first_order and bn_mode == "train" and self.head_init != "proto") \
            and torch.is_grad_enabled()
        if not self.uses_batched_body(batch.support_x.device):
            ctx = batch_statistics_without_update(self.body) if bn_mode == "transductive" else nullcontext()
            # the reference backends keep the plain loop; the fast path skips autograd where
            # no gradient is needed (same numbers)
            support_grad_here = support_grad or not self.uses_fused_head()
            with ctx:
                fs, fq = [], []
                for t in range(tasks):  # the per-task loop: support, then query
                    with torch.set_grad_enabled(support_grad_here and torch.is_grad_enabled()):
                        fs.append(self._body_forward(self._layout(batch.support_x[t])))
                    fq.append(self._body_forward(self._layout(batch.query_x[t])))
            return torch.stack(fs), torch.stack(fq)
        sink = RunningStats() if bn_mode == "train" else None
        with batchnorm_training_mode(self.body, bn_mode == "transductive"):
            with grouped_batchnorm(self.body, tasks, sink):
                with torch.set_grad_enabled(support_grad):
                    fs = self._body_forward(self._layout(batch.support_x.flatten(0, 1)))
                fq = self._body_forward(self._layout(batch.query_x.flatten(0, 1)))
        if sink is not None:
            sink.apply()
        return fs.view(tasks, s_rows, -1), fq.view(tasks, q_rows, -1)

    def _joint_features(self, batch: TaskBatch, training: bool):
        """Each task's support and query images through the body in one call: BatchNorm
        normalises them with one set of statistics per task. training: running statistics
        updated once per task (as learn2learn's loop does); else left untouched."""
        tasks, s_rows = batch.support_y.shape
        both = torch.cat([batch.support_x, batch.query_x], 1)  # [T, S+Q, C, H, W]
        if not self.uses_batched_body(both.device):
            with nullcontext() if training else batch_statistics_without_update(self.body):
                f = torch.stack([self._body_forward(self._layout(both[t])) for t in range(tasks)])
            return f[:, :s_rows], f[:, s_rows:]
        sink = RunningStats() if training else None
        with batchnorm_training_mode(self.body, not training):  # batch statistics, per task
            with grouped_batchnorm(self.body, tasks, sink):
                f = self._body_forward(self._layout(both.flatten(0, 1)))
        if sink is not None:
            sink.apply()
        f = f.view(tasks, both.shape[1], -1)
        return f[:, :s_rows], f[:, s_rows:]

    def uses_batched_body(self, device: torch.device) -> bool:
        """batched_body=None: one batched call on CUDA (launch-bound per-task calls waste the
        GPU), the per-task loop on the CPU (measured faster there: small batches stay in
        cache); never batched for backend="reference". A body whose normalisation layers the
        batched call cannot reproduce exactly (batchnorm.unbatchable_layers) runs per task,
        said once."""
        wanted = self.batched_body if self.batched_body is not None else (
            self.uses_fused_head() and device.type == "cuda")
        if wanted and self._unbatchable is None:
            self._unbatchable = unbatchable_layers(self.body)
            if self._unbatchable:
                warnings.warn(f"the body runs per task: its layers {', '.join(self._unbatchable[:3])}"
                              f"{' ...' if len(self._unbatchable) > 3 else ''} normalise in a way "
                              f"the batched call cannot reproduce exactly", stacklevel=3)
        return wanted and not self._unbatchable

    # -- checks on first use ------------------------------------------------------------------
    def _check_inputs(self, batch: TaskBatch) -> None:
        """The images' device, dtype and channels against the model's (metadata only: no host
        sync), so a mismatch is a clear error instead of one from deep inside the body. Run
        where labels are checked: every evaluation, training's first batch."""
        weight = self.head.weight
        x = batch.support_x
        if x.device.type == "meta" or x.device != weight.device:
            raise InputError(f"batch: the images are on {x.device}, the model on {weight.device}; "
                             f"move them with batch.to({str(weight.device)!r})")
        if x.dtype != weight.dtype or batch.query_x.dtype != weight.dtype:
            raise InputTypeError(f"batch: the images are {x.dtype}, the model's weights "
                                 f"{weight.dtype}; convert one to the other (e.g. images .float(), "
                                 f"or the model .double()); precision='bf16' keeps fp32 images")
        first = next((m for m in self.body.modules() if isinstance(m, nn.Conv2d)), None)
        if first is not None and x.dim() == 5 and x.shape[2] != first.in_channels:
            raise InputError(f"batch: the images have {x.shape[2]} channels, the body takes "
                             f"{first.in_channels}")

    def check_labels(self, batch: TaskBatch, ways: int | None = None) -> None:
        """The tasks' labels must be 0..ways-1 with ways = the head's outputs (or `ways` of
        them): a head with more outputs would score classes no task has, fewer (or labels out
        of range) give NaN losses and meaningless accuracies. One host sync: evaluate() runs it
        every call, training on its first batch (later steps stay sync-free; a NaN loss stops
        the trainer)."""
        ways = ways or self.head.out_features
        labels = torch.cat([batch.support_y.flatten(), batch.query_y.flatten()])
        if labels.numel() == 0:
            raise InputError("batch: tasks without labels")
        low, high = (int(v) for v in torch.stack([labels.min(), labels.max()]).tolist())
        if low < 0 or high >= ways:
            raise InputError(f"batch: labels must lie in 0..{ways - 1} (the head has {ways} "
                             f"outputs, one per way), found {low}..{high}")
        if high + 1 != ways:
            raise InputError(f"batch: the tasks have {high + 1} ways (labels 0..{high}) but the "
                             f"head has {ways} outputs; build the head with one output per way")

    def _check_features(self, fs: torch.Tensor) -> None:
        if fs.shape[-1] != self.head.in_features:
            raise InputError(f"the body gives {fs.shape[-1]} features per image but the head "
                             f"takes {self.head.in_features}; build the head as "
                             f"nn.Linear({fs.shape[-1]}, ways)")

    def _check_first_batch(self, batch: TaskBatch) -> None:
        if self._labels_checked:
            return
        self._check_inputs(batch)
        capturing = batch.support_y.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing:
            self.check_labels(batch)
            self._labels_checked = True

    # -- the outer loop ----------------------------------------------------------------------
    def _head_loss(self, fs, batch, fq, inner_steps, first_order, ways=None):
        self._check_features(fs)
        # The head runs outside autocast: bf16 features in, fp32 accumulation inside. No host
        # label check on the fused op (no sync in a step): out-of-range labels give the task a
        # NaN loss on every device, which the trainer stops on.
        with torch.autocast(fs.device.type, enabled=False):
            fs, fq = self.head_features(fs, fq, first_order)
            weight, bias = self.initial_head(fs, batch.support_y, ways)
            return adapted_query_loss(
                fs, batch.support_y, fq, batch.query_y, weight, bias,
                inner_lr=self.inner_lr, inner_steps=inner_steps, first_order=first_order,
                backend=self.backend, check_labels=False)

    def _set_head_init(self, head_init: str, feature_norm: str) -> None:
        """Each task's initial head: "learned" (head.weight, head.bias, meta-learned as in the
        ANIL paper), "zero", or "proto" (Proto-MAML: W0_c = 2 s p_c, b0_c = -s |p_c|^2 from the
        task's support prototypes p_c, with a meta-learned scale s, proto_scale, starting at 1);
        and the features it sees (head_features), with the query logits' meta-learned scale
        for a normalised learned or zero head."""
        if head_init not in HEAD_INITS:
            raise InputError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
        if feature_norm not in FEATURE_NORMS:
            raise InputError(f"feature_norm must be one of {FEATURE_NORMS}, got {feature_norm!r}")
        self.head_init, self.feature_norm = head_init, feature_norm
        like = dict(dtype=self.head.weight.dtype, device=self.head.weight.device)
        if head_init == "proto":
            self.proto_scale = nn.Parameter(torch.ones((), **like))
        elif feature_norm != "none":
            self.query_scale = nn.Parameter(torch.full((), QUERY_SCALE_INIT, **like))

    def head_features(self, fs: torch.Tensor, fq: torch.Tensor, first_order: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The support [T,S,D] and query [T,Q,D] features the head adapts on and scores, by
        feature_norm: "none" as the body gives them; "task" each task's divided by one scalar,
        the root-mean-square norm of its support features (task_feature_scale); "unit" each
        feature vector of unit length. Normalised, the query features of a learned or zero
        head are also multiplied by query_scale, a meta-learned scale of the query logits
        (starting at QUERY_SCALE_INIT; the prototype head's proto_scale plays that part).

        Why: an inner SGD step on the support loss (a mean over S rows) moves row i's own logit
        by about inner_lr * |f_i|^2 / S; a conv4 body's |f|^2 is in the hundreds and grows as it
        trains, so a fixed inner_lr ends far beyond the step's stability bound (the learned
        head's collapse at std-20w1s). With |f| = 1 the step no longer follows the body. With
        it, the query logits' size, the outer softmax's temperature, would be set by inner_lr
        and the steps alone: query_scale learns it instead. Differentiable; first order takes
        the "task" scale as a constant, as it takes the support features."""
        if self.feature_norm == "none":
            return fs, fq
        dtype = torch.promote_types(fs.dtype, torch.float32)  # bf16 features: fp32 norms
        fs, fq = fs.to(dtype), fq.to(dtype)
        query_scale = self.query_scale.to(dtype) if hasattr(self, "query_scale") else 1.0
        if self.feature_norm == "unit":
            return F.normalize(fs, dim=-1), F.normalize(fq, dim=-1) * query_scale
        scale = task_feature_scale(fs.detach() if first_order else fs)[:, None, None]
        return fs * scale, fq * (scale * query_scale)

    def initial_head(self, fs: torch.Tensor, support_y: torch.Tensor, ways: int | None = None):
        """The head each task's inner loop starts from (see head_init): shared [N, D], [N], or
        per task [T, N, D], [T, N] for "proto", differentiable through the support features.
        `ways`: fewer classes than the head's outputs, served by its first rows."""
        weight, bias = self.head.weight[:ways], self.head.bias[:ways]
        if self.head_init == "learned":
            return weight, bias
        if self.head_init == "zero":
            return torch.zeros_like(weight), torch.zeros_like(bias)
        dtype = torch.promote_types(fs.dtype, weight.dtype)
        classes = torch.arange(weight.shape[0], device=fs.device)
        # one-hot by comparison: labels out of range give empty rows, never a device assert
        onehot = (support_y.unsqueeze(-1) == classes).to(dtype)  # [T, S, N]
        counts = onehot.sum(1).clamp_min(1).unsqueeze(-1)  # [T, N, 1]
        prototypes = torch.bmm(onehot.transpose(1, 2), fs.to(dtype)) / counts  # [T, N, D]
        scale = self.proto_scale.to(dtype)
        return 2 * scale * prototypes, -scale * prototypes.pow(2).sum(-1)

    def _task_losses(self, batch: TaskBatch):
        """Per-task query losses [T] and query logits after adapting the head (training)."""
        with self.precision_context(batch.support_x.device):
            fs, fq = self.features(batch, "train")
            return self._head_loss(fs, batch, fq, self.inner_steps, self.first_order)

    def meta_loss(self, batch: TaskBatch):
        """Mean query loss over the tasks after adapting the head; differentiable to body and
        head. Call train() first (MetaOptimizer.step does)."""
        require_batch(batch)
        self._check_first_batch(batch)
        return self._task_losses(batch)[0].mean()

    def meta_backward(self, batch: TaskBatch, total_tasks: int | None = None, all_reduce=None):
        """Accumulate the meta-gradient of the mean query loss into .grad; returns (sums of the
        tasks' [loss, accuracy] as a device tensor, the number of tasks they are over). No host
        synchronisation: this is device work a CUDA graph can capture.

        Data parallel (see distributed.py): `batch` is this rank's share of a meta-batch of
        `total_tasks` tasks, and `all_reduce(values)` sums the gradients and `values` over
        ranks, so every rank takes the step one process would take on all tasks."""
        require_batch(batch)
        self._check_first_batch(batch)
        losses, logits = self._task_losses(batch)
        total = total_tasks or batch.num_tasks
        with self._tf32_scope():
            (losses.sum() / total).backward()  # = the mean over all tasks
        correct = (logits.detach().argmax(-1) == batch.query_y).float().mean(1)
        sums = torch.stack([losses.detach().sum(), correct.sum()]).float()
        if all_reduce is not None:
            sums = all_reduce(sums)
        return sums, total

    @torch.no_grad()
    def adapted_logits(self, batch: TaskBatch, inner_steps: int | None = None,
                       bn_mode: str = "transductive", ways: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query logits [T, Q, ways] before and after adapting the head on each task's support
        set (`inner_steps` SGD steps, default the model's), BatchNorm as `bn_mode` says; the
        model's training mode is left as it was. `ways`: tasks of fewer classes than the
        head's outputs (predict), served by its first rows."""
        require_batch(batch)
        if bn_mode not in BN_MODES:
            raise InputError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        steps = self.inner_steps if inner_steps is None else inner_steps
        if not is_int(steps) or steps < 0:
            raise InputError(f"inner_steps must be an int >= 0, got {inner_steps!r}")
        if ways is not None and not (is_int(ways) and 2 <= ways <= self.head.out_features):
            raise InputError(f"ways must be an int in 2..{self.head.out_features}, got {ways!r}")
        self._check_inputs(batch)
        self.check_labels(batch, ways)
        was_training = self.training
        self.eval()
        try:
            with self.precision_context(batch.support_x.device):
                fs, fq = self.features(batch, bn_mode)
            fs, fq = fs.float(), fq.float()
            _, before = self._head_loss(fs, batch, fq, 0, True, ways)
            _, after = self._head_loss(fs, batch, fq, steps, True, ways)
        finally:
            self.train(was_training)
        return before, after

    @torch.no_grad()
    def evaluate(self, batch: TaskBatch, inner_steps: int | None = None,
                 bn_mode: str = "transductive", ways: int | None = None) -> dict:
        """Query accuracy before and after adapting the head on each task's support set
        (`ways`: adapted_logits'). Returns accuracy_before / accuracy_after (means),
        loss_after and per-task tensors [T]."""
        before, after = self.adapted_logits(batch, inner_steps, bn_mode, ways)
        loss = torch.nn.functional.cross_entropy(after.flatten(0, 1), batch.query_y.flatten()).item()
        if not math.isfinite(loss):
            warnings.warn("evaluate: the adapted logits are not finite (NaN or infinite weights "
                          "or images, or a diverging inner loop): the accuracies mean nothing",
                          stacklevel=2)
        per_before = (before.argmax(-1) == batch.query_y).float().mean(1)
        per_after = (after.argmax(-1) == batch.query_y).float().mean(1)
        return {"accuracy_before": per_before.mean().item(), "accuracy_after": per_after.mean().item(),
                "loss_after": loss,
                "per_task_before": per_before.cpu(), "per_task_after": per_after.cpu()}
