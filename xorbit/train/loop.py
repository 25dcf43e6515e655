"""Deprecated: use `xorbit.training.loop`."""

from ..training.loop import *  # noqa: F403
from ..training.loop import __all__  # noqa: F401
