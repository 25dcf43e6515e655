"""Interpolation baselines onto the fine grid `.orbit.downscale` produces.

``nearest``, ``bilinear`` and ``bicubic`` (Keys' cubic convolution, a = -0.75,
as in OpenCV and torch) are separable: each output row / column is a weighted
sum of 1, 2 or 4 source rows / columns, with indices and weights computed once
per axis, in float64 with numpy (no torch: interpolation must not need a deep
learning stack).  Source positions follow ``align_corners=False``: each coarse
value sits at its cell centre, which is exactly how `xorbit.grid` splits cells.
Beyond an edge the edge value is repeated; a global longitude wraps around.
NaN spreads over every output whose stencil touches it.  Applied lazily per
time block with Dask; the result has the same coordinates as
``.orbit.downscale``.
"""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import xarray as xr

from . import grid
from .grid import _XarrayT

__all__ = [
    "METHODS",
    "RegridFallbackWarning",
    "conservative_weights",
    "interpolate",
    "regrid",
    "upsample_array",
    "xesmf_available",
]

METHODS = ("nearest", "bilinear", "bicubic", "conservative")
_KERNELS = ("nearest", "bilinear", "bicubic")
_CUBIC_A = -0.75  # Keys' parameter as in OpenCV and torch (Catmull-Rom would be -0.5)


class RegridFallbackWarning(UserWarning):
    """xESMF could not be imported; xarray-regrid computed the result instead."""


def _import_xesmf():
    """``(xesmf, None)``, or ``(None, why)`` when it cannot be imported."""
    try:
        import xesmf
    except Exception as err:  # ImportError, or ESMF failing to load its library
        return None, f"{type(err).__name__}: {err}"
    return xesmf, None


def xesmf_available() -> bool:
    """Whether xESMF (and so ESMF) can be imported here."""
    return _import_xesmf()[0] is not None


def _overlap(src: np.ndarray, dst: np.ndarray, period: float | None = None) -> np.ndarray:
    """Overlap lengths ``[n_dst, n_src]`` of 1-D intervals (``[n, 2]`` bounds)."""
    s_lo, s_hi = np.sort(src, axis=1).T
    d_lo, d_hi = np.sort(dst, axis=1).T
    shifts = (0.0,) if period is None else (-period, 0.0, period)
    out = np.zeros((len(d_lo), len(s_lo)))
    for sh in shifts:
        lo = np.maximum(d_lo[:, None], s_lo[None, :] + sh)
        hi = np.minimum(d_hi[:, None], s_hi[None, :] + sh)
        out += np.clip(hi - lo, 0, None)
    return out


def conservative_weights(
    src_lat_bnds: np.ndarray,
    src_lon_bnds: np.ndarray,
    dst_lat_bnds: np.ndarray,
    dst_lon_bnds: np.ndarray,
    periodic: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Separable first-order conservative weights between rectilinear lat-lon grids.

    Cell areas on the sphere are exact: ``Δλ · Δ(sin φ)``.  Returns ``(w_lat
    [n_dst_lat, n_src_lat], w_lon [n_dst_lon, n_src_lon])``, each row the share
    of a destination cell covered by each source cell; ``w_lat @ f @ w_lon.T``
    regrids ``f``, and the area-weighted mean over the covered region is kept.
    """
    sin = np.sin(np.deg2rad(np.clip(src_lat_bnds, -90, 90)))
    dsin = np.sin(np.deg2rad(np.clip(dst_lat_bnds, -90, 90)))
    w_lat = _overlap(sin, dsin)
    w_lon = _overlap(src_lon_bnds, dst_lon_bnds, 360.0 if periodic else None)
    for w, name in ((w_lat, "latitude"), (w_lon, "longitude")):
        covered = w.sum(axis=1)
        if (covered <= 0).any():
            raise ValueError(
                f"conservative regridding: {int((covered <= 0).sum())} destination cells lie "
                f"outside the source grid along {name}"
            )
        w /= covered[:, None]
    return w_lat, w_lon


def _apply_separable(a: np.ndarray, w_lat: np.ndarray, w_lon: np.ndarray) -> np.ndarray:
    """``w_lat @ a @ w_lon.T`` over the last two axes, renormalized around NaN."""
    valid = np.isfinite(a)
    filled = np.where(valid, a, 0.0)
    num = np.einsum("ij,...jk,lk->...il", w_lat, filled, w_lon)
    den = np.einsum("ij,...jk,lk->...il", w_lat, valid.astype(float), w_lon)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _keys(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel at distances ``0 <= x <= 2``."""
    a = _CUBIC_A
    inner = ((a + 2) * x - (a + 3)) * x * x + 1
    outer = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, inner, outer)


