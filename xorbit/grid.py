"""The fine grid: the spatial dims of a field and the refined coordinates it is downscaled to.

A downscaling model with factor ``f`` turns an ``(ny, nx)`` field into an
``(ny * f, nx * f)`` one.  This module works out the coordinates of that output:
it finds the latitude-like and longitude-like dimensions by their CF meaning
(cf_xarray), takes or infers each coarse cell's bounds, splits every coarse cell
into ``f`` equal parts and returns the part midpoints and edges as CF coordinates
and bounds, ready for ``assign_coords`` or building a Dataset.

Only rectilinear grids (1-D dimension coordinates) are supported; a curvilinear
grid (2-D latitude/longitude) is refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from numbers import Integral
from typing import Any, TypeVar

import cf_xarray  # noqa: F401  (registers the .cf accessor)
import numpy as np
import xarray as xr

__all__ = [
    "axis_values",
    "cell_bounds",
    "fine_grid",
    "is_global_longitude",
    "match_grid",
    "refine_coord",
    "spacing_km",
    "spatial_dims",
]

BOUNDS_DIM = "bnds"

_Y_DIM_NAMES = ("lat", "latitude", "y")
_X_DIM_NAMES = ("lon", "longitude", "x")
_LAT_NAMES = ("lat", "latitude")
_LON_NAMES = ("lon", "longitude")
# for a function that gives back what it was given: a DataArray, a Dataset or
# (the caller does not know which) either
_XarrayT = TypeVar("_XarrayT", xr.DataArray, xr.Dataset, xr.DataArray | xr.Dataset)

# Length of one degree of a great circle on a sphere of radius 6371 km: the
# reference's resolutions (625, 111, 28 km for 5.625, 1, 0.25 degrees) are this
# times the spacing in degrees.
KM_PER_DEGREE = 6371.0 * np.pi / 180

_LAT_ATTRS = {"standard_name": "latitude", "units": "degrees_north", "axis": "Y"}
_LON_ATTRS = {"standard_name": "longitude", "units": "degrees_east", "axis": "X"}


# --------------------------------------------------------------------------- helpers


def _label(coord: xr.DataArray) -> Hashable:
    """The name used for ``coord`` in messages and outputs (its name, else its dim)."""
    if coord.name is not None:
        return coord.name
    return coord.dims[0] if coord.dims else "<unnamed>"


def _cf_meaning(coord: xr.DataArray) -> str | None:
    """``"latitude"``, ``"longitude"`` or ``None`` for a coordinate, by CF attrs or by name.

    cf_xarray only sees a DataArray's *coords*, so the attributes are checked on a
    throw-away Dataset holding a 0-d variable with the same attrs.
    """
    probe = xr.Dataset(coords={"_probe": xr.Variable((), 0, dict(coord.attrs))})
    found = probe.cf.coordinates
    if "latitude" in found:
        return "latitude"
    if "longitude" in found:
        return "longitude"
    name = str(_label(coord)).lower()
    if name in _LAT_NAMES:
        return "latitude"
    if name in _LON_NAMES:
        return "longitude"
    return None


def _is_dim_coord(obj: xr.DataArray | xr.Dataset, name: Hashable) -> bool:
    return name in obj.coords and obj[name].dims == (name,)


def _find_dim(
    obj: xr.DataArray | xr.Dataset, axis: str, meaning: str, fallback: tuple[str, ...]
) -> Hashable | None:
    """The dimension for one CF axis ("Y" or "X"), or None; raises on ambiguity/curvilinear."""
    cands: list[Hashable] = []
    for name in [*obj.cf.axes.get(axis, []), *obj.cf.coordinates.get(meaning, [])]:
        if name not in cands and name in obj.coords:
            cands.append(name)

    dims = [name for name in cands if _is_dim_coord(obj, name)]
    if len(dims) == 1:
        return dims[0]
    if len(dims) > 1:
        raise ValueError(
            f"several dimension coordinates look like {meaning} ({axis} axis): {dims}; "
            "pass ydim=/xdim= explicitly"
        )

    # 2-D (or higher) latitude/longitude: recognised by cf_xarray or by its name.
    names = _LAT_NAMES if meaning == "latitude" else _LON_NAMES
    multi = [name for name in cands if obj[name].ndim >= 2]
    multi += [
        name
        for name in obj.coords
        if str(name).lower() in names and obj[name].ndim >= 2 and name not in multi
    ]
    if multi:
        name = multi[0]
        raise ValueError(
            f"{meaning} coordinate {name!r} is {obj[name].ndim}-D with dims {obj[name].dims}: "
            "curvilinear grids are not supported (xorbit needs 1-D latitude and longitude "
            "dimension coordinates; regrid to a rectilinear grid first)"
        )

    named = [dim for dim in obj.dims if str(dim).lower() in fallback]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise ValueError(
            f"several dims could be the {meaning} dimension: {named}; pass ydim=/xdim= explicitly"
        )
    return None


def _explicit_bounds(
    coord: xr.DataArray, obj: xr.DataArray | xr.Dataset | None
) -> np.ndarray | None:
    """The bounds variable named by ``coord.attrs["bounds"]``, as float64 (n, 2), or None."""
    bname = coord.attrs.get("bounds")
    if bname is None:
        return None
    # coordinates hold DataArrays, a Dataset's variables Variables
    pools: list[Mapping[Any, xr.DataArray | xr.Variable]] = [coord.coords]
    if isinstance(obj, xr.Dataset):
        pools.insert(0, obj.variables)
    elif isinstance(obj, xr.DataArray):
        pools.insert(0, obj.coords)
    var = next((pool[bname] for pool in pools if bname in pool), None)
    if var is None:
        return None

    label = _label(coord)
    dim = coord.dims[0]
    n = coord.size
    if isinstance(var, xr.DataArray):
        var = var.variable
    if var.ndim != 2 or dim not in var.dims:
        raise ValueError(
            f"bounds variable {bname!r} of coordinate {label!r} has dims {var.dims}; "
            f"expected ({dim!r}, <bounds dim of size 2>)"
        )
    other = next(d for d in var.dims if d != dim)
    values = np.asarray(var.transpose(dim, other).values, dtype=np.float64)
    if values.shape != (n, 2):
        raise ValueError(
            f"bounds variable {bname!r} of coordinate {label!r} has shape {values.shape}; "
            f"expected ({n}, 2)"
        )
    if not np.isfinite(values).all():
        raise ValueError(f"bounds variable {bname!r} of coordinate {label!r} has non-finite values")
    return values


def _monotonic(values: np.ndarray) -> bool:
    step = np.diff(values)
    return bool((step > 0).all() or (step < 0).all())


def unwrap_longitude(values: np.ndarray) -> np.ndarray:
    """Longitudes ``values`` (degrees) as one run without jumps of 360 degrees.

    A regional grid across the seam of its convention (Europe written
    0..360: ``350, 355, 0, 5``; the Pacific written -180..180: ``170, 175,
    -180, -175``) is monotonic only modulo 360; unwrapped it is
    ``350, 355, 360, 365`` and ``170, 175, 180, 185``.  Values that already
    run monotonically are returned as they are (as float64).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2 or _monotonic(values):
        return values
    return np.unwrap(values, period=360.0)


