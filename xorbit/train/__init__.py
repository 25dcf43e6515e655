"""Deprecated import path: the training package is `xorbit.training`.

``xorbit.train`` is the training *function*.  This package exists for one
release so that ``from xorbit.train import train`` (and ``xorbit.train.loop``,
``xorbit.train.distributed``) keep working; importing it warns.  The module
itself is callable, so ``xorbit.train(...)`` still trains even after Python's
import machinery has bound this module to the ``xorbit.train`` attribute.
"""

from __future__ import annotations

import sys
import types
import warnings

from ..training import TrainOptions, fit, load_state, train, validate

__all__ = ["TrainOptions", "fit", "load_state", "train", "validate"]

warnings.warn(
    "the xorbit.train package is deprecated: import from xorbit.training "
    "(xorbit.train, the function, is unchanged)",
    DeprecationWarning,
    stacklevel=2,
)


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
