"""Training samples: statistics, coarse/fine pairing, time splits and aligned crops.

The xarray side (`coarsen`, `compute_stats`, `pair_arrays`, `split_time`)
checks that a coarse and a fine object describe the same cells and turns them
into arrays ``[T, C, h, w]``: plain numpy when the data are small or already in
memory, else a `FieldStack` that reads and normalizes only the pieces asked for
(straight from a zarr store or a Dask graph, nothing loaded whole).  The torch
side (`PairedCrops`) cuts exactly co-located random crops from those arrays
(fine crop = coarse crop × factor), deterministic in ``(seed, epoch, index)``
so that every DDP rank and every resumed run sees the same samples; each rank
reads only its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import torch
import xarray as xr

from .. import grid
from ..grid import _XarrayT
from ..variables import as_dataset, gather

__all__ = [
    "IN_MEMORY_BYTES",
    "FieldStack",
    "PairedArrays",
    "PairedCrops",
    "coarsen",
    "compute_stats",
    "pair_arrays",
    "split_time",
]


def coarsen(
    fine: _XarrayT,
    factor: int,
    ydim: str | None = None,
    xdim: str | None = None,
) -> _XarrayT:
    """Cell-average ``factor × factor`` blocks: the coarse twin of a fine field.

    Rows and columns beyond a multiple of ``factor`` are dropped (say so with a
    clear shape); a NaN anywhere in a block makes the coarse cell NaN.  The
    coarse coordinates are the means of the fine ones (longitudes across the
    seam of their convention averaged modulo 360).
    """
    if int(factor) != factor or factor < 1:
        raise ValueError(f"coarsen: factor must be a positive integer, got {factor!r}")
    if ydim is None or xdim is None:
        ydim, xdim = grid.spatial_dims(fine)
    coord_func: dict[Any, Any] = {}
    if xdim in fine.coords and grid._cf_meaning(fine[xdim]) == "longitude":
        # a block across the seam (359.75, 0.25) averages to 0, not to 180
        lon = np.asarray(fine[xdim].values, np.float64)

        def lon_mean(x: np.ndarray, axis: tuple[int, ...]) -> np.ndarray:
            (axis_,) = axis  # xarray passes the block axis as a 1-tuple
            run = np.unwrap(x, period=360.0, axis=axis_)
            return grid.wrap_longitude(run.mean(axis_), lon)

        coord_func[xdim] = lon_mean
    # np.mean, not the nan-skipping default: a block with a gap is not a full cell
    blocks = fine.coarsen({ydim: factor, xdim: factor}, boundary="trim", coord_func=coord_func)
    return blocks.reduce(np.mean).assign_attrs(fine.attrs)


def compute_stats(
    arrays: Mapping[str, xr.DataArray],
) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and standard deviation of each array, computed with Dask in one pass.

    NaN is skipped.  A constant field gets std 1 (so that normalizing it gives
    zeros, not NaN).

    Raises
    ------
    ValueError
        If a variable has no finite value.
    """
    names = list(arrays)
    lazy = []
    for n in names:
        a = arrays[n]
        lazy += [a.mean(skipna=True), a.std(skipna=True)]
    values = dask.compute(*lazy)
    mean, std = {}, {}
    for i, n in enumerate(names):
        m, s = float(values[2 * i]), float(values[2 * i + 1])
        if not np.isfinite(m):
            raise ValueError(f"variable {n!r} has no finite value to compute statistics from")
        mean[n], std[n] = m, (s if np.isfinite(s) and s > 0 else 1.0)
    return mean, std


# Data not yet in memory are loaded whole when coarse and fine together take at
# most this many bytes (float32); larger ones are read sample by sample.
IN_MEMORY_BYTES = 256 * 2**20


def in_memory(var: xr.DataArray) -> bool:
    """Whether ``var``'s values are already a numpy array (not Dask, not a file)."""
    return isinstance(var.variable._data, np.ndarray)


