"""Training scalars for TensorBoard (`train --tensorboard [DIR]`), written with
torch.utils.tensorboard when the `tensorboard` package is installed (the optional extra:
pip install 'anil-fast[tensorboard]'). Training never depends on it: without the package,
asking for it is a clear error before anything starts.

Scalars (step = meta-step): train/loss, train/accuracy, train/it_s, lr/<group>, memory/<kind>
(peak GPU memory or peak RSS, MiB), validation/accuracy."""
from __future__ import annotations

import importlib.util

from anil_fast.errors import InputError


def require(log_dir=None) -> None:
    """Raise a clear InputError when the tensorboard package is missing, or `log_dir` is a
    file (or a link to nowhere) rather than a folder."""
    from pathlib import Path
    if log_dir is not None:
        path = Path(log_dir)
        if path.is_symlink() and not path.exists():
            raise InputError(f"--tensorboard {path} is a symbolic link to nowhere; give a folder")
        if path.exists() and not path.is_dir():
            raise InputError(f"--tensorboard {path} is a file; give a folder for the scalars")
    if importlib.util.find_spec("tensorboard") is None:  # torch.utils.tensorboard imports it
        raise InputError("--tensorboard needs the tensorboard package: pip install "
                         "'anil-fast[tensorboard]' (or pip install tensorboard); training "
                         "itself does not need it")


class TensorBoardLog:
    def __init__(self, log_dir):
        require()
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(log_dir))

    def scalars(self, step: int, values: dict) -> None:
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(name, float(value), step)

    def progress(self, step: int, learning_rates: dict, device, it_s: float | None) -> None:
        """The rates of the steps so far: learning rate per group, it/s, peak memory (MiB)."""
        from anil_fast.metrics import peak_memory
        memory = {f"memory/{k.removesuffix('_bytes')}_MiB": v / 2**20
                  for k, v in peak_memory(device).items() if v is not None}
        self.scalars(step, {"train/it_s": it_s, **memory,
                            **{f"lr/{k}": v for k, v in learning_rates.items()}})
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
