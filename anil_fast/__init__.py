"""anil-fast: fast ANIL meta-learning in PyTorch."""
__version__ = "0.1.0"

from .anil import ANIL
from .optim import MetaOptimizer
from .functional import adapted_query_loss
from .predict import FewShotClassifier

__all__ = ["ANIL", "MetaOptimizer", "FewShotClassifier", "adapted_query_loss", "__version__"]
