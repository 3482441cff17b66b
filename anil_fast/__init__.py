"""anil-fast: fast ANIL meta-learning in PyTorch."""
__version__ = "0.1.0"

# Installed, kernels/ and csrc/ are the subpackages anil_fast.kernels and anil_fast.csrc. Run
# from a plain checkout (PYTHONPATH=., as benches/gpu_check.py is), they sit beside this
# folder: let the subpackage lookup find them there too.
import os as _os

_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "kernels", "anil_head.py")) and _checkout not in __path__:
    __path__.append(_checkout)

from .anil import ANIL  # noqa: E402
from .functional import adapted_query_loss  # noqa: E402

__all__ = ["ANIL", "adapted_query_loss", "__version__"]
