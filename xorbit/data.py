"""Deprecated: `xorbit.variables` (finding variables) and `xorbit.training.samples`.

Kept for one release so that ``from xorbit.data import coarsen`` still works.
"""

from __future__ import annotations

import warnings

from .training.samples import (
    PairedArrays,
    PairedCrops,
    coarsen,
    compute_stats,
    pair_arrays,
    split_time,
)
from .variables import COORDINATE_FIELDS, as_dataset, coordinate_fields, find_variable

__all__ = [
    "COORDINATE_FIELDS",
    "PairedArrays",
    "PairedCrops",
    "as_dataset",
    "coarsen",
    "compute_stats",
    "coordinate_fields",
    "find_variable",
    "pair_arrays",
    "split_time",
]

warnings.warn(
    "xorbit.data is deprecated: use xorbit.coarsen, xorbit.variables and xorbit.training.samples",
    DeprecationWarning,
    stacklevel=2,
)
