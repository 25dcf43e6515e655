"""Static fields for training: time-invariant inputs on the coarse or the fine grid."""

from __future__ import annotations

import dataclasses

import numpy as np
import xarray as xr

from .. import fields, grid
from ..model.config import ReslimConfig

__all__ = ["static_inputs"]


def static_inputs(
    static: xr.Dataset | None, cds: xr.Dataset, config: ReslimConfig
) -> tuple[dict[str, xr.DataArray], dict[str, str], xr.Dataset | None, ReslimConfig]:
    """Static fields: (stored fields, their grids, input channels, extended config).

    Each data variable of ``static`` must be time-invariant and lie on the
    coarse grid of ``cds`` or on its fine grid (``config.factor`` times finer),
    told apart by grid spacing; a field larger than the domain is cut to it.
    Fields the config does not list become static inputs: a coarse field under
    its name, a fine field as ``factor²`` packed channels.
    """
    if static is None:
        return {}, {}, None, config
    ydim, xdim = grid.spatial_dims(cds)
    k = config.factor
    fine_ref = fields.fine_reference(cds, k)
    stored: dict[str, xr.DataArray] = {}
    packing: dict[str, str] = {}
    channels: dict[str, xr.DataArray] = {}
    for name in map(str, static.data_vars):
        var = static[name]
        sy, sx = grid.spatial_dims(var)
        extra = [d for d in var.dims if d not in (sy, sx)]
        if extra:
            raise ValueError(
                f"static field {name!r} has dims {extra} besides space: static fields are "
                "time-invariant 2-D fields"
            )
        kind = _grid_of(var, (sy, sx), cds, (ydim, xdim), k)
        what = f"static field {name!r}"
        on = fields.on_grid(var, fine_ref if kind == "fine" else cds, what)
        stored[name] = fields.plain(on.astype(np.float32), ydim, xdim)
        packing[name] = kind
        if kind == "fine":
            channels.update(fields.pack(on, k, name, cds))
        else:
            channels[name] = on.rename(name)
    new = [c for c in channels if c not in config.in_vars]
    if new:
        config = dataclasses.replace(
            config,
            in_vars=[*config.in_vars, *new],
            static_vars=[*config.static_vars, *new],
        )
    return stored, packing, xr.Dataset(channels), config


def _grid_of(var: xr.DataArray, dims, cds: xr.Dataset, cdims, factor: int) -> str:
    """``"fine"`` or ``"coarse"``: the grid whose spacing ``var``'s is nearer to."""
    for vd, cd in zip(dims, cdims, strict=True):
        v = np.asarray(var[vd].values, np.float64)
        c = np.asarray(cds[cd].values, np.float64)
        if v.size > 1 and c.size > 1:
            step = float(np.median(np.abs(np.diff(v))))
            coarse = float(np.median(np.abs(np.diff(c))))
            fine_off = abs(np.log(step / (coarse / factor)))
            return "fine" if fine_off < abs(np.log(step / coarse)) else "coarse"
    fine_shape = tuple(cds.sizes[d] * factor for d in cdims)
    return "fine" if tuple(var.sizes[d] for d in dims) == fine_shape else "coarse"
