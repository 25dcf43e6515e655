"""Per-pixel fields a `Downscaler` carries: training climatologies and static inputs.

xarray and numpy only.  A field is a 2-D ``(y, x)`` DataArray with its
coordinates.  Three operations:

- `climatology`: the time mean of a training variable, per pixel;
- `on_grid`: a stored field at another object's coordinates, matched by value,
  with an error naming the model's domain when the object lies outside it;
- `pack`: a fine-grid field as ``factor²`` coarse channels (space-to-depth), so
  that a fine static field (orography at the target resolution) enters the
  model as coarse input channels.

`encode` / `decode` turn a field into JSON-safe text (zlib-compressed float32,
coordinates kept) for the `Downscaler`'s file.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import xarray as xr

from . import grid

__all__ = [
    "climatology",
    "decode",
    "encode",
    "fine_reference",
    "on_grid",
    "pack",
    "packed_names",
    "plain",
]


def climatology(var: xr.DataArray, time_dim: Hashable, index: Sequence[int]) -> xr.DataArray:
    """Per-pixel mean of ``var`` over the time steps ``index`` (NaN skipped), computed.

    A variable without ``time_dim`` is its own climatology.
    """
    ydim, xdim = grid.spatial_dims(var)
    if time_dim in var.dims:
        steps = np.asarray(index)
        if not np.array_equal(steps, np.arange(var.sizes[time_dim])):
            var = var.isel({time_dim: steps})
        var = var.mean([time_dim], skipna=True)
    extra = [d for d in var.dims if d not in (ydim, xdim)]
    if extra:
        raise ValueError(
            f"variable {var.name!r} has dims {extra} besides time and space; select them first"
        )
    out = var.transpose(ydim, xdim).astype(np.float32).compute()
    return plain(out, ydim, xdim)


def plain(field: xr.DataArray, ydim: Hashable, xdim: Hashable) -> xr.DataArray:
    """Only the two spatial coordinates, no attributes, no name."""
    return xr.DataArray(
        np.asarray(field.values),
        dims=(ydim, xdim),
        coords={ydim: np.asarray(field[ydim].values), xdim: np.asarray(field[xdim].values)},
    )


def on_grid(field: xr.DataArray, like: xr.DataArray | xr.Dataset, what: str) -> xr.DataArray:
    """``field`` at the spatial coordinates of ``like``, matched by value.

    The field's spatial dims are renamed to ``like``'s first, so a model trained
    on ``lat`` / ``lon`` serves data named ``latitude`` / ``longitude``.

    Raises
    ------
    ValueError
        Naming ``what``, the dimension and the offset when ``like`` reaches
        outside the field's domain or lies on another grid.
    """
    fy, fx = grid.spatial_dims(field)
    ly, lx = grid.spatial_dims(like)
    field = field.rename({fy: ly, fx: lx}) if (fy, fx) != (ly, lx) else field
    ref = xr.Dataset(coords={ly: like[ly].variable, lx: like[lx].variable})
    try:
        return grid.match_grid(field, ref, label=what, ref_label="data")
    except ValueError as err:
        spans = {
            d: (
                float(field[d].min()),
                float(field[d].max()),
                float(like[d].min()),
                float(like[d].max()),
            )
            for d in (ly, lx)
        }
        where = "; ".join(
            f"{d}: model {a:.4g}..{b:.4g}, data {c:.4g}..{e:.4g}"
            for d, (a, b, c, e) in spans.items()
        )
        raise ValueError(
            f"{err}. The {what} covers only the model's training domain ({where}): "
            "downscale inside it, or pass static=... for this domain"
        ) from None


def fine_reference(coarse: xr.DataArray | xr.Dataset, factor: int) -> xr.Dataset:
    """The fine grid of ``coarse`` (refined ``factor`` times) as a coordinates-only Dataset."""
    ydim, xdim = grid.spatial_dims(coarse)
    refined = grid.fine_grid(coarse, factor, ydim, xdim)
    return xr.Dataset(coords={d: refined[d].variable for d in (ydim, xdim)})


def packed_names(name: str, factor: int) -> list[str]:
    """The channel names `pack` gives a fine field: ``name[i,j]`` row-major over the block."""
    return [f"{name}[{i},{j}]" for i in range(factor) for j in range(factor)]


def pack(
    field: xr.DataArray, factor: int, name: str, like: xr.DataArray | xr.Dataset
) -> dict[str, xr.DataArray]:
    """A fine ``(Y k, X k)`` field as ``k²`` coarse fields on ``like``'s grid (space-to-depth).

    Channel ``name[i,j]`` holds, for each coarse cell, the fine pixel at row
    ``i`` and column ``j`` of its block, in the order of ``like``'s coordinates.
    ``field`` must already be on the fine grid of ``like`` (`on_grid` with the
    coarse grid refined by `xorbit.grid.fine_grid`).
    """
    k = int(factor)
    ydim, xdim = grid.spatial_dims(like)
    ny, nx = like.sizes[ydim], like.sizes[xdim]
    values = np.asarray(field.transpose(ydim, xdim).values, np.float32)
    if values.shape != (ny * k, nx * k):
        raise ValueError(
            f"static field {name!r} is {values.shape[0]} x {values.shape[1]}, not the fine grid "
            f"{ny * k} x {nx * k} of the data"
        )
    blocks = values.reshape(ny, k, nx, k)
    coords = {ydim: like[ydim].values, xdim: like[xdim].values}
    return {
        channel: xr.DataArray(blocks[:, i, :, j], dims=(ydim, xdim), coords=coords, name=channel)
        for channel, (i, j) in zip(
            packed_names(name, k), [(i, j) for i in range(k) for j in range(k)], strict=True
        )
    }


def encode(field: xr.DataArray) -> dict[str, Any]:
    """JSON-safe form of a 2-D field: dims, coordinates, zlib-compressed float32 values."""
    ydim, xdim = field.dims
    values = np.ascontiguousarray(np.asarray(field.values, np.float32))
    return {
        "dims": [str(ydim), str(xdim)],
        "coords": {str(d): np.asarray(field[d].values, np.float64).tolist() for d in (ydim, xdim)},
        "shape": list(values.shape),
        "data": base64.b64encode(zlib.compress(values.tobytes(), 6)).decode("ascii"),
    }


def decode(d: dict[str, Any]) -> xr.DataArray:
    """Inverse of `encode`."""
    raw = zlib.decompress(base64.b64decode(d["data"]))
    values = np.frombuffer(raw, np.float32).reshape(d["shape"]).copy()
    ydim, xdim = d["dims"]
    return xr.DataArray(
        values,
        dims=(ydim, xdim),
        coords={ydim: np.asarray(d["coords"][ydim]), xdim: np.asarray(d["coords"][xdim])},
    )
