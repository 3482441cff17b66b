"""Omniglot on the device and few-shot task sampling."""
from .omniglot import Omniglot, search_roots
from .tasks import (PROTOCOLS, TaskBatch, TaskIndices, TaskSampler, load_split,
                    standard_characters)

__all__ = ["Omniglot", "TaskBatch", "TaskIndices", "TaskSampler", "load_split",
           "standard_characters", "search_roots", "PROTOCOLS"]
