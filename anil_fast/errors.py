"""The package's errors, and the checks of integers and optional thresholds every layer uses.

User errors (bad settings, bad files, a run folder in use) derive from `AnilFastError`: the
CLI prints them as one clear line (exit code 2). Anything else is a programming error and keeps
its traceback. `InputError` is also a ValueError and `InputTypeError` also a TypeError (and a
ValueError), so callers that catch the built-in classes keep working.
"""
from __future__ import annotations

import math


class AnilFastError(Exception):
    """Base class of the errors this package raises for bad input, files or settings."""


class InputError(AnilFastError, ValueError):
    """A value, setting or file that cannot be used; the message names the argument."""


class InputTypeError(AnilFastError, TypeError, ValueError):
    """An argument of the wrong type; the message names the argument."""


class TrainingDiverged(AnilFastError, RuntimeError):
    """The loss, a weight or a BatchNorm statistic left its sane range; the last good
    checkpoint is kept (exit code 3; training/divergence.py)."""


class Interrupted(AnilFastError):
    """Ctrl-C (SIGINT) during training; the last checkpoint is kept (exit code 130)."""


def is_int(value) -> bool:
    """A Python int that is not a bool (True is an int to isinstance, never a count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value, low: int | None = None) -> int:
    """`value` if it is an int (not a bool) of at least `low`; else an error naming `name`."""
    if not is_int(value):
        raise InputTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise InputError(f"{name} must be at least {low}, got {value}")
    return value


def check_optional_number(name: str, value, above: float, none_means: str) -> float | None:
    """None, or `value` as a float if it is a finite number (not a bool) above `above`; else
    an error naming `name` and what None means."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not above < value < math.inf:
        raise InputError(f"{name} must be a number > {above:g} (or None: {none_means}), got {value!r}")
    return float(value)