def _read(data: Any, key: tuple) -> np.ndarray:
    """``data[key]`` as numpy: a Dask array is computed right here, synchronously.

    Inside a DDP rank (a Dask task) the default scheduler would be the
    cluster's: a rank reads its own samples, it does not ship them around.
    Data persisted on a cluster (`Persisted`) are fetched from it instead.
    """
    if isinstance(data, Persisted):
        return np.asarray(data.array[key].compute())
    if isinstance(data, dask.array.Array):
        return np.asarray(data[key].compute(scheduler="synchronous"))
    if isinstance(data, np.ndarray):
        return data[key]
    return np.asarray(data[key].values)  # a lazily indexed xarray Variable


@dataclass(frozen=True)
class Persisted:
    """A Dask array persisted on a distributed cluster: its graph holds futures,
    which only the cluster's scheduler can resolve."""

    array: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def ndim(self) -> int:
        return self.array.ndim


def _persisted(array: Any) -> bool:
    from dask._task_spec import TaskRef

    return any(isinstance(v, TaskRef) for v in dict(array.__dask_graph__()).values())


class FieldStack:
    """A stack ``[T, C, h, w]`` of normalized fields, read only where indexed.

    Each channel is a ``(time, y, x)`` or ``(y, x)`` source (an xarray
    Variable backed by a file, a zarr store or Dask; or numpy), with an
    optional per-pixel climatology subtracted and a mean and standard deviation
    normalizing it, exactly as `pair_arrays` does for data in memory.  Indexing
    with ``[t, :, ys, xs]`` (``t`` an int) reads that crop of every channel;
    ``[index]`` (a slice or an array along time) gives a lazy view;
    ``np.asarray`` reads everything in view.  Pickles small: the sources, not
    their values, travel to DDP ranks.
    """

    def __init__(
        self,
        sources: Sequence[Any],
        climatologies: Sequence[np.ndarray | None],
        mean: Sequence[float],
        std: Sequence[float],
        times: np.ndarray,
    ) -> None:
        self.sources = list(sources)
        self.climatologies = list(climatologies)
        self.mean, self.std = list(mean), list(std)
        self.times = np.asarray(times)  # positions along the sources' time axis
        ny, nx = self.sources[0].shape[-2:]
        self.hw = (int(ny), int(nx))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.times), len(self.sources), *self.hw)

    def __len__(self) -> int:
        return len(self.times)

    def _channel(self, c: int, t: Any, ys: slice, xs: slice) -> np.ndarray:
        src = self.sources[c]
        key = (t, ys, xs) if src.ndim == 3 else (ys, xs)
        a = _read(src, key)
        if src.ndim == 2 and not np.isscalar(t):
            a = np.broadcast_to(a, (len(t), *a.shape))
        clim = self.climatologies[c]
        if clim is not None:
            a = a - clim[ys, xs]
        # the very operations `pair_arrays` applies to data in memory, so both
        # give the same numbers to the bit
        return (np.asarray(a, np.float32) - self.mean[c]) / self.std[c]

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, tuple):
            # along time: a view, read later
            return FieldStack(
                self.sources, self.climatologies, self.mean, self.std, self.times[key]
            )
        t, c, ys, xs = key
        if c != slice(None) or not isinstance(t, (int, np.integer)):
            raise IndexError("FieldStack reads [t, :, y-slice, x-slice] with an integer t")
        pos = int(self.times[t])
        return np.stack([self._channel(i, pos, ys, xs) for i in range(len(self.sources))])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        pos = np.asarray(self.times)
        every = slice(None)
        if len(pos) == 0:
            out = np.zeros(self.shape, np.float32)
        else:
            out = np.stack(
                [self._channel(i, pos, every, every) for i in range(len(self.sources))], axis=1
            )
        return out if dtype is None else out.astype(dtype)


