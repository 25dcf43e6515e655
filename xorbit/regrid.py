"""Interpolation baselines onto the fine grid `.orbit.downscale` produces.

``nearest``, ``bilinear`` and ``bicubic`` (Keys' kernel, a = -0.75, as in OpenCV) use
``torch.nn.functional.interpolate``
(``align_corners=False``: each coarse value sits at its cell centre, which is
exactly how `xorbit.grid` splits cells), applied lazily per time block with
Dask; edges are handled by edge-value padding (``nearest``) or periodic padding
on a global longitude before interpolating, then cropped.  The result has the
same coordinates as ``.orbit.downscale``.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from . import grid

__all__ = ["METHODS", "interpolate", "upsample_array"]

METHODS = ("nearest", "bilinear", "bicubic")


def upsample_array(a: np.ndarray, factor: int, method: str, periodic: bool = False) -> np.ndarray:
    """``[..., ny, nx]`` → ``[..., ny k, nx k]`` by torch interpolation (NaN propagates)."""
    if method not in METHODS:
        raise ValueError(f"unknown interpolation method {method!r}; choose one of {METHODS}")
    lead = a.shape[:-2]
    ny, nx = a.shape[-2:]
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).reshape(-1, 1, ny, nx)
    pad = 2 if method != "nearest" else 0
    if pad:
        t = F.pad(t, (0, 0, pad, pad), mode="replicate")
        t = F.pad(t, (pad, pad, 0, 0), mode="circular" if periodic else "replicate")
    kw = {} if method == "nearest" else {"align_corners": False}
    up = F.interpolate(t, scale_factor=factor, mode=method, **kw)
    if pad:
        p = pad * factor
        up = up[..., p:-p, p:-p]
    return up.reshape(*lead, ny * factor, nx * factor).numpy().astype(a.dtype, copy=False)


def interpolate(
    obj: xr.DataArray | xr.Dataset,
    factor: int,
    method: str = "bicubic",
    periodic: bool | None = None,
) -> xr.DataArray | xr.Dataset:
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
    data = src.data
    if isinstance(data, da.Array):
        data = data.rechunk({-2: -1, -1: -1})
        up = data.map_blocks(
            upsample_array,
            factor,
            method,
            bool(periodic),
            chunks=(*data.chunks[:-2], (data.shape[-2] * factor,), (data.shape[-1] * factor,)),
            dtype=data.dtype,
        )
    else:
        up = upsample_array(np.asarray(data), factor, method, bool(periodic))
    coords = {
        n: c for n, c in grid.fine_grid(src, factor, ydim, xdim).items() if "bnds" not in c.dims
    }
    for name in (ydim, xdim):
        coords[name] = coords[name].copy()
        coords[name].attrs.pop("bounds", None)
    return xr.DataArray(up, dims=dims, coords=coords, attrs=dict(obj.attrs), name=obj.name)
