"""The ``.orbit`` accessor: the one place where xarray, Dask and the numerics meet.

``coarse.orbit.downscale(downscaler)`` maps labelled, chunked coarse fields onto
the TILES engine and hands back a lazy object on the fine grid:

1. find the model's inputs by name, then by CF ``standard_name``; stack them
   as channels ``[..., C, y, x]``, normalized, NaN filled with the mean;
2. rechunk ``y, x`` along tile boundaries (`xorbit.tiles.block_chunks`);
3. stage 1: overlap each block by the tile halo (``periodic`` on a global
   longitude, ``nearest`` elsewhere) and compute its weighted partial
   (`xorbit.engine.predict_block`), each tile exactly once;
4. stage 2: one task per output block adds the ``halo * factor`` strips its
   (up to 3 x 3) neighbouring partials spill into its core;
5. denormalize, mask where the coarse input was NaN, and label on the fine grid.

Nothing is computed until the caller asks.  Working memory is bounded by the
chunk size; the task graph itself (~100 tasks per output chunk) adds about
14 MB per GiB of output computed in one call (docs/benchmarks.md).
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from . import grid
from ._version import __version__
from .downscaler import Downscaler
from .engine import ModelHandle, default_device, predict_block
from .tiles import TilePlan, block_chunks
from .units import to_model_units
from .variables import COORDINATE_FIELDS, as_dataset, coordinate_fields, find_variable

__all__ = ["OrbitDataArrayAccessor", "OrbitDatasetAccessor", "downscale"]


# --------------------------------------------------------------------------- inputs
def _find_inputs(
    obj: xr.Dataset, needed: Sequence[str], static: xr.Dataset | None
) -> dict[str, xr.DataArray]:
    """Model variable name → data variable, by name and then by standard_name."""
    sources = [obj] + ([static] if static is not None else [])
    found: dict[str, xr.DataArray] = {}
    for name in needed:
        for src in sources:
            var = find_variable(src, name)
            if var is not None:
                found[name] = var
                break
    coords = [v for v in needed if v not in found and v in COORDINATE_FIELDS]
    if coords:
        ydim, xdim = grid.spatial_dims(obj)
        found.update(coordinate_fields(obj, coords, ydim, xdim))
    missing = [v for v in needed if v not in found]
    if missing:
        avail = sorted(map(str, obj.data_vars)) + (
            sorted(map(str, static.data_vars)) if static is not None else []
        )
        raise KeyError(
            f"the model needs input variables {missing}, found neither by name nor by "
            f"standard_name among {avail}; rename them, or pass static fields as static=..."
        )
    return found


# --------------------------------------------------------------------------- downscale
def downscale(
    obj: xr.DataArray | xr.Dataset,
    downscaler: Downscaler,
    *,
    tile: int | Sequence[int] | None = None,
    halo: int | Sequence[int] | None = None,
    batch_size: int = 16,
    device: str | None = None,
    static: xr.Dataset | None = None,
    periodic: bool | None = None,
    units: Mapping[str, str] | None = None,
) -> xr.DataArray | xr.Dataset:
    """Downscale coarse fields with a `Downscaler` (see `OrbitDataArrayAccessor.downscale`)."""
    if not isinstance(downscaler, Downscaler):
        raise TypeError(
            f"downscale expects an xorbit.Downscaler, got {type(downscaler).__name__}; "
            "load one with xorbit.load(path)"
        )
    cfg = downscaler.config
    k = cfg.factor
    device = device or default_device()
    as_array = isinstance(obj, xr.DataArray)
    ds = as_dataset(obj, cfg.in_vars)
    inputs = _find_inputs(ds, cfg.in_vars, static)
    main = [inputs[v] for v in cfg.out_vars]
    ydim, xdim = grid.spatial_dims(main[0])
    for name, var in inputs.items():
        if ydim not in var.dims or xdim not in var.dims:
            raise ValueError(
                f"input variable {name!r} has dims {var.dims}; it needs both spatial dims "
                f"({ydim!r}, {xdim!r})"
            )
    inputs = to_model_units(inputs, downscaler.units, units)

    # lead dims: the union of the non-spatial dims of the inputs, in order
    lead: list[Hashable] = []
    for var in inputs.values():
        lead += [d for d in var.dims if d not in (ydim, xdim, *lead)]
    arrays = [
        a.transpose(*lead, ydim, xdim)
        for a in xr.broadcast(*(inputs[name] for name in cfg.in_vars))
    ]
    data = [a.data if isinstance(a.data, da.Array) else da.asarray(a.data) for a in arrays]
    lazy_input = any(isinstance(a.data, da.Array) for a in arrays)
    ny, nx = arrays[0].shape[-2:]

    if periodic is None:
        periodic = grid.is_global_longitude(arrays[0][xdim], ds)
    if ny < 1 or nx < 1:
        raise ValueError(f"cannot downscale an empty grid of shape ({ny}, {nx})")
    tile, halo = _tile_defaults(downscaler, tile, halo)
    plan = TilePlan.build((ny, nx), tile, halo, k, periodic=(False, bool(periodic)))

    # stack channels, normalize, fill NaN with the mean (0 after normalizing)
    raw = da.stack(data, axis=-3).astype(np.float32)
    lead_chunks = raw.chunks[: len(lead)]
    ychunks = block_chunks(plan.y, raw.chunks[-2][0])
    xchunks = block_chunks(plan.x, raw.chunks[-1][0])
    raw = raw.rechunk((*lead_chunks, len(cfg.in_vars), ychunks, xchunks))
    mean, std = downscaler._stats(cfg.in_vars, raw.ndim, -3)
    x = (raw - mean) / std
    x = da.where(da.isnan(x), np.float32(0), x)

    weights_sha256 = downscaler.weights_sha256  # hashed once per call
    out = _tiled(x, downscaler, weights_sha256, plan, ychunks, xchunks, batch_size, device)
    # denormalize with plain arrays: a bound method would pickle the model per task
    out_mean, out_std = downscaler._stats(cfg.out_vars, out.ndim, -3)
    out = out * out_std + out_mean
    nonneg = [i for i, v in enumerate(cfg.out_vars) if v in downscaler.nonnegative]
    if nonneg:
        floor = np.full(out_mean.shape, -np.inf, np.float32)
        floor[..., nonneg, :, :] = 0
        out = da.maximum(out, floor)
    # fine pixels whose coarse parent was NaN stay NaN
    out_idx = [cfg.in_vars.index(v) for v in cfg.out_vars]
    nan_coarse = da.isnan(raw[..., out_idx, :, :])
    nan_fine = nan_coarse.map_blocks(
        _repeat2, k, chunks=out.chunks, dtype=bool, meta=np.array((), bool)
    )
    out = da.where(nan_fine, np.float32(np.nan), out)

    fine_coords = grid.fine_grid(arrays[cfg.in_vars.index(cfg.out_vars[0])], k, ydim, xdim)
    # a DataArray cannot hold (dim, bnds) coordinates: bounds go with Datasets,
    # and writers recompute them for a DataArray from its regular fine grid
    bounds = {n: c for n, c in fine_coords.items() if "bnds" in c.dims}
    array_coords = {n: c for n, c in fine_coords.items() if n not in bounds}
    for name in (ydim, xdim):
        coord = array_coords[name].copy()
        coord.attrs.pop("bounds", None)
        array_coords[name] = coord
    results = {}
    for i, name in enumerate(cfg.out_vars):
        src = inputs[name]
        attrs = {**src.attrs, **downscaler.attrs.get(name, {})}
        attrs["history"] = _history(src.attrs.get("history"), downscaler, weights_sha256)
        result = xr.DataArray(
            out[..., i, :, :],
            dims=(*lead, ydim, xdim),
            coords=array_coords,
            attrs=attrs,
            name=src.name if as_array else name,
        )
        results[name] = result if lazy_input else result.compute()
    if as_array:
        return next(iter(results.values()))
    keep = {v: ds[v] for v in ds.data_vars if ydim not in ds[v].dims and xdim not in ds[v].dims}
    out_ds = xr.Dataset({**keep, **results}, attrs=dict(ds.attrs))
    out_ds = out_ds.assign_coords(bounds).assign_coords({n: fine_coords[n] for n in (ydim, xdim)})
    out_ds.attrs["history"] = _history(ds.attrs.get("history"), downscaler, weights_sha256)
    return out_ds


def _tile_defaults(dsr: Downscaler, tile, halo) -> tuple[tuple[int, int], tuple[int, int]]:
    """Default: windows of the training size, halo an eighth of it (at least 1)."""
    img = dsr.config.img_size
    if halo is None:
        halo = tuple(max(1, s // 8) for s in img)
    halo = (halo, halo) if np.isscalar(halo) else tuple(halo)
    if tile is None:
        tile = tuple(max(1, s - 2 * h) for s, h in zip(img, halo, strict=True))
    tile = (tile, tile) if np.isscalar(tile) else tuple(tile)
    for name, val in (("tile", tile), ("halo", halo)):
        if len(val) != 2 or any(int(v) != v for v in val):
            raise ValueError(f"{name} must be an int or a pair of ints, got {val!r}")
    if min(tile) < 1 or min(halo) < 0:
        raise ValueError(f"tile must be >= 1 and halo >= 0, got tile={tile}, halo={halo}")
    return tuple(int(t) for t in tile), tuple(int(h) for h in halo)


def _tiled(
    x: da.Array,
    dsr: Downscaler,
    weights_sha256: str,
    plan: TilePlan,
    ychunks: tuple[int, ...],
    xchunks: tuple[int, ...],
    batch_size: int,
    device: str,
) -> da.Array:
    """Stages 1 and 2: per-block weighted partials, then the fold of neighbours."""
    k = plan.factor
    hy, hx = plan.halo
    n_lead = x.ndim - 3
    n_out = len(dsr.out_vars)
    ax_y, ax_x = x.ndim - 2, x.ndim - 1
    x_boundary = "periodic" if plan.x.periodic else "nearest"
    ext = da.overlap.overlap(
        x, depth={ax_y: hy, ax_x: hx}, boundary={ax_y: "nearest", ax_x: x_boundary}
    )
    handle = ModelHandle(dsr.model, weights_sha256)
    handle_node = dask.delayed(handle, pure=True, name=f"xorbit-model-{handle.key[:16]}")
    partial = ext.map_blocks(
        _stage1,
        handle_node,
        plan=plan,
        ychunks=tuple(int(c) for c in ychunks),
        xchunks=tuple(int(c) for c in xchunks),
        variables=list(dsr.in_vars),
        batch_size=int(batch_size),
        device=str(device),
        chunks=(
            *x.chunks[:n_lead],
            (n_out,),
            tuple((c + 2 * hy) * k for c in ychunks),
            tuple((c + 2 * hx) * k for c in xchunks),
        ),
        dtype=np.float32,
        meta=np.array((), np.float32),
        name="xorbit-tiles",
    )
    return _fold_neighbours(
        partial,
        (hy * k, hx * k),
        periodic_x=plan.x.periodic,
        chunks=(
            *x.chunks[:n_lead],
            (n_out,),
            tuple(c * k for c in ychunks),
            tuple(c * k for c in xchunks),
        ),
    )


def _fold_neighbours(
    partial: da.Array, depth: tuple[int, int], periodic_x: bool, chunks: tuple
) -> da.Array:
    """Stage 2 as one task per output block, reading its (up to) 3 x 3 neighbours.

    Equivalent to ``overlap(partial, depth)`` + `xorbit.tiles.fold`, which makes
    dozens of slicing and concatenation tasks per block; holding that graph was
    the main memory cost of streaming large outputs.
    """
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    name = "xorbit-fold-" + tokenize(partial, depth, periodic_x)
    ny, nx = partial.numblocks[-2], partial.numblocks[-1]
    lead_blocks = [range(n) for n in partial.numblocks[:-2]]
    dsk = {}
    for idx in itertools.product(*lead_blocks):
        for iy in range(ny):
            for ix in range(nx):
                grid_keys = []
                for dy in (-1, 0, 1):
                    row = []
                    for dx in (-1, 0, 1):
                        jy, jx = iy + dy, ix + dx
                        if periodic_x:
                            jx %= nx
                        ok = 0 <= jy < ny and 0 <= jx < nx
                        row.append((partial.name, *idx, jy, jx) if ok else None)
                    grid_keys.append(row)
                dsk[(name, *idx, iy, ix)] = (_fold_block, grid_keys, depth)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[partial])
    return da.Array(graph, name, chunks, meta=np.array((), np.float32))


def _fold_block(neighbours: list, depth: tuple[int, int]) -> np.ndarray:
    """Core of the centre partial plus the strips its neighbours spill into it."""
    dy, dx = depth
    centre = neighbours[1][1]
    out = centre[..., dy : centre.shape[-2] - dy, dx : centre.shape[-1] - dx].copy()
    ny, nx = out.shape[-2:]
    for i, row in enumerate(neighbours):
        for j, nb in enumerate(row):
            if nb is None or (i == 1 and j == 1):
                continue
            # rows of the neighbour that land in our core, and where
            ys = _strip(i, dy, nb.shape[-2], ny)
            xs = _strip(j, dx, nb.shape[-1], nx)
            if ys is None or xs is None:
                continue
            (src_y, dst_y), (src_x, dst_x) = ys, xs
            out[..., dst_y, dst_x] += nb[..., src_y, src_x]
    return out


def _strip(pos: int, d: int, n_nb: int, n_core: int):
    """Source and destination slices along one axis for neighbour position 0/1/2."""
    if pos == 1:
        return slice(d, n_nb - d), slice(0, n_core)
    if d == 0:
        return None
    if pos == 0:  # the neighbour before us: its last d pixels are our first d
        return slice(n_nb - d, n_nb), slice(0, d)
    return slice(0, d), slice(n_core - d, n_core)  # the one after: its first d


def _stage1(
    block: np.ndarray,
    handle: ModelHandle,
    *,
    plan: TilePlan,
    ychunks: tuple[int, ...],
    xchunks: tuple[int, ...],
    variables: list[str],
    batch_size: int,
    device: str,
    block_id: tuple[int, ...] | None = None,
) -> np.ndarray:
    """One block of stage 1 (module level: tasks pickle small, never the model)."""
    iy, ix = block_id[-2], block_id[-1]
    return predict_block(
        block,
        handle=handle,
        plan=plan,
        origin=(sum(ychunks[:iy]), sum(xchunks[:ix])),
        core_shape=(ychunks[iy], xchunks[ix]),
        variables=variables,
        batch_size=batch_size,
        device=device,
    )


def _repeat2(a: np.ndarray, k: int) -> np.ndarray:
    return np.repeat(np.repeat(a, k, axis=-2), k, axis=-1)


def _history(previous: str | None, dsr: Downscaler, weights_sha256: str) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    line = (
        f"{now}: downscaled x{dsr.factor} with xorbit {__version__} "
        f"(Reslim, weights sha256 {weights_sha256[:16]})"
    )
    return f"{previous}\n{line}" if previous else line


# --------------------------------------------------------------------------- accessors
class _OrbitBase:
    def __init__(self, obj: xr.DataArray | xr.Dataset) -> None:
        self._obj = obj

    def downscale(
        self,
        downscaler: Downscaler,
        *,
        tile: int | Sequence[int] | None = None,
        halo: int | Sequence[int] | None = None,
        batch_size: int = 16,
        device: str | None = None,
        static: xr.Dataset | None = None,
        periodic: bool | None = None,
        units: Mapping[str, str] | None = None,
    ) -> Any:
        """Downscale to the model's fine grid with TILES; lazy on Dask input.

        Parameters
        ----------
        downscaler
            A trained `xorbit.Downscaler` (``xorbit.load(path)``).
        tile
            Core size of a tile in coarse pixels, an int or ``(ny, nx)``.
            Default: the model's training size minus the halos.
        halo
            Context read around each tile core, in coarse pixels; overlapping
            predictions are blended over ``2 * halo``.  Default: an eighth of
            the training size, at least one.
        batch_size
            Tiles per model call.
        device
            ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...; default CUDA when visible.
        static
            Coarse static fields (orography, land-sea mask ...) the model reads,
            if they are not in the object itself.
        periodic
            Whether longitude wraps around; detected from the grid by default.
        units
            Units to assume for inputs whose ``units`` attribute is missing or
            wrong, by model variable name.  Inputs are converted to the model's
            units with pint (°C → K, ``kg m-2 s-1`` → ``mm/day`` ...).

        Returns
        -------
        An object of the same type on the fine grid: Dask-backed (nothing
        computed yet) when the input was, else computed.  Data-variable attrs
        are kept, ``history`` gains a line, coordinates gain bounds.

        Raises
        ------
        KeyError
            If a model input is missing (the message lists what is there).
        ValueError
            For a variable without the spatial dims; `xorbit.units.UnitsError` (a
            ValueError) for missing or incompatible units.
        """
        return downscale(
            self._obj,
            downscaler,
            tile=tile,
            halo=halo,
            batch_size=batch_size,
            device=device,
            static=static,
            periodic=periodic,
            units=units,
        )

    def interpolate(
        self, factor: int, method: str = "bicubic", periodic: bool | None = None
    ) -> Any:
        """Interpolate onto the same fine grid `downscale` gives (a baseline).

        ``method``: ``"nearest"``, ``"bilinear"`` or ``"bicubic"``.  Lazy on Dask
        input.  See `xorbit.regrid.interpolate`.
        """
        from .regrid import interpolate

        return interpolate(self._obj, factor, method, periodic)

    def to_netcdf(self, path, *, complevel: int = 4, keepbits: int | None = None, **cf: Any):
        """Write CF-compliant, compressed netCDF atomically (see `xorbit.io.to_netcdf`)."""
        from .io import to_netcdf

        return to_netcdf(self._obj, path, complevel=complevel, keepbits=keepbits, **cf)

    def to_zarr(self, store, *, level: int = 3, keepbits: int | None = None, **kwargs: Any):
        """Write CF-ready zarr, atomically and resumably (see `xorbit.io.to_zarr`)."""
        from .io import to_zarr

        return to_zarr(self._obj, store, level=level, keepbits=keepbits, **kwargs)


@xr.register_dataarray_accessor("orbit")
class OrbitDataArrayAccessor(_OrbitBase):
    """``DataArray.orbit``: downscaling and CF output for one variable."""


@xr.register_dataset_accessor("orbit")
class OrbitDatasetAccessor(_OrbitBase):
    """``Dataset.orbit``: downscaling and CF output for several variables."""