def _taps(n: int, factor: int, method: str, periodic: bool) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear or bicubic source indices and weights ``[taps, n * factor]`` along ``n``.

    Output ``j`` sits at source position ``(j + 0.5) / factor - 0.5``
    (``align_corners=False``).  Indices past an edge are clamped (the edge value
    repeats) or, on a periodic axis, wrapped.
    """
    src = (np.arange(n * factor) + 0.5) / factor - 0.5
    i0 = np.floor(src).astype(np.int64)
    t = src - i0
    if method == "bilinear":
        offsets, weights = np.arange(2), np.stack([1 - t, t])
    else:
        offsets = np.arange(-1, 3)
        weights = np.stack([_keys(t + 1), _keys(t), _keys(1 - t), _keys(2 - t)])
    idx = i0[None] + offsets[:, None]
    return (idx % n if periodic else np.clip(idx, 0, n - 1)), weights


def _along(a: np.ndarray, axis: int, idx: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``sum_t weights[t] * a[idx[t]]`` along ``axis`` (a NaN anywhere in the stencil stays)."""
    shape = [1] * a.ndim
    shape[axis] = -1
    out = np.take(a, idx[0], axis=axis) * weights[0].reshape(shape)
    for i, w in zip(idx[1:], weights[1:], strict=True):
        out += np.take(a, i, axis=axis) * w.reshape(shape)
    return out


def upsample_array(a: np.ndarray, factor: int, method: str, periodic: bool = False) -> np.ndarray:
    """``[..., ny, nx]`` → ``[..., ny k, nx k]``, along y then x (NaN propagates).

    ``periodic`` wraps the last axis (longitude); latitude always repeats its
    edge values.  Computed in float64, returned in ``a``'s dtype.
    """
    if method not in _KERNELS:
        raise ValueError(f"unknown interpolation method {method!r}; choose one of {_KERNELS}")
    if method == "nearest":  # a copy per cell: no arithmetic, so no float64 round trip
        return np.repeat(np.repeat(np.asarray(a), factor, axis=-2), factor, axis=-1)
    ny, nx = a.shape[-2:]
    x = np.asarray(a, dtype=np.float64)
    x = _along(x, -2, *_taps(ny, factor, method, False))
    x = _along(x, -1, *_taps(nx, factor, method, bool(periodic)))
    return x.astype(a.dtype, copy=False)


def _apply_spatial(data, shape_out, dtype, func, *args):
    """``func(block, *args)`` over whole ``(y, x)`` planes; lazy on Dask input."""
    if isinstance(data, da.Array):
        data = data.rechunk({-2: -1, -1: -1})
        chunks = (*data.chunks[:-2], (shape_out[0],), (shape_out[1],))
        return data.map_blocks(func, *args, chunks=chunks, dtype=dtype)
    return func(np.asarray(data, dtype=np.result_type(data.dtype, dtype)), *args)


def interpolate(
    obj: _XarrayT,
    factor: int,
    method: str = "bicubic",
    periodic: bool | None = None,
) -> _XarrayT:
    """Interpolate every spatial variable ``factor`` times finer (lazy on Dask input).

    Parameters
    ----------
    obj
        Coarse fields.
    factor
        Refinement factor.
    method
        ``"nearest"``, ``"bilinear"`` or ``"bicubic"``.
    periodic
        Whether longitude wraps around; detected from the grid by default.
    """
    if method not in METHODS:
        raise ValueError(f"unknown interpolation method {method!r}; choose one of {METHODS}")
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    factor = int(factor)
    if isinstance(obj, xr.Dataset):
        ydim, xdim = grid.spatial_dims(obj)
        out = {}
        for name, var in obj.data_vars.items():
            if ydim in var.dims and xdim in var.dims:
                out[name] = interpolate(var, factor, method, periodic)
            elif ydim not in var.dims and xdim not in var.dims:
                out[name] = var
        coords = grid.fine_grid(obj, factor, ydim, xdim)
        return xr.Dataset(out, attrs=dict(obj.attrs)).assign_coords(coords)
    ydim, xdim = grid.spatial_dims(obj)
    if periodic is None:
        periodic = grid.is_global_longitude(obj[xdim], obj)
    dims = [d for d in obj.dims if d not in (ydim, xdim)] + [ydim, xdim]
    src = obj.transpose(*dims)
    if method == "conservative":
        fine = grid.fine_grid(src, factor, ydim, xdim)
        target = xr.Dataset(coords=fine)
        return regrid(obj, target, "conservative", periodic=periodic)
    ny, nx = src.shape[-2:]
    up = _apply_spatial(
        src.data,
        (ny * factor, nx * factor),
        src.dtype,
        upsample_array,
        factor,
        method,
        bool(periodic),
    )
    coords = {
        n: c for n, c in grid.fine_grid(src, factor, ydim, xdim).items() if "bnds" not in c.dims
    }
    for name in (ydim, xdim):
        coords[name] = coords[name].copy()
        coords[name].attrs.pop("bounds", None)
    return xr.DataArray(up, dims=dims, coords=coords, attrs=dict(obj.attrs), name=obj.name)


