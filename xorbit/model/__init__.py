"""The Reslim network, its loss, its config and its checkpoints: pure torch."""

from .checkpoint import CheckpointError, import_orbit2, load_checkpoint, save_checkpoint
from .config import PRESETS, ReslimConfig
from .loss import bayesian_tv_loss, latitude_weights, total_variation
from .reslim import Reslim

__all__ = [
    "PRESETS",
    "CheckpointError",
    "Reslim",
    "ReslimConfig",
    "bayesian_tv_loss",
    "import_orbit2",
    "latitude_weights",
    "load_checkpoint",
    "save_checkpoint",
    "total_variation",
]