@dataclass
class PairedArrays:
    """Normalized numpy training arrays.

    ``coarse [T, C, h, w]`` (NaN kept), ``fine [T, V, h k, w k]`` (NaN kept, a
    missing target), ``fine_lat [h k]`` in degrees, ``times`` the labels of T,
    ``periodic`` whether the longitude wraps around (validation tiles it so),
    ``res_km`` the coarse grid's spacing for the resolution embedding (``None``:
    the model's constant), ``fine_zero [V, h k, w k]`` each output's normalized
    value of a field of zeros (where a non-negative output is dry; ``None``:
    unknown).
    """

    coarse: np.ndarray | FieldStack
    fine: np.ndarray | FieldStack
    fine_lat: np.ndarray
    times: np.ndarray
    periodic: bool = False
    res_km: float | None = None
    fine_zero: np.ndarray | None = None

    def __len__(self) -> int:
        return self.coarse.shape[0]

    def select(self, index) -> PairedArrays:
        return dataclasses.replace(
            self, coarse=self.coarse[index], fine=self.fine[index], times=self.times[index]
        )


def pair_arrays(
    coarse: xr.DataArray | xr.Dataset,
    fine: xr.DataArray | xr.Dataset,
    in_vars: Sequence[str],
    out_vars: Sequence[str],
    factor: int,
    mean: Mapping[str, float],
    std: Mapping[str, float],
    time_dim: Hashable = "time",
    static_vars: Sequence[str] = (),
    static: xr.Dataset | None = None,
    input_climatology: Mapping[str, xr.DataArray] | None = None,
    output_climatology: Mapping[str, xr.DataArray] | None = None,
    load: bool | None = None,
) -> PairedArrays:
    """Check that ``coarse`` and ``fine`` line up and return normalized arrays.

    Variables are found by name, then by ``standard_name``; the names in
    `COORDINATE_FIELDS` are made from coordinates.  The fine grid must be the
    coarse grid split ``factor`` times (checked on the coordinates, to a
    hundredth of a fine cell).  Static input channels not in ``coarse`` are
    read from ``static``.  The climatologies (on the coarse grid for inputs,
    the fine grid for outputs) are subtracted before normalizing.

    ``load``: ``True`` reads everything into memory now, ``False`` returns
    `FieldStack` arrays that read each sample when asked for (from a zarr
    store, a file or a Dask graph), ``None`` (default) loads data already in
    memory or smaller than `IN_MEMORY_BYTES`, and streams the rest.

    Raises
    ------
    KeyError
        Naming a variable found in neither object.
    ValueError
        If the grids or the time axes do not line up.
    """
    dynamic = [v for v in in_vars if v not in static_vars]
    cds = as_dataset(coarse, list(in_vars), candidates=dynamic)
    fds = as_dataset(fine, list(out_vars))
    ydim, xdim, fy, fx = check_pair_grids(cds, fds, factor, time_dim)
    c_arrays = list(
        gather(
            [cds, static], in_vars, ydim=ydim, xdim=xdim, role="input", where="the coarse data"
        ).values()
    )
    f_arrays = list(
        gather([fds], out_vars, ydim=fy, xdim=fx, role="output", where="the fine data").values()
    )
    ref = f_arrays[0]
    times = ref[time_dim].values if time_dim in ref.dims else np.arange(1)
    n_time = len(times)
    c_names, f_names = list(in_vars), list(out_vars)
    c_clim, f_clim = input_climatology or {}, output_climatology or {}

    c_arrays = _arranged(c_arrays, c_names, time_dim, ydim, xdim)
    f_arrays = _arranged(f_arrays, f_names, time_dim, fy, fx)
    total = 4 * n_time * sum(int(np.prod(a.shape[-2:])) for a in [*c_arrays, *f_arrays])
    dynamic_in_memory = all(in_memory(a) for a in [*c_arrays, *f_arrays] if time_dim in a.dims)
    load = load if load is not None else (dynamic_in_memory or total <= IN_MEMORY_BYTES)

    return PairedArrays(
        coarse=_normalized(c_arrays, c_names, c_clim, mean, std, n_time, time_dim, load),
        fine=_normalized(f_arrays, f_names, f_clim, mean, std, n_time, time_dim, load),
        fine_lat=np.asarray(fds[fy].values, np.float64),
        times=np.asarray(times),
        periodic=bool(grid.is_global_longitude(cds[xdim], cds)),
        res_km=grid.spacing_km(cds, ydim, xdim),
        fine_zero=_zero_normalized(f_arrays, f_names, f_clim, mean, std),
    )


