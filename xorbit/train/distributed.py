"""Deprecated: use `xorbit.training.distributed`."""

from ..training.distributed import *  # noqa: F403
from ..training.distributed import __all__  # noqa: F401
