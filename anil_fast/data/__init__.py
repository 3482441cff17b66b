"""Few-shot data on the device (Omniglot, the benchmarks, your own) and task sampling."""
from anil_fast.data.benchmarks import BENCHMARKS, load_benchmark
from anil_fast.data.fewshot import FewShotImages, from_dataset, from_tensors, image_folder
from anil_fast.data.omniglot import Omniglot, search_roots
from anil_fast.data.tasks import (PROTOCOLS, TaskBatch, TaskIndices, TaskSampler, load_split,
                    standard_characters)

__all__ = ["Omniglot", "TaskBatch", "TaskIndices", "TaskSampler", "load_split",
           "standard_characters", "search_roots", "PROTOCOLS", "FewShotImages", "from_tensors",
           "from_dataset", "image_folder", "load_benchmark", "BENCHMARKS"]
