"""anil-fast: fast ANIL meta-learning in PyTorch.

The package in rooms (docs/development.md): `models` (ANIL, the head's op, the bodies),
`data`, `runs` (run folders, settings, loading), `evaluation`, `training`, `use` (predict,
export, Lake's runs), `experiments`, `measure`; `config` holds Config and the option lists.
The names below are imported when first used, so `anil-fast --help` loads none of them."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {"ANIL": "anil_fast.models.anil", "MetaOptimizer": "anil_fast.training.optim",
           "adapted_query_loss": "anil_fast.models.functional",
           "FewShotClassifier": "anil_fast.use.predict", "Config": "anil_fast.config",
           "scenario_config": "anil_fast.config", "train": "anil_fast.training.run",
           "TrainingRun": "anil_fast.training.run", "resolve": "anil_fast.runs.settings",
           "load_run": "anil_fast.runs.load", "evaluate_checkpoint": "anil_fast.evaluation"}

__all__ = [*_PUBLIC, "models", "data", "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # once
        return value
    if name in ("models", "data"):
        return importlib.import_module(f"anil_fast.{name}")
    raise AttributeError(f"module 'anil_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
