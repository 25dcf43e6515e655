"""Per-variable transforms between physical values and the space the model works in.

ORBIT-2 trains precipitation as ``log1p`` of daily totals in mm, with values at
or below 0.25 mm/day set to zero (drizzle is noise; the log compresses the
heavy tail so that a squared-error loss does not chase a few storms).  xorbit
does the same with ``xorbit.train(..., transforms={"pr": "log1p"})`` and, unlike
the reference, inverts it on the way out of ``.orbit.downscale``: results are
precipitation again, in the input's units, never negative.

A transform names a kind (`KINDS`); each kind fixes the units it works in, so
its threshold means the same whatever units the data come in (``kg m-2 s-1``
is converted to ``mm/day`` with pint first).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import xarray as xr

from .units import UnitsError, convert

__all__ = ["DRY_THRESHOLD", "KINDS", "check", "forward", "inverse", "to_transform_units"]

# kind -> the units its threshold and log are defined in
KINDS: dict[str, str] = {"log1p": "mm/day"}

# Daily totals at or below this many mm/day count as dry (the reference's 0.25).
DRY_THRESHOLD = 0.25


def check(transforms: Mapping[str, str] | None, variables: Iterable[str]) -> dict[str, str]:
    """``transforms`` as a plain dict, checked against the model's variable names.

    Raises
    ------
    ValueError
        For an unknown kind or a variable the model does not have (both named).
    """
    out = {str(k): str(v) for k, v in (transforms or {}).items()}
    known = set(variables)
    for name, kind in out.items():
        if kind not in KINDS:
            raise ValueError(
                f"transform {kind!r} for variable {name!r} is unknown; known: {sorted(KINDS)}"
            )
        if name not in known:
            raise ValueError(
                f"transforms names variable {name!r}, which is not among the model's "
                f"variables {sorted(known)}"
            )
    return out


def to_transform_units(da: xr.DataArray, kind: str, name: str) -> xr.DataArray:
    """``da`` converted to the units ``kind`` works in (``mm/day`` for ``log1p``)."""
    target = KINDS[kind]
    if da.attrs.get("units") is None:
        raise UnitsError(
            f"variable {name!r} has no units attribute, but its {kind!r} transform works in "
            f"{target!r}: set it (e.g. 'mm/day' or 'kg m-2 s-1') or pass units={{{name!r}: ...}}"
        )
    return convert(da, target, name)


def forward(da: xr.DataArray, kind: str) -> xr.DataArray:
    """Physical values (in ``KINDS[kind]``) → model space, lazily; NaN kept.

    ``log1p``: values at or below `DRY_THRESHOLD` (negative noise included)
    become 0, the rest ``log(1 + x)``.
    """
    if kind != "log1p":
        raise ValueError(f"unknown transform {kind!r}; known: {sorted(KINDS)}")
    wet = da.where(~(da <= DRY_THRESHOLD), 0)  # NaN <= t is False: NaN stays
    # a NumPy ufunc of a DataArray is a DataArray (__array_ufunc__), not as typed
    return np.log1p(wet).assign_attrs(da.attrs)  # type: ignore[attr-defined]


def inverse(da: xr.DataArray, kind: str) -> xr.DataArray:
    """Model space → physical values, lazily; NaN kept.

    ``log1p``: ``expm1``, then values at or below `DRY_THRESHOLD` become 0 as
    `forward` made them in the training data (the model never saw drizzle, so
    what it writes there is noise): ``inverse(forward(x))`` is ``x`` above
    the threshold, to rounding, and 0 elsewhere.  Never negative.
    """
    if kind != "log1p":
        raise ValueError(f"unknown transform {kind!r}; known: {sorted(KINDS)}")
    wet = np.expm1(da)
    # a NumPy ufunc of a DataArray is a DataArray (__array_ufunc__), not as typed
    return wet.where(~(wet <= DRY_THRESHOLD), 0).assign_attrs(da.attrs)  # type: ignore[attr-defined]
