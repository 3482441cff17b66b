"""The published numbers results are compared with (references.json: the papers' accuracies
per preset, Lake et al.'s one-shot errors, and their sources)."""
from __future__ import annotations

from importlib.resources import files

from anil_fast.env import parse_json

__all__ = ["references"]


def references() -> dict:
    return parse_json((files("anil_fast.data") / "references.json").read_text())