def wrap_longitude(values: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``values`` (unwrapped longitudes) written in the convention of ``like``.

    The inverse of `unwrap_longitude` for a coordinate derived from ``like``
    (its fine centres, its bounds): nothing changes when ``like`` itself runs
    monotonically; otherwise values go into ``[-180, 180)`` when ``like`` has
    negative longitudes, else into ``[0, 360)``.
    """
    like = np.asarray(like, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if like.size < 2 or _monotonic(like):
        return values
    origin = -180.0 if like.min() < 0 else 0.0
    return (values - origin) % 360.0 + origin


def axis_values(coord: xr.DataArray) -> np.ndarray:
    """The coordinate's values as float64, after checking it is 1-D, finite and monotonic.

    A longitude that runs monotonically only modulo 360 (a domain across the
    seam of its convention) is returned unwrapped (`unwrap_longitude`); a
    latitude beyond +-90 degrees is refused.
    """
    label = _label(coord)
    if coord.ndim != 1:
        raise ValueError(
            f"coordinate {label!r} must be 1-D, got dims {coord.dims} "
            "(curvilinear grids are not supported)"
        )
    values = np.asarray(coord.values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"coordinate {label!r} has non-finite values")
    meaning = _cf_meaning(coord)
    if meaning == "latitude" and values.size and np.abs(values).max() > 90.0:
        k = int(np.argmax(np.abs(values)))
        raise ValueError(
            f"latitude {label!r} has {float(values[k])} at position {k}, beyond +-90 degrees; "
            "fix the coordinate (or drop its latitude attributes if it is not a latitude)"
        )
    if meaning == "longitude":
        values = unwrap_longitude(values)
    if values.size > 1:
        step = np.diff(values)
        if not ((step > 0).all() or (step < 0).all()):
            wrong = (step == 0) | (np.sign(step) != np.sign(step[0]))
            k = int(np.flatnonzero(wrong)[0]) if wrong.any() else 0
            raise ValueError(
                f"coordinate {label!r} is not strictly monotonic: {float(values[k])} at position "
                f"{k} is followed by {float(values[k + 1])} (direction set by "
                f"{float(values[0])}, {float(values[1])}); "
                "sort it (e.g. obj.sortby(...)) first"
            )
    return values


# --------------------------------------------------------------------------- public API


def spatial_dims(obj: xr.DataArray | xr.Dataset) -> tuple[str, str]:
    """The names of the latitude-like and longitude-like dimensions of ``obj``.

    A dimension is found by CF meaning with cf_xarray: a coordinate on the ``Y``/``X``
    axis (``obj.cf.axes``) or with latitude/longitude meaning (``obj.cf.coordinates``,
    i.e. ``standard_name``, ``units`` or ``axis`` attributes) that is 1-D and is the
    dimension coordinate of its own dimension.  Failing that, dims literally named
    ``lat``/``latitude``/``y`` and ``lon``/``longitude``/``x`` are used.

    Parameters
    ----------
    obj
        The field (DataArray) or Dataset.

    Returns
    -------
    tuple of str
        ``(ydim, xdim)``.

    Raises
    ------
    ValueError
        If either dimension cannot be found (the message lists ``obj``'s dims), if
        several candidates match, or if the latitude/longitude coordinate is 2-D
        (curvilinear grids are not supported).
    """
    ydim = _find_dim(obj, "Y", "latitude", _Y_DIM_NAMES)
    xdim = _find_dim(obj, "X", "longitude", _X_DIM_NAMES)
    missing = [
        what for what, dim in (("latitude (Y)", ydim), ("longitude (X)", xdim)) if dim is None
    ]
    if missing:
        raise ValueError(
            f"cannot find the {' and '.join(missing)} dimension among dims {tuple(obj.dims)}: "
            "give the coordinates CF attributes (axis='Y'/'X' or standard_name='latitude'/"
            "'longitude'), name the dims lat/lon, or pass ydim=/xdim= explicitly"
        )
    if ydim == xdim:
        raise ValueError(f"dimension {ydim!r} was found as both latitude and longitude")
    return ydim, xdim  # type: ignore[return-value]


def cell_bounds(coord: xr.DataArray, obj: xr.DataArray | xr.Dataset | None = None) -> np.ndarray:
    """The bounds of each cell of a 1-D coordinate.

    If ``coord.attrs["bounds"]`` names a variable present in ``obj`` (a Dataset's
    variables or a DataArray's coords) or in ``coord``'s own coords, those bounds are
    used.  Otherwise they are inferred: inner edges are the midpoints between
    neighbouring centres and the outer edges lie half a neighbouring spacing beyond
    the first and last centres.  For a recognisable latitude the inferred outer
    edges are clipped to [-90, 90].  Bounds follow the coordinate's direction:
    ``bounds[i, 1] == bounds[i + 1, 0]`` for ascending and descending coordinates.

    Parameters
    ----------
    coord
        1-D coordinate (ascending or descending).
    obj
        Dataset or DataArray in which to look up the bounds variable.

    Returns
    -------
    numpy.ndarray
        float64 array of shape ``(n, 2)``.

    Raises
    ------
    ValueError
        If ``coord`` is not 1-D, is not strictly monotonic or has non-finite values;
        if it has a single point and no bounds variable; or if its bounds variable has
        the wrong shape.
    """
    values = axis_values(coord)
    explicit = _explicit_bounds(coord, obj)
    if explicit is not None:
        if _cf_meaning(coord) == "latitude" and np.abs(explicit).max() > 90.0 + 1e-9:
            raise ValueError(
                f"the bounds of latitude {_label(coord)!r} reach {float(np.abs(explicit).max())}, "
                "beyond +-90 degrees; fix the bounds variable"
            )
        return explicit
    if values.size < 2:
        raise ValueError(
            f"coordinate {_label(coord)!r} has {values.size} point(s) and no bounds variable, "
            "so its cell size cannot be inferred; add a bounds variable "
            f"(attrs['bounds']) for {_label(coord)!r}"
        )
    mid = 0.5 * (values[:-1] + values[1:])
    first = values[0] - 0.5 * (values[1] - values[0])
    last = values[-1] + 0.5 * (values[-1] - values[-2])
    edges = np.concatenate([[first], mid, [last]])
    if _cf_meaning(coord) == "latitude":
        # centres at the poles (checked within +-90) give outer edges beyond them
        edges[0] = np.clip(edges[0], -90.0, 90.0)
        edges[-1] = np.clip(edges[-1], -90.0, 90.0)
    bounds = np.stack([edges[:-1], edges[1:]], axis=1)
    # each cell's bounds around its own centre, in the coordinate's convention
    return bounds + (np.asarray(coord.values, np.float64) - values)[:, None]


def _unwrapped_bounds(coord: xr.DataArray, obj: xr.DataArray | xr.Dataset | None) -> np.ndarray:
    """`cell_bounds` in the frame of the unwrapped centres: contiguous across a seam."""
    bounds = cell_bounds(coord, obj)
    if _cf_meaning(coord) != "longitude":
        return bounds
    values = axis_values(coord)
    lo, hi = bounds[:, 0], bounds[:, 1].copy()
    # a cell written across the seam ([357.5, 2.5]): its upper edge one turn on
    hi += 360.0 * np.round((lo - hi) / 360.0) * (np.abs(hi - lo) > 180.0)
    shift = 360.0 * np.round((values - 0.5 * (lo + hi)) / 360.0)
    return np.stack([lo + shift, hi + shift], axis=1)


def refine_coord(
    coord: xr.DataArray, factor: int, obj: xr.DataArray | xr.Dataset | None = None
) -> tuple[xr.DataArray, xr.DataArray]:
    """Split every cell of a 1-D coordinate into ``factor`` equal parts.

    Fine centres are the midpoints of the parts and fine bounds their edges, so a
    coarse cell ``[lo, hi]`` gives ``factor`` contiguous fine cells that tile it
    exactly.  The coordinate's direction is kept (descending stays descending) and
    longitudes are kept in the coordinate's convention (0..360 or -180..180):
    a grid that runs monotonically is never wrapped, and one across the seam
    of its convention (``350, 355, 0, 5``) gives fine longitudes that jump at
    the same seam.

    The result is always float64: float32 (or integer) coordinates are computed and
    returned in float64, so the fine centres are not rounded to float32.  The fine
    coordinate keeps the coarse coordinate's attrs (minus ``_FillValue``), with
    ``bounds`` set to ``f"{name}_bnds"``; a recognisable latitude/longitude (by
    cf_xarray or by its name) also gets ``standard_name``, ``units`` and ``axis`` if
    missing.  With ``factor == 1`` the coordinate is returned unchanged.

    Parameters
    ----------
    coord
        1-D dimension coordinate.
    factor
        Number of fine cells per coarse cell (int >= 1).
    obj
        Dataset or DataArray in which to look up ``coord``'s bounds variable (see
        `cell_bounds`).

    Returns
    -------
    fine : xarray.DataArray
        The fine coordinate, ``n * factor`` points on dim ``name``.
    bounds : xarray.DataArray
        Its bounds, named ``f"{name}_bnds"``, shape ``(n * factor, 2)`` on dims
        ``(name, "bnds")``.

    Raises
    ------
    ValueError
        If ``factor`` is not an int >= 1, or for the reasons of `cell_bounds`.
    """
    if isinstance(factor, bool) or not isinstance(factor, Integral) or factor < 1:
        raise ValueError(f"factor must be an int >= 1, got {factor!r}")
    factor = int(factor)
    coarse = _unwrapped_bounds(coord, obj)
    name = _label(coord)
    dim = coord.dims[0]
    bname = f"{name}_bnds"

    if factor == 1:
        coords = {dim: coord.variable} if name == dim else None
        bounds = xr.DataArray(coarse, dims=(dim, BOUNDS_DIM), coords=coords, name=bname)
        return coord, bounds

    lo, hi = coarse[:, :1], coarse[:, 1:]
    frac = np.arange(factor + 1, dtype=np.float64) / factor
    edges = lo + (hi - lo) * frac  # (n, factor + 1)
    edges[:, -1] = hi[:, 0]  # exact coarse edges, so contiguity is not lost to rounding
    fine_lo = edges[:, :-1].ravel()
    fine_hi = edges[:, 1:].ravel()
    centres = 0.5 * (fine_lo + fine_hi)
    if _cf_meaning(coord) == "longitude":  # back into the coordinate's own convention
        shift = wrap_longitude(centres, coord.values) - centres
        centres, fine_lo, fine_hi = centres + shift, fine_lo + shift, fine_hi + shift

    attrs = {k: v for k, v in coord.attrs.items() if k != "_FillValue"}
    attrs["bounds"] = bname
    meaning = _cf_meaning(coord)
    if meaning is not None:
        for key, value in (_LAT_ATTRS if meaning == "latitude" else _LON_ATTRS).items():
            attrs.setdefault(key, value)

    fine = xr.DataArray(centres, dims=(dim,), name=name, attrs=attrs)
    fine = fine.assign_coords({dim: fine})
    bounds = xr.DataArray(
        np.stack([fine_lo, fine_hi], axis=1),
        dims=(dim, BOUNDS_DIM),
        coords={dim: fine},
        name=bname,
    )
    return fine, bounds


def fine_grid(
    obj: xr.DataArray | xr.Dataset,
    factor: int,
    ydim: str | None = None,
    xdim: str | None = None,
) -> dict[str, xr.DataArray]:
    """The coordinates of ``obj`` downscaled by ``factor``.

    Parameters
    ----------
    obj
        Field (DataArray) or Dataset on a rectilinear grid.
    factor
        Refinement factor (int >= 1) applied to both spatial dims.
    ydim, xdim
        The latitude-like and longitude-like dims; found with `spatial_dims` when
        not given.

    Returns
    -------
    dict of str to xarray.DataArray
        ``{ydim: fine_y, xdim: fine_x, f"{ydim}_bnds": ..., f"{xdim}_bnds": ...}``
        followed by every coordinate of ``obj`` that does not depend on the spatial
        dims (scalar coordinates such as a grid-mapping variable, ``time``, ...),
        unchanged.  Other coordinates on the spatial dims (2-D auxiliary fields, old
        bounds) are dropped.

    Raises
    ------
    ValueError
        If a dim is not in ``obj`` or has no coordinate values, or for the reasons
        of `spatial_dims` and `refine_coord`.
    """
    if ydim is None or xdim is None:
        found_y, found_x = spatial_dims(obj)
        ydim = found_y if ydim is None else ydim
        xdim = found_x if xdim is None else xdim
    if ydim == xdim:
        raise ValueError(f"ydim and xdim are both {ydim!r}")
    for dim in (ydim, xdim):
        if dim not in obj.dims:
            raise ValueError(f"dimension {dim!r} is not in the object's dims {tuple(obj.dims)}")
        if dim not in obj.coords:
            raise ValueError(
                f"dimension {dim!r} has no coordinate values; assign them first "
                f"(obj.assign_coords({dim}=...))"
            )

    fine_y, bnds_y = refine_coord(obj[ydim], factor, obj)
    fine_x, bnds_x = refine_coord(obj[xdim], factor, obj)
    out: dict[str, xr.DataArray] = {
        ydim: fine_y,
        xdim: fine_x,
        f"{ydim}_bnds": bnds_y,
        f"{xdim}_bnds": bnds_x,
    }
    for name, coord in obj.coords.items():
        if name in out or ydim in coord.dims or xdim in coord.dims:
            continue
        out[name] = coord  # type: ignore[index]
    return out


def is_global_longitude(
    coord: xr.DataArray, obj: xr.DataArray | xr.Dataset | None = None, tol: float = 1e-6
) -> bool:
    """Whether a longitude coordinate wraps all the way round the globe.

    True when the cells (`cell_bounds`) of a regularly spaced 1-D coordinate add up
    to 360 degrees (``| |sum of widths| - 360 | <= tol * 360``), so the caller can use
    periodic boundaries in x.  Spacing is regular when every step between centres
    is within ``tol * 360`` of the mean step.

    Parameters
    ----------
    coord
        1-D longitude coordinate in degrees.
    obj
        Dataset or DataArray in which to look up ``coord``'s bounds variable.
    tol
        Relative tolerance (fraction of 360 degrees).

    Returns
    -------
    bool
        False for a regional grid, for a recognisable latitude, for irregular
        spacing and for a single point without a bounds variable.

    Raises
    ------
    ValueError
        If ``tol`` is negative, or for the reasons of `cell_bounds` (a coordinate that
        is not 1-D or not monotonic).
    """
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if coord.ndim == 1 and _cf_meaning(coord) == "latitude":
        return False
    values = axis_values(coord)
    if values.size < 2 and _explicit_bounds(coord, obj) is None:
        return False
    bounds = cell_bounds(coord, obj)
    atol = tol * 360.0
    if values.size > 1:
        step = np.diff(values)
        if np.abs(step - step.mean()).max() > atol:
            return False
    total = abs(float((bounds[:, 1] - bounds[:, 0]).sum()))
    return abs(total - 360.0) <= atol


def spacing_km(
    obj: xr.DataArray | xr.Dataset, ydim: str | None = None, xdim: str | None = None
) -> float | None:
    """The grid spacing of ``obj`` in km: what the resolution embedding reads.

    Each spatial axis' spacing is the median absolute step of its coordinate; in
    degrees (a latitude or longitude by CF meaning or name, or ``units``
    ``degrees...``) it is converted with `KM_PER_DEGREE` (a degree of great
    circle, at any latitude: the reference's convention, where 1 degree is
    "111 km"); a projected coordinate with length units (``m``, ``km``) is
    converted with pint.  The result is the geometric mean of the two axes
    (the square root of a cell's nominal area), or the one axis that has a
    spacing.

    Returns
    -------
    float or None
        ``None`` when neither axis has two points or units that say what a
        step is (a projected axis without units).
    """
    if ydim is None or xdim is None:
        ydim, xdim = spatial_dims(obj)
    steps = []
    for dim in (ydim, xdim):
        if dim not in obj.coords or obj[dim].size < 2:
            continue
        coord = obj[dim]
        step = float(np.median(np.abs(np.diff(np.asarray(coord.values, np.float64)))))
        km = _step_km(coord, step)
        if km is not None and km > 0:
            steps.append(km)
    if not steps:
        return None
    return float(np.exp(np.mean(np.log(steps))))


def _step_km(coord: xr.DataArray, step: float) -> float | None:
    units = str(coord.attrs.get("units", "")).strip()
    if _cf_meaning(coord) is not None or units.lower().startswith("degree"):
        return step * KM_PER_DEGREE
    if not units:
        return None
    from .units import ureg

    try:
        return float(ureg.Quantity(step, units).to("km").magnitude)
    except Exception:  # not a length (an index, a time ...): no spacing in km
        return None


def match_grid(
    other: _XarrayT,
    ref: xr.DataArray | xr.Dataset,
    *,
    label: str = "truth",
    ref_label: str = "prediction",
) -> _XarrayT:
    """``other`` at ``ref``'s latitude / longitude values, matched by value.

    Matching by position would pair a field stored north to south with the
    wrong rows; by value it is reordered (or cut from a larger domain) instead.
    Longitudes are equal modulo 360: a field written -180..180 matches one
    written 0..360, across either seam.  Round-off up to a hundredth of the
    grid step is tolerated, and the result carries ``ref``'s exact coordinate
    values (in ``ref``'s convention); anything more means another grid.

    Raises
    ------
    ValueError
        Naming the dimension and the offset when the values do not match.
    """
    import pandas as pd

    ydim, xdim = spatial_dims(ref)
    for dim in (ydim, xdim):
        if dim not in other.dims:
            raise ValueError(
                f"the {label} has no dimension {dim!r} (has {tuple(map(str, other.dims))})"
            )
        raw = np.asarray(ref[dim].values, np.float64)
        have_raw = np.asarray(other[dim].values, np.float64)
        if raw.shape == have_raw.shape and np.array_equal(raw, have_raw):
            continue  # the same grid: nothing to reorder (no graph for Dask data)
        want, have = raw, have_raw
        circular = "longitude" in (_cf_meaning(ref[dim]), _cf_meaning(other[dim]))
        if circular:
            want, have = _same_turn(raw, have_raw)
        if circular:  # sorted, and a cyclic column (0 and 360 both there) kept once
            order = np.unique(have, return_index=True)[1]
        else:
            order = np.argsort(have, kind="stable")
        have = have[order]
        steps = np.abs(np.diff(want if want.size > 1 else have))
        tol = 0.01 * (steps.min() if steps.size else 1.0)
        nearest = have[pd.Index(have).get_indexer(want, method="nearest")]
        offset = float(np.abs(nearest - want).max())
        if offset > tol:
            raise ValueError(
                f"the {label}'s {dim!r} values are not the {ref_label}'s: offset by up to "
                f"{offset:.4g}{' (modulo 360)' if circular else ''} (tolerated: {tol:.2g}, a "
                f"hundredth of the grid step); regrid the {label} first"
            )
        attrs = dict(other[dim].attrs)
        other = (
            other.isel({dim: order})
            .assign_coords({dim: have})
            .reindex({dim: want}, method="nearest", tolerance=tol)
            .assign_coords({dim: xr.Variable(dim, ref[dim].values, attrs)})
        )
    return other


def _same_turn(want: np.ndarray, have: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Longitudes ``want`` and ``have`` written in one frame, so equal points are equal.

    Both go into the 360 degrees that start halfway across the gap ``want``
    leaves (its unwrapped run is contiguous there): any point of ``have``
    that is one of ``want``'s lies next to it.
    """
    run = unwrap_longitude(want)
    origin = float(run.min()) - 0.5 * (360.0 - float(run.max() - run.min()))
    return (want - origin) % 360.0 + origin, (have - origin) % 360.0 + origin
