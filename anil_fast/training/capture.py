"""Whole meta-steps as one CUDA graph.

`MetaStepRunner(meta_optimizer, capture=True)` runs the meta-steps of a MetaOptimizer
(optim.py): on CUDA with capture=True the first call records the step (body, fused head, backward, Adam with capturable=True) into a
CUDA graph on static input buffers; every later call copies the new batch into those buffers
and replays the graph: one launch from the host, no host synchronisation inside a step (the
returned metrics are device tensors; read them back every N steps). The sampler runs outside
the graph on the device, asynchronously. Static shapes: every batch must have the first
batch's shapes. Elsewhere (CPU, or capture=False) it is the plain eager step.

Warm-up iterations (required before capture) run on a side stream and are undone afterwards,
so captured training computes exactly what eager training computes.
"""
from __future__ import annotations

from dataclasses import astuple

import torch

from anil_fast.data import TaskBatch
from anil_fast.errors import InputError, InputTypeError
from anil_fast.training.optim import MetaOptimizer


class MetaStepRunner:
    def __init__(self, meta_optimizer: MetaOptimizer, capture: bool = True,
                 warmup_iterations: int = 3, total_tasks: int | None = None, all_reduce=None):
        if not isinstance(meta_optimizer, MetaOptimizer):
            raise InputTypeError(f"meta_optimizer must be a MetaOptimizer, got "
                                 f"{type(meta_optimizer).__name__}")
        self.meta_optimizer = meta_optimizer
        self.step_kwargs = {"total_tasks": total_tasks, "all_reduce": all_reduce}
        self.capture = capture
        self.warmup_iterations = warmup_iterations
        self.graph = None
        self.static_batch = None
        self.static_out = None

    def __call__(self, batch: TaskBatch) -> dict:
        if not (self.capture and batch.support_x.is_cuda):
            return self.meta_optimizer.step(batch, **self.step_kwargs)
        if self.graph is None:
            self._record(batch)
        for static, new in zip(astuple(self.static_batch), astuple(batch)):
            if static.shape != new.shape:
                raise InputError(f"batch: a captured meta-step needs static shapes; got "
                                 f"{tuple(new.shape)}, captured {tuple(static.shape)}")
            static.copy_(new, non_blocking=True)
        self.meta_optimizer.begin_step()  # fills the lr tensors the graph reads
        self.graph.replay()
        self.meta_optimizer.end_step()
        return {k: v.clone() for k, v in self.static_out.items()}

    def _state_tensors(self):
        anil = self.meta_optimizer.anil
        tensors = list(anil.parameters()) + list(anil.buffers())
        return [t for t in tensors if t is not None]

    def _record(self, batch: TaskBatch) -> None:
        opt = self.meta_optimizer
        opt.make_capturable()
        opt.begin_step()
        self.static_batch = TaskBatch(*(t.clone() for t in astuple(batch)))
        saved = [t.detach().clone() for t in self._state_tensors()]
        had_state = {p for p in opt.optimizer.state}
        saved_opt = {p: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
                     for p, s in opt.optimizer.state.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_iterations):
                opt.device_step(self.static_batch, **self.step_kwargs)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():  # undo the warm-up updates
            for t, s in zip(self._state_tensors(), saved):
                t.copy_(s)
            for p, state in opt.optimizer.state.items():
                for k, v in state.items():
                    if not isinstance(v, torch.Tensor):
                        continue
                    if p in had_state:
                        v.copy_(saved_opt[p][k])
                    else:
                        v.zero_()  # fresh state: zero moments, step 0
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = opt.device_step(self.static_batch, **self.step_kwargs)
