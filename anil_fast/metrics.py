"""Resource metrics beside every timing: GPU utilisation (nvidia-ml-py, sampled in a thread),
peak GPU memory (torch.cuda.max_memory_allocated), and peak RSS on the CPU."""
from __future__ import annotations

import resource
import sys
import threading

import numpy as np
import torch


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


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

    def __enter__(self):
        if self.device.type == "cuda":
            try:
                import pynvml
                pynvml.nvmlInit()
                index = self.device.index if self.device.index is not None else torch.cuda.current_device()
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                self._thread = threading.Thread(target=self._run, daemon=True)
                self._thread.start()
            except Exception:  # no NVML (driver, container): utilisation stays n/a
                self._handle = None
        return self

    def _run(self):
        import pynvml
        while not self._stop.wait(self.interval):
            try:
                self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            except Exception:
                return

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
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
        raise ValueError("no values to summarise")
    std = values.std(ddof=1) if values.size > 1 else 0.0
    return float(values.mean()), float(1.96 * std / np.sqrt(values.size))