def check_pair_grids(
    cds: xr.Dataset, fds: xr.Dataset, factor: int, time_dim: Hashable = "time"
) -> tuple[str, str, str, str]:
    """The coarse and fine (y, x) dims, once the fine grid is checked to be the coarse
    one split ``factor`` times (to a hundredth of a fine cell, longitudes modulo 360)
    and the time axes to agree."""
    ydim, xdim = grid.spatial_dims(cds)
    fy, fx = grid.spatial_dims(fds)
    expected = (cds.sizes[ydim] * factor, cds.sizes[xdim] * factor)
    if (fds.sizes[fy], fds.sizes[fx]) != expected:
        raise ValueError(
            f"the fine grid is {fds.sizes[fy]} x {fds.sizes[fx]} but the coarse grid "
            f"{cds.sizes[ydim]} x {cds.sizes[xdim]} times factor {factor} is "
            f"{expected[0]} x {expected[1]}; crop the fine field to a multiple of the factor "
            "(xorbit.coarsen makes a matching coarse field)"
        )
    refined = grid.fine_grid(cds, factor, ydim, xdim)
    for cdim, fdim in ((ydim, fy), (xdim, fx)):
        step = np.abs(np.diff(fds[fdim].values)).min() if fds.sizes[fdim] > 1 else 1.0
        diff = refined[cdim].values - fds[fdim].values
        if "longitude" in (grid._cf_meaning(cds[cdim]), grid._cf_meaning(fds[fdim])):
            diff = (diff + 180.0) % 360.0 - 180.0  # longitudes are equal modulo 360
        off = np.abs(diff).max()
        if off > 0.01 * step:
            raise ValueError(
                f"fine coordinate {fdim!r} is not the coarse {cdim!r} split {factor} times "
                f"(off by up to {off:.4g}); coarse and fine must describe the same cells"
            )
    if time_dim in cds.dims and time_dim in fds.dims:
        if cds.sizes[time_dim] != fds.sizes[time_dim] or not np.array_equal(
            cds[time_dim].values, fds[time_dim].values
        ):
            raise ValueError(f"coarse and fine {time_dim!r} axes differ; align them first")
    return ydim, xdim, fy, fx


def _arranged(arrays, names, time_dim: Hashable, y: Hashable, x: Hashable) -> list[xr.DataArray]:
    """Each array as ``(time, y, x)`` (time where it has one); other dims are an error."""
    out = []
    for a, n in zip(arrays, names, strict=True):
        extra = [d for d in a.dims if d not in (time_dim, y, x)]
        if extra:
            raise ValueError(
                f"variable {n!r} has dims {extra} besides time and space; select them first"
            )
        out.append(a.transpose(*[d for d in (time_dim, y, x) if d in a.dims]))
    return out


def _zero_normalized(arrays, names, clim, mean, std) -> np.ndarray:
    """``[C, h, w]``: a field of zeros of each variable, normalized as `_normalized` does."""
    out = []
    for a, n in zip(arrays, names, strict=True):
        anomaly = -_aligned(clim[n], a) if n in clim else np.zeros(a.shape[-2:])
        out.append((np.asarray(anomaly, np.float32) - mean[n]) / std[n])
    return np.stack(out).astype(np.float32)


