"""CF-compliant netCDF and zarr output, written atomically.

`prepare` turns a downscaled object into a Dataset that CF checkers accept:
``Conventions``, ``title``, ``history``, ``source``; latitude / longitude with
``standard_name``, ``units``, ``axis`` and ``bounds``; no ``_FillValue`` on
coordinates; attribute names that netCDF allows.  `to_netcdf` writes it through
a temporary file in the same directory and renames it into place, so a crash
never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from . import grid
from ._version import __version__

__all__ = ["CONVENTIONS", "bitround", "prepare", "to_netcdf"]

CONVENTIONS = "CF-1.10"
_VALID_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def _clean_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attribute names netCDF / CF accept: invalid characters become ``_``."""
    out = {}
    for key, value in attrs.items():
        name = key if _VALID_NAME.match(key) else re.sub(r"[^A-Za-z0-9_]", "_", key)
        if not name[:1].isalpha():
            name = "attr_" + name
        if value is None:
            continue
        out[name] = value
    return out


def bitround(a: np.ndarray, keepbits: int) -> np.ndarray:
    """Round float32 mantissas to ``keepbits`` bits (round to nearest, ties to even).

    The relative error is at most ``2 ** -(keepbits + 1)``; the zeroed trailing
    bits compress well.  NaN and infinities are kept.
    """
    if not 0 <= keepbits <= 23:
        raise ValueError(f"keepbits must be between 0 and 23 for float32, got {keepbits}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if keepbits == 23:
        return a
    bits = a.view(np.uint32)
    drop = 23 - keepbits
    half = np.uint32((1 << (drop - 1)) - 1)
    lsb = (bits >> np.uint32(drop)) & np.uint32(1)
    mask = np.uint32((0xFFFFFFFF << drop) & 0xFFFFFFFF)
    rounded = ((bits + half + lsb) & mask).view(np.float32)
    return np.where(np.isfinite(a), rounded, a)


def prepare(
    obj: xr.DataArray | xr.Dataset,
    *,
    title: str | None = None,
    source: str | None = None,
    references: str | None = None,
    keepbits: int | None = None,
) -> xr.Dataset:
    """A CF-ready copy of ``obj`` (lazy data stay lazy)."""
    ds = obj.to_dataset(name=obj.name or "data") if isinstance(obj, xr.DataArray) else obj.copy()
    ydim, xdim = grid.spatial_dims(ds)
    for dim, (sn, units, axis) in (
        (ydim, ("latitude", "degrees_north", "Y")),
        (xdim, ("longitude", "degrees_east", "X")),
    ):
        coord = ds[dim]
        attrs = _clean_attrs({k: v for k, v in coord.attrs.items() if k != "_FillValue"})
        attrs.setdefault("standard_name", sn)
        attrs.setdefault("units", units)
        attrs.setdefault("axis", axis)
        bname = attrs.get("bounds") or f"{dim}_bnds"
        if bname not in ds.variables:
            bounds = grid.cell_bounds(coord)
            ds = ds.assign_coords({bname: ((dim, "bnds"), bounds)})
        attrs["bounds"] = bname
        ds[dim].attrs = attrs
        ds[bname].attrs = {}
    for name in list(ds.variables):
        ds[name].attrs = _clean_attrs(dict(ds[name].attrs))
        ds[name].encoding.pop("_FillValue", None)
    for name, var in ds.data_vars.items():
        if keepbits is not None and np.issubdtype(var.dtype, np.floating):
            data = var.data
            if isinstance(data, da.Array):
                data = data.astype(np.float32).map_blocks(bitround, keepbits, dtype=np.float32)
            else:
                data = bitround(np.asarray(data), keepbits)
            ds[name] = var.copy(data=data)
            ds[name].attrs["xorbit_keepbits"] = int(keepbits)
            ds[name].attrs["comment"] = (
                f"mantissa rounded to {keepbits} bits (relative error <= 2**-{keepbits + 1})"
            )
    attrs = _clean_attrs(dict(ds.attrs))
    attrs["Conventions"] = CONVENTIONS
    attrs["title"] = title or attrs.get("title") or "Downscaled fields (xorbit)"
    attrs["source"] = source or attrs.get("source") or f"xorbit {__version__} (ORBIT-2 Reslim)"
    if references or "references" not in attrs:
        attrs["references"] = references or "ORBIT-2, arXiv:2505.04802"
    history = [h for v in ds.data_vars.values() for h in [v.attrs.get("history")] if h]
    if history and "history" not in attrs:
        attrs["history"] = history[0]
    ds.attrs = attrs
    return ds


def _encoding(ds: xr.Dataset, complevel: int) -> dict[str, dict[str, Any]]:
    enc: dict[str, dict[str, Any]] = {}
    for name, var in ds.variables.items():
        if name in ds.coords:
            enc[name] = {"_FillValue": None}
            continue
        e: dict[str, Any] = {"zlib": True, "complevel": complevel, "shuffle": True}
        if isinstance(var.data, da.Array):
            e["chunksizes"] = tuple(max(c) for c in var.data.chunks)
        if np.issubdtype(var.dtype, np.floating):
            e["_FillValue"] = np.array(np.nan, dtype=var.dtype)
        enc[name] = e
    return enc


def to_netcdf(
    obj: xr.DataArray | xr.Dataset,
    path: str | os.PathLike,
    *,
    complevel: int = 4,
    keepbits: int | None = None,
    **cf: Any,
) -> Path:
    """Write a CF-compliant, compressed netCDF4 file atomically; returns its path.

    Parameters
    ----------
    complevel
        zlib level (lossless).
    keepbits
        If given, round float mantissas to this many bits first (lossy; recorded
        in the variable's attrs).
    **cf
        ``title``, ``source``, ``references`` for the global attributes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = prepare(obj, keepbits=keepbits, **cf)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4", encoding=_encoding(ds, complevel))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
