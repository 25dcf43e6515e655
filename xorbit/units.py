"""Units: bring inputs into the model's units with pint (cf_xarray's registry).

A `Downscaler` records the units of each variable it was trained on.  Inputs in
other compatible units (°C for K, ``kg m-2 s-1`` for ``mm/day``) are converted
lazily before normalization; outputs carry the model's units string as written
in the training data.  Precipitation flux and depth rates convert through the
density of liquid water (1000 kg m-3), the usual meteorological convention.
"""

from __future__ import annotations

from collections.abc import Mapping

import cf_xarray.units  # noqa: F401  (makes pint understand CF unit strings)
import numpy as np
import pint
import xarray as xr
from cf_xarray.units import units as ureg

__all__ = ["UnitsError", "convert", "to_model_units", "ureg"]

_WATER = "xorbit-water"


def _register_water_context() -> None:
    if _WATER in ureg._contexts:
        return
    ctx = pint.Context(_WATER)
    rho = ureg.Quantity(1000.0, "kg m-3")
    for flux, depth in (
        ("[mass] / [length] ** 2 / [time]", "[length] / [time]"),
        ("[mass] / [length] ** 2", "[length]"),
    ):
        # pint calls a transformation with the context's parameters as keywords
        ctx.add_transformation(flux, depth, lambda ureg, value, **_: value / rho)
        ctx.add_transformation(depth, flux, lambda ureg, value, **_: value * rho)
    ureg.add_context(ctx)


_register_water_context()


class UnitsError(ValueError):
    """Missing, unparsable or incompatible units; the message names the variable."""


def _parse(units: str, name: str) -> pint.Unit:
    try:
        return ureg.Unit(str(units))
    except (pint.errors.UndefinedUnitError, ValueError, TypeError, AssertionError) as err:
        raise UnitsError(f"variable {name!r}: cannot understand units {units!r} ({err})") from err


def convert(da: xr.DataArray, target: str, name: str | None = None) -> xr.DataArray:
    """``da`` (with a ``units`` attribute) converted to ``target``, lazily.

    The result's ``units`` attribute is ``target`` exactly as given.
    """
    name = name or str(da.name)
    have = da.attrs.get("units")
    if have is None:
        raise UnitsError(f"variable {name!r} has no units attribute; expected {target!r}")
    src, dst = _parse(have, name), _parse(target, name)
    if src == dst:
        return da.assign_attrs(units=target)
    try:
        # every unit change we meet is affine (scale, and an offset for °C / °F):
        # pint converts two scalars and the data get y = a x + b, lazily.  Not
        # pint-xarray's quantify: xsdba switches the shared registry's
        # force_ndarray_like off on import, and pint-xarray then refuses it.
        with ureg.context(_WATER):
            zero = float(ureg.Quantity(0.0, src).to(dst).magnitude)
            one = float(ureg.Quantity(1.0, src).to(dst).magnitude)
    except pint.errors.DimensionalityError as err:
        raise UnitsError(
            f"variable {name!r} is in {have!r}, which cannot be converted to the model's {target!r}"
        ) from err
    dtype = da.dtype if da.dtype.kind == "f" else np.float64
    scale, offset = np.asarray(one - zero, dtype), np.asarray(zero, dtype)
    out = da * scale + offset if offset else da * scale
    return out.assign_attrs({**da.attrs, "units": target})


def to_model_units(
    inputs: Mapping[str, xr.DataArray],
    model_units: Mapping[str, str | None],
    overrides: Mapping[str, str] | None = None,
) -> dict[str, xr.DataArray]:
    """Convert each input to the model's units.

    Parameters
    ----------
    inputs
        Model variable name → data.
    model_units
        The units the model was trained in (``None``: unknown, nothing checked).
    overrides
        Units to assume for inputs whose ``units`` attribute is missing or wrong.

    Raises
    ------
    UnitsError
        Naming the variable whose units are missing (and the model knows its
        units), unparsable, or incompatible.
    """
    overrides = dict(overrides or {})
    out = {}
    for name, da in inputs.items():
        want = model_units.get(name)
        if name in overrides:
            da = da.assign_attrs(units=overrides[name])
        if not want:
            out[name] = da
            continue
        if da.attrs.get("units") is None:
            raise UnitsError(
                f"variable {name!r} has no units attribute but the model expects {want!r}; "
                f"set it, or pass units={{{name!r}: ...}} to say what it is in"
            )
        out[name] = convert(da, want, name)
    return out