def _aligned(clim: xr.DataArray, a: xr.DataArray) -> np.ndarray:
    """``clim`` as numpy on ``a``'s grid: what ``a - clim`` does in memory (by name and label)."""
    y, x = a.dims[-2:]
    return np.asarray(clim.transpose(y, x).reindex({y: a[y], x: a[x]}).values)


def _normalized(arrays, names, clim, mean, std, n_time: int, time_dim: Hashable, load: bool):
    """Normalized anomalies ``[T, C, h, w]``: numpy now (``load``), else a `FieldStack`."""
    if not load:
        return FieldStack(
            [_source(a) for a in arrays],
            [
                _aligned(clim[n], a) if n in clim else None
                for a, n in zip(arrays, names, strict=True)
            ],
            [mean[n] for n in names],
            [std[n] for n in names],
            np.arange(n_time),
        )
    out = []
    for a, n in zip(arrays, names, strict=True):
        if n in clim:
            a = a - clim[n]
        if time_dim not in a.dims:
            a = a.expand_dims({time_dim: n_time})
        out.append((np.asarray(a.values, np.float32) - mean[n]) / std[n])
    return np.stack(out, axis=1).astype(np.float32)


def _source(a: xr.DataArray) -> Any:
    """What a `FieldStack` reads ``a`` from: its numpy or Dask array, else its
    lazily indexed Variable (a file opened without chunks: never ``.data``, which
    would load it whole)."""
    data = a.variable._data
    if isinstance(data, dask.array.Array) and _persisted(data):
        return Persisted(data)
    if isinstance(data, np.ndarray | dask.array.Array):
        return data
    return a.variable