def regrid(
    obj: xr.DataArray,
    target: xr.Dataset | xr.DataArray,
    method: str = "conservative",
    periodic: bool | None = None,
) -> xr.DataArray:
    """Regrid a field (e.g. orography) onto another rectilinear lat-lon grid.

    ``"conservative"`` uses exact spherical cell areas (`conservative_weights`)
    and keeps the area-weighted mean; ``"bilinear"`` and ``"nearest"`` use
    xESMF when it can be imported, else ``xarray-regrid`` with a
    `RegridFallbackWarning` that gives the import error.

    Parameters
    ----------
    obj
        Source field with latitude / longitude dims (bounds used when present).
    target
        Anything carrying the destination latitude / longitude coordinates.
    """
    ydim, xdim = grid.spatial_dims(obj)
    ty, tx = grid.spatial_dims(target)
    if periodic is None:
        periodic = grid.is_global_longitude(obj[xdim], obj)
    if method == "conservative":
        w_lat, w_lon = conservative_weights(
            grid.cell_bounds(obj[ydim], obj),
            grid.cell_bounds(obj[xdim], obj),
            grid.cell_bounds(target[ty], target),
            grid.cell_bounds(target[tx], target),
            periodic=bool(periodic),
        )
        dims = [d for d in obj.dims if d not in (ydim, xdim)] + [ydim, xdim]
        src = obj.transpose(*dims)
        out = _apply_spatial(
            src.data, (len(w_lat), len(w_lon)), np.float64, _apply_separable, w_lat, w_lon
        )
        coords = {n: c for n, c in src.coords.items() if ydim not in c.dims and xdim not in c.dims}
        coords[ydim] = target[ty].rename({ty: ydim}) if ty != ydim else target[ty]
        coords[xdim] = target[tx].rename({tx: xdim}) if tx != xdim else target[tx]
        for name in (ydim, xdim):  # a DataArray cannot carry the bounds themselves
            coords[name] = coords[name].copy()
            coords[name].attrs.pop("bounds", None)
        result = xr.DataArray(out, dims=dims, coords=coords, attrs=dict(obj.attrs), name=obj.name)
        return result.astype(obj.dtype) if np.issubdtype(obj.dtype, np.floating) else result
    if method not in ("bilinear", "nearest"):
        raise ValueError(
            f"regrid: unknown method {method!r}; choose 'conservative', 'bilinear' or 'nearest'"
        )
    tgt = target if isinstance(target, xr.Dataset) else target.to_dataset(name="_target")
    xesmf, why = _import_xesmf()
    if xesmf is not None:
        regridder = xesmf.Regridder(
            obj, tgt, "bilinear" if method == "bilinear" else "nearest_s2d", periodic=periodic
        )
        return regridder(obj, keep_attrs=True)
    # the two libraries differ near edges and poles: say which one answered, and why
    warnings.warn(
        f"regrid {method!r}: xESMF cannot be imported ({why}); using xarray-regrid instead",
        RegridFallbackWarning,
        stacklevel=2,
    )
    import xarray_regrid  # noqa: F401  (registers .regrid)

    out = obj.regrid.linear(tgt) if method == "bilinear" else obj.regrid.nearest(tgt)
    return out.assign_attrs(obj.attrs)
