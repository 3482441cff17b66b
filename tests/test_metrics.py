"""GPU utilisation is read from the card torch uses, by UUID, and NVML is shut down."""
import sys
import time
import types

import torch

from anil_fast import metrics


def test_gpu_monitor_reads_the_card_torch_uses_and_shuts_nvml_down(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetHandleByIndex=lambda i: calls.append(("index", i)) or ("index", i),
        nvmlDeviceGetHandleByUUID=lambda u: calls.append(("uuid", u)) or ("uuid", u),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=42))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    # CUDA_VISIBLE_DEVICES=3,5: torch's cuda:1 is the machine's GPU 5, NVML's index 1 another card
    uuids = {0: "8a6d1c2e-0000-0000-0000-000000000003", 1: "8a6d1c2e-0000-0000-0000-000000000005"}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid=uuids[i]))
    with metrics.GPUMonitor("cuda:1", interval=0.01) as monitor:
        deadline = time.monotonic() + 10
        while not monitor.samples and time.monotonic() < deadline:
            time.sleep(0.01)
    assert ("uuid", "GPU-8a6d1c2e-0000-0000-0000-000000000005") in calls
    assert not any(isinstance(c, tuple) and c[0] == "index" for c in calls)
    assert calls[0] == "init" and calls[-1] == "shutdown"
    assert monitor.average_utilization == 42.0
