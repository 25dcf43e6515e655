"""The ``.orbit`` accessor: labels in, `xorbit.engine.downscale_array`, labels out.

``coarse.orbit.downscale(downscaler)``:

1. find the model's inputs by name, then by CF ``standard_name``
   (`xorbit.variables.gather`), convert them to the model's units;
2. match the orientation of the training grid (flip latitude / longitude
   where they run the other way) and warn when the grid spacing is far from
   the training spacing;
3. stack the inputs as channels ``(..., C, y, x)`` and call
   `xorbit.engine.downscale_array` (lazy on Dask input, one pass on numpy);
4. label the result on the fine grid (`xorbit.grid`), restore the caller's
   orientation, keep attributes, add a ``history`` line.

Nothing numeric happens here.
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from . import grid
from . import transforms as _transforms
from ._version import __version__
from .downscaler import Downscaler, check_constraints
from .engine import downscale_array
from .fields import fine_reference, on_grid, pack
from .model.constraints import apply as apply_constraint
from .units import convert, to_model_units
from .variables import as_dataset, find_variable, gather

__all__ = ["OrbitDataArrayAccessor", "OrbitDatasetAccessor", "downscale"]

# Input spacing may differ from the training spacing by this factor before a warning.
SPACING_TOLERANCE = 1.5
# The ensemble dimension of MC-dropout members; `xorbit.evaluate`'s default sample_dim.
SAMPLE_DIM = "sample"


class GridWarning(UserWarning):
    """The input grid is not the one the model was trained on (spacing, orientation)."""


_WARNED: set[str] = set()


# --------------------------------------------------------------------------- grid facts
def _orient(
    ref: xr.Dataset, dsr: Downscaler, ydim: str, xdim: str, weights_sha256: str
) -> dict[str, bool]:
    """Which spatial dims to flip so the inputs run as the training grid did.

    Also warns when the spacing is far from the training spacing.  Models
    saved before xorbit 0.2 record no grid: inputs are used as they come, and a
    warning says so.
    """
    facts = dsr.grid
    if not facts:
        if weights_sha256 not in _WARNED:  # once per model: the answer does not change
            _WARNED.add(weights_sha256)
            warnings.warn(
                "this model records no training grid (saved by xorbit < 0.2, or built "
                "without one): inputs are used in the order given, without checking the "
                "latitude orientation or the grid spacing; set Downscaler.grid "
                "(xorbit.downscaler.training_grid) and save it again to record them",
                GridWarning,
                stacklevel=4,
            )
        return {ydim: False, xdim: False}
    flips = {}
    for dim, key in ((ydim, "y"), (xdim, "x")):
        values = grid.axis_values(ref[dim])  # a longitude across its seam: unwrapped
        steps = np.diff(values)
        ascending = bool(values.size < 2 or steps[0] > 0)
        flips[dim] = values.size > 1 and ascending != bool(facts.get(f"{key}_ascending", True))
        trained = facts.get(f"d{key}")
        if trained and steps.size and not facts.get("multi_resolution", False):
            step = float(np.median(np.abs(steps)))
            ratio = step / float(trained)
            if not 1 / SPACING_TOLERANCE <= ratio <= SPACING_TOLERANCE:
                warnings.warn(
                    f"the input's {dim!r} spacing is {step:.4g}, but the model was trained "
                    f"on a grid with spacing {float(trained):.4g} ({ratio:.3g} times); its "
                    "skill at another resolution is unknown",
                    GridWarning,
                    stacklevel=4,
                )
    window = facts.get("window")
    shape = (ref.sizes[ydim], ref.sizes[xdim])
    if window and (shape[0] < window[0] or shape[1] < window[1]):
        warnings.warn(
            f"the model was trained on windows of {window[0]} x {window[1]} coarse cells, "
            f"but this input is {shape[0]} x {shape[1]}: its position embedding is stretched "
            "over a grid it never saw; downscale a region at least the window's size (for "
            "a model trained on a small domain: the whole domain) and select afterwards",
            GridWarning,
            stacklevel=4,
        )
    return flips


def _flip(obj, flips: Mapping[str, bool]):
    """Reverse the dims marked True (a no-op view when none is)."""
    sel = {d: slice(None, None, -1) for d, f in flips.items() if f and d in obj.dims}
    return obj.isel(sel) if sel else obj


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
    precision: str = "auto",
    samples: int | None = None,
    seed: int = 0,
    constrain: bool | Mapping[str, str] | None = None,
) -> xr.DataArray | xr.Dataset:
    """Downscale coarse fields with a `Downscaler` (see `OrbitDataArrayAccessor.downscale`)."""
    if not isinstance(downscaler, Downscaler):
        raise TypeError(
            f"downscale expects an xorbit.Downscaler, got {type(downscaler).__name__}; "
            "load one with xorbit.load(path)"
        )
    cfg = downscaler.config
    k = cfg.factor
    as_array = isinstance(obj, xr.DataArray)
    dynamic = [v for v in cfg.in_vars if v not in cfg.static_vars]
    ds = as_dataset(obj, cfg.in_vars, candidates=dynamic)
    ydim, xdim = grid.spatial_dims(ds)
    weights_sha256 = downscaler.weights_sha256  # hashed once per call
    flips = _orient(ds, downscaler, ydim, xdim, weights_sha256)
    stored = _stored_static(downscaler, ds, static, flips)
    inputs = gather(
        [ds, static, stored], cfg.in_vars, ydim=ydim, xdim=xdim, where="the data or static="
    )
    for name, var in inputs.items():
        if ydim not in var.dims or xdim not in var.dims:
            raise ValueError(
                f"input variable {name!r} has dims {var.dims}; it needs both spatial dims "
                f"({ydim!r}, {xdim!r})"
            )
    # the units each output goes back to: its input's, as given (or as said by units=)
    given = {n: (units or {}).get(n, v.attrs.get("units")) for n, v in inputs.items()}
    inputs = to_model_units(inputs, downscaler.units, units)
    constraints = _constraints(downscaler, constrain)
    # the coarse values the constraints hold the outputs to: model units, training orientation
    totals = {n: _flip(inputs[n], flips) for n in constraints}
    for name, kind in downscaler.transforms.items():
        if name in inputs:
            var = _transforms.to_transform_units(inputs[name], kind, name)
            inputs[name] = _transforms.forward(var, kind)
    inputs = {n: _flip(v, flips) for n, v in inputs.items()}
    for name, clim in downscaler.input_climatology.items():
        # the model works on anomalies from its training climatology
        inputs[name] = _keep(
            inputs[name] - on_grid(clim, inputs[name], f"{name!r} climatology"), inputs[name]
        )

    # lead dims: the union of the non-spatial dims of the inputs, in order
    lead: list[Hashable] = []
    for var in inputs.values():
        lead += [d for d in var.dims if d not in (ydim, xdim, *lead)]
    arrays = [
        a.transpose(*lead, ydim, xdim)
        for a in xr.broadcast(*(inputs[name] for name in cfg.in_vars))
    ]
    lazy = any(isinstance(a.data, da.Array) for a in arrays)
    if lazy:
        data = [a.data if isinstance(a.data, da.Array) else da.asarray(a.data) for a in arrays]
        stacked = da.stack(data, axis=-3)
    else:
        stacked = np.stack([np.asarray(a.values, np.float32) for a in arrays], axis=-3)
    if periodic is None:
        periodic = grid.is_global_longitude(arrays[0][xdim], ds)
    res_km = _resolution(downscaler, arrays[0], ydim, xdim)
    out = downscale_array(
        stacked,
        downscaler,
        tile=tile,
        halo=halo,
        periodic=bool(periodic),
        batch_size=batch_size,
        device=device,
        precision=precision,
        weights_sha256=weights_sha256,
        res_km=res_km,
        samples=samples,
        seed=seed,
    )
    # MC-dropout members: a new leading "sample" dimension (the engine's axis 0)
    ens = () if samples is None else (SAMPLE_DIM,)
    note = None if samples is None else _ensemble_note(samples, seed, cfg.noise_channels > 0)

    fine_coords = grid.fine_grid(arrays[cfg.in_vars.index(cfg.out_vars[0])], k, ydim, xdim)
    # a DataArray cannot hold (dim, bnds) coordinates: bounds go with Datasets,
    # and writers recompute them for a DataArray from its regular fine grid
    bounds = {n: c for n, c in fine_coords.items() if "bnds" in c.dims}
    array_coords = {n: c for n, c in fine_coords.items() if n not in bounds}
    for name in (ydim, xdim):
        coord = array_coords[name].copy()
        coord.attrs.pop("bounds", None)
        array_coords[name] = coord
    result_coords = (
        {**array_coords, SAMPLE_DIM: _sample_coord(samples, cfg.noise_channels > 0)}
        if samples is not None
        else array_coords
    )
    results = {}
    for i, name in enumerate(cfg.out_vars):
        src = inputs[name]
        attrs = {**src.attrs, **downscaler.attrs.get(name, {})}
        attrs["history"] = _history(src.attrs.get("history"), downscaler, weights_sha256, note)
        if note:
            attrs["ensemble"] = note
        result = xr.DataArray(
            out[..., i, :, :],
            dims=(*ens, *lead, ydim, xdim),
            coords=result_coords,
            attrs=attrs,
            name=src.name if as_array else name,
        )
        if name in downscaler.output_climatology:
            clim = on_grid(downscaler.output_climatology[name], result, f"{name!r} climatology")
            full = result + clim
            if name in downscaler.nonnegative:
                full = full.clip(min=0)  # clamped after the climatology is back
            result = _keep(full, result)
        if name in downscaler.transforms:
            result = _keep(_transforms.inverse(result, downscaler.transforms[name]), result)
        if name in constraints:
            result = _constrained(result, totals[name], k, constraints[name], (ydim, xdim))
        back = given.get(name)
        if back and result.attrs.get("units") and back != result.attrs["units"]:
            result = convert(result, back, name)  # the caller's units, as the input came
        results[name] = _flip(result, flips)
    if as_array:
        return next(iter(results.values()))
    keep = {v: ds[v] for v in ds.data_vars if ydim not in ds[v].dims and xdim not in ds[v].dims}
    out_ds = xr.Dataset({**keep, **results}, attrs=dict(ds.attrs))
    bounds = {n: _flip(c, flips) for n, c in bounds.items()}
    out_ds = out_ds.assign_coords(bounds)
    out_ds = out_ds.assign_coords({n: _flip(fine_coords[n], flips) for n in (ydim, xdim)})
    out_ds.attrs["history"] = _history(ds.attrs.get("history"), downscaler, weights_sha256, note)
    return out_ds


def _constraints(dsr: Downscaler, constrain: bool | Mapping[str, str] | None) -> dict[str, str]:
    """The coarse-consistency constraint of each output variable for this call."""
    if constrain is None:
        return dict(dsr.constraints)
    if constrain is False:
        return {}
    if constrain is True:
        chosen = dsr.constraint_kinds()
    else:
        chosen = check_constraints(constrain, dsr.config.out_vars)
    averaged = dsr.grid.get("cell_average", {})
    odd = sorted(v for v in chosen if averaged.get(v) is False)
    if odd:
        warnings.warn(
            f"the model's coarse training data for {odd} were not cell averages of the fine "
            "data: a coarse-consistency constraint holds the output to something else",
            GridWarning,
            stacklevel=4,
        )
    return chosen


def _constrained(
    fine: xr.DataArray, coarse: xr.DataArray, k: int, kind: str, dims: tuple[str, str]
) -> xr.DataArray:
    """``fine`` held to ``coarse`` cell by cell (`xorbit.model.constraints.apply`), lazily.

    Block by block: ``coarse`` is rechunked to ``fine``'s blocks (a fine
    block is ``k`` times a coarse one along y and x), and dims ``fine`` has
    and ``coarse`` lacks (``sample``) are broadcast.
    """
    lead = [d for d in fine.dims if d not in dims]
    c = coarse.transpose(*[d for d in lead if d in coarse.dims], *dims)
    c = c.expand_dims([d for d in lead if d not in coarse.dims]).transpose(*lead, *dims)
    if not isinstance(fine.data, da.Array):
        out = apply_constraint(np.asarray(fine.values), np.asarray(c.values), k, kind)
        return fine.copy(data=out)
    f = fine.data
    chunks = tuple(
        (1,) if c.sizes[d] == 1 and fine.sizes[d] != 1 else f.chunks[i] for i, d in enumerate(lead)
    ) + tuple(tuple(n // k for n in f.chunks[len(lead) + j]) for j in range(2))
    cd = da.asarray(c.data).rechunk(chunks)
    out = da.map_blocks(apply_constraint, f, cd, k=k, kind=kind, dtype=f.dtype)
    return fine.copy(data=out)


def _resolution(dsr: Downscaler, ref: xr.DataArray, ydim: str, xdim: str) -> float | None:
    """The input's grid spacing in km for the resolution embedding.

    ``None`` (the config's constant) for models trained before the embedding
    read the grid (no ``res_km`` in their grid facts).  An input whose spacing
    cannot be told in km (projected coordinates without units) gets the
    training spacing, with a warning.
    """
    trained = dsr.grid.get("res_km")
    if trained is None:
        return None
    km = grid.spacing_km(ref, ydim, xdim)
    if km is not None:
        return km
    fallback = float(np.atleast_1d(trained)[0])
    warnings.warn(
        f"cannot tell the input's grid spacing in km from its coordinates {ydim!r}, "
        f"{xdim!r} (give them units, e.g. 'degrees_north' or 'km'); the resolution "
        f"embedding gets the training spacing {fallback:.4g} km",
        GridWarning,
        stacklevel=4,
    )
    return fallback


def _keep(new: xr.DataArray, old: xr.DataArray) -> xr.DataArray:
    """``new`` with ``old``'s name, attributes and dimension order (arithmetic drops them)."""
    return new.transpose(*old.dims).rename(old.name).assign_attrs(old.attrs)


def _stored_static(
    dsr: Downscaler, ds: xr.Dataset, static: xr.Dataset | None, flips: Mapping[str, bool]
) -> xr.Dataset | None:
    """The model's static fields as input channels on ``ds``'s coarse grid.

    Each field stored in the `Downscaler` (or given under the same name in
    ``static``, which wins) is matched to ``ds``'s domain by coordinate value;
    a fine field is packed into ``factor²`` coarse channels, block rows and
    columns in the training orientation (``flips``), coarse cells in ``ds``'s
    order like every other input.
    """
    if not dsr.static:
        return None
    ds = _flip(ds, flips)
    channels: dict[str, xr.DataArray] = {}
    fine_ref = None
    for name, field in dsr.static.items():
        given = find_variable(static, name) if static is not None else None
        if given is not None:
            field = given
        what = f"static field {name!r}"
        if dsr.static_packing[name] == "coarse":
            channels[name] = on_grid(field, ds, what)
            continue
        if fine_ref is None:
            fine_ref = fine_reference(ds, dsr.factor)
        channels.update(pack(on_grid(field, fine_ref, what), dsr.factor, name, ds))
    return _flip(xr.Dataset(channels), flips)


def _history(
    previous: str | None, dsr: Downscaler, weights_sha256: str, note: str | None = None
) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    line = (
        f"{now}: downscaled x{dsr.factor} with xorbit {__version__} "
        f"(Reslim, weights sha256 {weights_sha256[:16]})"
    )
    if note:
        line += f"; {note}"
    return f"{previous}\n{line}" if previous else line


def _ensemble_note(samples: int, seed: int, stochastic: bool = False) -> str:
    kind = "members of the stochastic model" if stochastic else "MC-dropout samples"
    return f"{samples} {kind} along {SAMPLE_DIM!r} (seed {seed})"


def _sample_coord(samples: int, stochastic: bool = False) -> xr.DataArray:
    kind = "stochastic-model" if stochastic else "MC-dropout"
    return xr.DataArray(
        np.arange(samples),
        dims=SAMPLE_DIM,
        # CF's name for an ensemble member axis
        attrs={"standard_name": "realization", "long_name": f"{kind} ensemble member"},
    )


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
        precision: str = "auto",
        samples: int | None = None,
        seed: int = 0,
        constrain: bool | Mapping[str, str] | None = None,
    ) -> Any:
        """Downscale to the model's fine grid with TILES; lazy on Dask input.

        Parameters
        ----------
        downscaler
            A trained `xorbit.Downscaler` (``xorbit.load(path)``).
        tile
            Core size of a tile in coarse pixels, an int or ``(ny, nx)``.
            Default: the model's training size minus the halos; a domain
            that fits in one training window (and does not wrap around) is
            one tile without halo, as `xorbit.train` cropped it.
        halo
            Context read around each tile core, in coarse pixels; overlapping
            predictions are blended over ``2 * halo``.  Default: a
            thirty-second of the training size, at least one (``(1, 2)`` for
            a 32 x 64 window).
        batch_size
            Tiles per model call.
        device
            ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...; default: chosen where each
            task runs (CUDA when that worker sees a GPU, else CPU).
        static
            Static fields (orography, land-sea mask ...) the model reads, if
            they are not in the object itself; for the fields stored in the
            model (``xorbit.train(..., static=)``), the same names here replace
            them, on the coarse or the fine grid as at training.
        periodic
            Whether longitude wraps around; detected from the grid by default.
        units
            Units to assume for inputs whose ``units`` attribute is missing or
            wrong, by model variable name.  Inputs are converted to the model's
            units with pint (°C → K, ``kg m-2 s-1`` → ``mm/day`` ...), and each
            result back to the units of its input (°C in, °C out).  Variables
            the model sees transformed (``downscaler.transforms``, e.g.
            precipitation as ``log1p``) are transformed after the conversion
            and inverted before the conversion back.
        precision
            ``"auto"`` (bfloat16 autocast on CUDA, float32 on CPU), ``"fp32"``,
            ``"bf16"`` or ``"fp16"``.
        samples
            ``N``: an ensemble of ``N`` members along a new leading dimension
            ``sample`` (coordinate ``0 .. N-1``), one forward pass each (``N``
            deterministic downscales).  A stochastic model
            (``xorbit.train(..., ensemble=M)``) draws one noise field per
            member for the whole domain; any other model needs dropout, and
            its members are MC-dropout draws.  ``None`` (default): one
            deterministic output (a stochastic model's member at zero noise).
        seed
            Seed of the members' noise or dropout masks.  The members depend on
            it, the member's index and each sample's and pixel's position in
            this object, not on chunks, ``batch_size`` or laziness (so a
            subset of the object, downscaled alone, gets other members).
        constrain
            Coarse consistency (`xorbit.model.constraints`): the mean of the
            output over each coarse cell equals the coarse input,
            multiplicatively (positive, mass-preserving: precipitation) or
            additively.  ``None`` (default): the model's
            ``downscaler.constraints`` (as `xorbit.train` sets them:
            multiplicative for non-negative outputs, additive for the
            others, where the coarse data were cell averages); ``False``: none; ``True``: every output, multiplicative
            where non-negative, else additive; a dict ``{"tas": "additive"}``
            names them.  Per coarse cell, so chunk- and tile-invariant, and
            applied to every ensemble member.  Right only for coarse fields
            that are cell averages of the fine grid's cells: a model whose
            training data were not warns.

        Returns
        -------
        xarray.DataArray or xarray.Dataset
            An object of the same type on the fine grid: Dask-backed (nothing
            computed yet) when the input was, else computed (in one pass for all
            outputs).  Data-variable attrs
            are kept, ``history`` gains a line, coordinates gain bounds.  With
            ``samples``: dims ``("sample", *lead, y, x)``, an ``ensemble``
            attribute and the history line naming ``N`` and the seed.

        Raises
        ------
        KeyError
            If a model input is missing (the message lists what is there).
        ValueError
            For a variable without the spatial dims; for data outside the
            training domain of a model with stored climatologies or static
            fields (the message says so); `xorbit.units.UnitsError` (a
            ValueError) for missing or incompatible units; for ``samples``
            with a model without dropout (``drop_rate`` and ``drop_path`` 0).

        Notes
        -----
        Inputs whose latitude (or longitude) runs the other way from the
        training grid are flipped to match and the result flipped back; a grid
        spacing more than 1.5 times off the training spacing warns
        (`xorbit.accessor.GridWarning`).  An unnamed DataArray is taken as the
        model's one non-static input; with several, name it.
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
            precision=precision,
            samples=samples,
            seed=seed,
            constrain=constrain,
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

    def to_netcdf(self, path, *, complevel: int = 4, keepbits: int | str | None = None, **cf: Any):
        """Write CF-compliant, compressed netCDF atomically (see `xorbit.io.to_netcdf`).

        ``keepbits``: ``None`` (lossless), an int in 0..23 (mantissa bits kept), or
        ``"auto"`` (the bits keeping 99 % of each variable's information; xbitinfo).
        """
        from .io import to_netcdf

        return to_netcdf(self._obj, path, complevel=complevel, keepbits=keepbits, **cf)

    def to_zarr(self, store, *, level: int = 3, keepbits: int | str | None = None, **kwargs: Any):
        """Write CF-ready zarr, atomically and resumably (see `xorbit.io.to_zarr`).

        ``keepbits``: ``None``, an int in 0..23 or ``"auto"``, as for `to_netcdf`.
        """
        from .io import to_zarr

        return to_zarr(self._obj, store, level=level, keepbits=keepbits, **kwargs)


@xr.register_dataarray_accessor("orbit")
class OrbitDataArrayAccessor(_OrbitBase):
    """``DataArray.orbit``: downscaling and CF output for one variable."""


@xr.register_dataset_accessor("orbit")
class OrbitDatasetAccessor(_OrbitBase):
    """``Dataset.orbit``: downscaling and CF output for several variables."""
