"""Resource metrics beside every timing: GPU utilisation (nvidia-ml-py, sampled in a thread),
peak GPU memory (torch.cuda.max_memory_allocated), and peak RSS on the CPU."""
from __future__ import annotations

import resource
import sys
import threading

import numpy as np
import torch

from anil_fast.errors import InputError


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def nvml_uuid(device) -> str:
    """The NVML UUID of a torch CUDA device. torch's ordinals count the visible devices only
    (CUDA_VISIBLE_DEVICES), NVML's indices every GPU on the machine: the UUID names the same
    card in both."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


class GPUMonitor:
    """Average GPU utilisation over a block of work: `with GPUMonitor(device) as m: ...`, then
    `m.average_utilization` (percent, or None when there is no GPU or NVML)."""

    def __init__(self, device, interval: float = 0.1):
        self.device = torch.device(device)
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = None
        self._handle = None
        self._nvml = None  # the pynvml module while NVML is initialised by this monitor

    def __enter__(self):
        if self.device.type == "cuda":
            try:
                import pynvml
                pynvml.nvmlInit()
                self._nvml = pynvml
                self._handle = pynvml.nvmlDeviceGetHandleByUUID(nvml_uuid(self.device))
                self._thread = threading.Thread(target=self._run, daemon=True)
                self._thread.start()
            except Exception:  # no NVML (driver, container): utilisation stays n/a
                self._handle = None
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            except Exception:
                return

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()  # NVML counts its inits: this one is ours to undo
            except Exception:
                pass
            self._nvml = None
        return False

    @property
    def average_utilization(self):
        return float(np.mean(self.samples)) if self.samples else None


def reset_peak_memory(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> dict:
    """{'peak_gpu_memory_bytes': int | None, 'peak_rss_bytes': int}."""
    device = torch.device(device)
    gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"peak_gpu_memory_bytes": gpu, "peak_rss_bytes": peak_rss_bytes()}


def mean_ci95(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval, 1.96 * std / sqrt(N)
    (std with ddof=1; 0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise InputError("no values to summarise")
    std = values.std(ddof=1) if values.size > 1 else 0.0
    return float(values.mean()), float(1.96 * std / np.sqrt(values.size))