def split_time(n: int, val_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a train / validation split along time: the last part validates.

    Time series are autocorrelated: a random split would leak neighbours of
    validation years into training.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n_val == 0 and n > 1:
        n_val = 1
    if n - n_val < 1:
        raise ValueError(f"nothing left to train on: {n} time steps, {n_val} for validation")
    idx = np.arange(n)
    return idx[: n - n_val], idx[n - n_val :]


class PairedCrops(torch.utils.data.Dataset):
    """Random co-located crops of coarse and fine arrays.

    Item ``i`` of epoch ``e`` is a crop of time step ``i % T`` at an offset drawn
    from a generator seeded with ``(seed, e, i)``: the same on every rank and
    after a resume.  With ``samples=N`` an epoch has N items, each of a time
    step drawn from that generator too (for sets too large to see whole every
    epoch).  Returns ``(coarse [C, ch, cw] with NaN as 0, fine [V, ch k,
    cw k] with NaN kept, row latitudes [ch k])``.

    ``scale=(lo, hi)`` multiplies the input channels ``scaled`` and the target
    of each item by one factor drawn uniformly from ``[lo, hi]`` with a random
    sign (amplitude augmentation, for anomaly fields whose normalized zero is
    the climatology): it teaches the model that a larger anomaly of the coarse
    field means a proportionally larger fine one, so that it extrapolates to a
    climate warmer than its training years as a linear model would.
    """

    def __init__(
        self,
        data: PairedArrays,
        crop: tuple[int, int],
        factor: int,
        crops_per_time: int = 1,
        seed: int = 0,
        scale: tuple[float, float] | None = None,
        scaled: Sequence[int] = (),
        mix: tuple[float, float] | None = None,
        samples: int | None = None,
    ) -> None:
        if samples is not None and int(samples) < 1:
            raise ValueError(f"samples_per_epoch must be a positive integer, got {samples!r}")
        self.samples = None if samples is None else int(samples)
        self.mix = None if mix is None else (float(mix[0]), float(mix[1]))
        self.data, self.factor, self.seed = data, int(factor), int(seed)
        self.scale = None if scale is None else (float(scale[0]), float(scale[1]))
        self.scaled = list(scaled)
        h, w = data.coarse.shape[-2:]
        self.crop = (min(int(crop[0]), h), min(int(crop[1]), w))
        self.crops_per_time = max(1, int(crops_per_time))
        self.epoch = 0
        # cos(latitude) of the fine rows is normalized over the whole grid, not the crop
        self._lat_norm = float(np.cos(np.deg2rad(data.fine_lat)).clip(min=0).mean())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.samples is not None:
            return self.samples
        return len(self.data) * self.crops_per_time

    def __getitem__(self, i: int):
        h, w = self.data.coarse.shape[-2:]
        ch, cw = self.crop
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        if self.samples is None:
            t = i % len(self.data)
        else:
            # drawn after the offsets' generator is made, from a generator of its
            # own: the crops of the default epochs are those of earlier versions
            t = int(
                np.random.default_rng([self.seed, self.epoch, int(i), 1]).integers(len(self.data))
            )
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        k = self.factor
        x = self.data.coarse[t, :, y0 : y0 + ch, x0 : x0 + cw]
        y = self.data.fine[t, :, y0 * k : (y0 + ch) * k, x0 * k : (x0 + cw) * k]
        lat = self.data.fine_lat[y0 * k : (y0 + ch) * k]
        if self.mix is not None:
            t2 = int(rng.integers(0, len(self.data)))
            lam = float(rng.uniform(*self.mix))
            x2 = self.data.coarse[t2, :, y0 : y0 + ch, x0 : x0 + cw]
            y2 = self.data.fine[t2, :, y0 * k : (y0 + ch) * k, x0 * k : (x0 + cw) * k]
            x = x.copy()
            x[self.scaled] = lam * x[self.scaled] + (1 - lam) * x2[self.scaled]
            y = lam * y + (1 - lam) * y2
        if self.scale is not None:
            s = float(rng.uniform(*self.scale)) * (1.0 if rng.random() < 0.5 else -1.0)
            x = x.copy()
            x[self.scaled] *= s
            y = y * s
        return (
            torch.from_numpy(np.nan_to_num(x, nan=0.0)),
            torch.from_numpy(np.ascontiguousarray(y)),
            torch.from_numpy(lat.copy()),
        )

    def batch(self, indices: Sequence[int]):
        """The items ``indices`` as a batch ``(coarse, fine, row weights, res_km)``.

        Row weights are cos(latitude) of each fine row over its mean on the
        whole grid; ``res_km [B]`` the grid spacing of each item (NaN: the
        model's constant).
        """
        return _stack([self.item(int(i)) for i in indices])

    def item(self, i: int) -> tuple[torch.Tensor, ...]:
        """Item ``i`` with its row weights and grid spacing (one row of `batch`)."""
        x, y, lat = self[i]
        rows = torch.cos(torch.deg2rad(lat)).clamp(min=0).float() / self._lat_norm
        res = self.data.res_km
        return x, y, rows, torch.tensor(np.nan if res is None else float(res), dtype=torch.float32)


def _stack(items: Sequence[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.stack(parts) for parts in zip(*items, strict=True))


class CropMix(torch.utils.data.Dataset):
    """Several `PairedCrops` (one per grid, e.g. per resolution) as one set.

    Item ``i`` is item ``i - offset`` of the part it falls in; a batch may mix
    parts (their crops must have one shape).  ``data`` is the first part's.
    """

    def __init__(self, parts: Sequence[PairedCrops]) -> None:
        self.parts = list(parts)
        shapes = {p.crop for p in self.parts}
        if len(shapes) > 1:
            raise ValueError(f"the grids' crops differ in shape {sorted(shapes)}; give one crop=")
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    @property
    def data(self) -> PairedArrays:
        return self.parts[0].data

    def set_epoch(self, epoch: int) -> None:
        for p in self.parts:
            p.set_epoch(epoch)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def item(self, i: int) -> tuple[torch.Tensor, ...]:
        part = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[part].item(i - int(self.offsets[part]))

    def __getitem__(self, i: int):
        return self.item(int(i))[:3]

    def batch(self, indices: Sequence[int]):
        """As `PairedCrops.batch`, items from any part."""
        return _stack([self.item(int(i)) for i in indices])
