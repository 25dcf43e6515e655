"""xorbit: ORBIT-2 climate downscaling (Reslim + TILES) for xarray.

Importing the package registers the ``.orbit`` accessor on DataArray and Dataset.
"""

from . import accessor  # noqa: F401  (registers the .orbit accessors)
from ._version import __version__
from .baselines import baseline
from .downscaler import Downscaler, load
from .metrics import evaluate
from .model import CheckpointError, Reslim, ReslimConfig
from .training import train
from .training.samples import coarsen

__all__ = [
    "CheckpointError",
    "Downscaler",
    "Reslim",
    "ReslimConfig",
    "__version__",
    "baseline",
    "coarsen",
    "evaluate",
    "load",
    "train",
]
