"""`xorbit.train`: from coarse and fine xarray objects to a trained `Downscaler`."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import xarray as xr

from .. import fields, grid
from .. import transforms as _transforms
from ..downscaler import Downscaler, training_grid
from ..engine import default_device
from ..model.config import ReslimConfig
from ..model.constraints import block_mean
from ..ridge import LOCAL_HALF, WHOLE_DOMAIN_MAX
from ..units import convert, to_model_units
from ..variables import as_dataset, gather, var_names
from .linear import fit_gated, fit_linear_path
from .loop import TrainOptions, fit, load_state, validate
from .samples import CropMix, PairedCrops, compute_stats, in_memory, pair_arrays, split_time

__all__ = ["TrainOptions", "fit", "load_state", "train", "validate"]

# Draws of each time step per epoch, at least, when amplitude augmentation is on.
MIN_AUGMENTED_DRAWS = 4

_CF_ATTRS = ("standard_name", "long_name", "units", "cell_methods")
# A coarse field whose RMS difference from the fine field's block means is at
# most this fraction of its spread is a cell average (float32 round-off of
# `xorbit.coarsen` is ~1e-7); read on this many time steps.
CELL_AVERAGE_TOLERANCE = 1e-3
CELL_AVERAGE_STEPS = 8


def train(
    coarse: xr.DataArray | xr.Dataset | Sequence[xr.DataArray | xr.Dataset],
    fine: xr.DataArray | xr.Dataset | Sequence[xr.DataArray | xr.Dataset],
    config: ReslimConfig | None = None,
    *,
    epochs: int = 10,
    batch_size: int | None = None,
    client: Any = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | bool | None = None,
    val_fraction: float = 0.0,
    crop: Sequence[int] | None = None,
    crops_per_time: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    device: str | None = None,
    nonnegative: Sequence[str] = (),
    progress: bool = True,
    time_dim: str = "time",
    stop_after: int | None = None,
    climatology: bool = True,
    static: xr.Dataset | None = None,
    samples_per_epoch: int | None = None,
    transforms: dict[str, str] | None = None,
    **options: Any,
) -> Downscaler:
    """Train a Reslim downscaler on paired coarse and fine fields.

    Parameters
    ----------
    coarse, fine
        The same cells at two resolutions: the fine grid must be the coarse grid
        split ``config.factor`` times (`xorbit.coarsen` makes such a coarse
        field from a fine one).  Variables are found by name, then by CF
        ``standard_name``; inputs named in `xorbit.variables.COORDINATE_FIELDS` are
        made from the coordinates.  NumPy-, Dask- or file-backed (``xr.open_zarr``):
        statistics and climatologies are computed with Dask (on ``client``'s
        cluster when given), and data not already in memory and larger than
        `xorbit.training.samples.IN_MEMORY_BYTES` are never loaded whole: each
        process (each DDP rank) reads its own samples from the store, a few
        batches ahead in a background thread (``in_memory=`` and ``prefetch=``
        options).  Chunk such a store so that one chunk holds about one crop.

        Lists of pairs (``[coarse_a, coarse_b], [fine_a, fine_b]``) train one
        model on several grids, e.g. two resolutions: each sample's resolution
        embedding gets its grid's spacing (`xorbit.grid.spacing_km`), which
        needs ``climatology=False`` and no ``static=`` (both are per-pixel
        fields of one grid); statistics are pooled over the pairs.
    config
        The model; default ``ReslimConfig.preset("tiny")`` over the variables.
    epochs, batch_size, lr
        Training length, global batch size and peak learning rate (defaults:
        the preset's, `TrainOptions.for_config`).
    client
        A ``distributed.Client``: run one DDP rank per worker.
    checkpoint_dir
        Where ``state.pt`` and ``model.xorbit`` are written after every epoch.
    resume
        A checkpoint directory (or ``True`` for ``checkpoint_dir``) to continue.
    val_fraction
        The last part of the time axis held out for validation (default none:
        the last years are the most informative for a warming climate, and
        keeping them for training wins over early stopping; see
        docs/training.md).  With validation, the weights of the best epoch
        are kept (``keep_best``).
    crop, crops_per_time
        Coarse crop size (default ``config.img_size``, or the whole grid when
        smaller) and random crops per time step and epoch (default: as many as
        tile the grid, at least 4 with amplitude augmentation, each with its
        own amplitude).
    samples_per_epoch
        Random samples (time step and crop) drawn per epoch; default: every
        time step ``crops_per_time`` times.  For sets too large to go through
        every epoch.
    seed
        Makes the run deterministic (initialisation, crops, order).
    device
        ``"cpu"`` or ``"cuda"``; default CUDA when visible.
    nonnegative
        Output variables clamped at zero when downscaling (precipitation).
    stop_after
        Stop after this epoch as if the run were killed there (checkpoints
        included); for testing resumption.
    climatology
        Work on anomalies (default): each dynamic input and each output loses
        its per-pixel mean over every time step given (validation years
        included: the mean is part of the model) before normalization, so
        the loss sees the anomalies rather than the fixed large-scale pattern.
        The means are stored in the `Downscaler` and put back when
        downscaling, which then works inside the training domain only.
    static
        Time-invariant fields (orography, land-sea mask, ...) on the coarse or
        the fine grid.  Fields the config does not name are added to it as
        static inputs; a fine field becomes ``factor²`` coarse channels
        ``name[i,j]`` (space-to-depth).  They are stored in the `Downscaler`, so
        downscaling inside their domain needs nothing more.
    transforms
        Variables to train in a transformed space, ``{"pr": "log1p"}``
        (`xorbit.transforms`): values at or below 0.25 mm/day become zero,
        then ``log1p`` of mm/day (the data are converted with pint first).
        Stored in the `Downscaler`: ``.orbit.downscale`` applies the inverse
        (``expm1``), so results are in the input's units and never negative;
        transformed outputs are non-negative.  Validation RMSEs of such a
        variable are in model (log) space.
    **options
        Other `TrainOptions` fields (``tv_lambda``, ``weight_decay``, ...);
        ``options=TrainOptions(...)`` passes them all at once.

    Returns
    -------
    Downscaler
        The trained `Downscaler`; ``downscaler.history`` holds the per-epoch losses
        and validation RMSEs (model and bicubic, physical units).
    """
    multi = isinstance(coarse, (list, tuple))
    pairs = _pairs(coarse, fine, multi, climatology, static)
    if config is None:
        names = var_names(pairs[0][1])
        config = ReslimConfig.preset("tiny", in_vars=names, out_vars=names)
    base = options.pop("options", None) or TrainOptions.for_config(config)
    opts = base.replace(
        epochs=int(epochs),
        seed=seed,
        device=device or default_device(),
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        progress=progress,
        **({"lr": float(lr)} if lr is not None else {}),
        **({"batch_size": int(batch_size)} if batch_size is not None else {}),
        **options,
    )
    transforms = _transforms.check(transforms, [*config.in_vars, *config.out_vars])
    fixed = sorted(set(transforms) & set(config.static_vars))
    if fixed:
        raise ValueError(f"transforms name static variables {fixed}; transform dynamic ones only")

    dynamic = [v for v in config.in_vars if v not in config.static_vars]
    grids: list[dict[str, Any]] = []  # per pair: datasets, dims, variables, split
    for i, (c, f) in enumerate(pairs):
        cds = as_dataset(c, config.in_vars, candidates=dynamic)
        fds = as_dataset(f, config.out_vars)
        ydim, xdim = grid.spatial_dims(cds)
        if i == 0:
            stored, packing, channels, config = _static_inputs(static, cds, config)
        where = f" of pair {i}" if multi else ""
        found = gather(
            [cds, channels], config.in_vars, ydim=ydim, xdim=xdim, where=f"the coarse data{where}"
        )
        fy, fx = grid.spatial_dims(fds)
        targets = gather(
            [fds], config.out_vars, ydim=fy, xdim=fx, role="output", where=f"the fine data{where}"
        )
        given_found, given_targets = dict(found), dict(targets)
        if i == 0:
            # which outputs' coarse fields are cell averages of their fine ones:
            # coarse-consistency constraints are right for those only
            averaged = {
                v: _cell_average_error(
                    found[v], targets[v], (ydim, xdim), (fy, fx), config.factor, time_dim
                )
                for v in config.out_vars
            }
        for name, kind in transforms.items():
            # in the transform's units (mm/day), then into model space
            for role in (found, targets):
                if name in role:
                    var = _transforms.to_transform_units(role[name], kind, name)
                    role[name] = _transforms.forward(var, kind)
        if i == 0:
            units = {n: found[n].attrs.get("units") for n in config.in_vars}
        else:  # the first pair's units for every pair
            found = to_model_units(found, units)
            targets = to_model_units(targets, {v: units.get(v) for v in config.out_vars})
        # the data as the model sees them, for `pair_arrays` to find by name
        cds = cds.assign({n: v for n, v in found.items() if v is not given_found[n]})
        fds = fds.assign({n: v for n, v in targets.items() if v is not given_targets[n]})
        n_time = c.sizes[time_dim] if time_dim in c.dims else 1
        train_idx, val_idx = split_time(n_time, val_fraction if n_time > 1 else 0.0)
        grids.append(
            dict(
                cds=cds,
                fds=fds,
                dims=(ydim, xdim),
                found=found,
                targets=targets,
                n_time=n_time,
                train_idx=train_idx,
                val_idx=val_idx,
                res_km=grid.spacing_km(cds, ydim, xdim),  # as `pair_arrays` records it
            )
        )
    dynamic = [v for v in config.in_vars if v not in config.static_vars]
    if multi and any(g["res_km"] is None for g in grids):
        raise ValueError(
            "training on several grids needs each grid's spacing in km: give the spatial "
            "coordinates units (degrees_north / degrees_east, m or km)"
        )
    if grids[0]["res_km"] is not None:
        # the model's own spacing: its resolution embedding reads spacings
        # relative to it (`ReslimConfig.res_embed`)
        config = config.replace(res_km=float(grids[0]["res_km"]))
    clim_in: dict[str, xr.DataArray] = {}
    clim_out: dict[str, xr.DataArray] = {}
    moments = []
    # Dask computations inside run on the client's cluster, when there is one
    with client.as_current() if client is not None else contextlib.nullcontext():
        for g in grids:
            # data in files are reduced chunk by chunk with Dask, never loaded whole here
            lazy_found = {n: _chunked(a, time_dim) for n, a in g["found"].items()}
            if climatology:  # one pair only (`_pairs`)
                # per-pixel means over every time step given (validation years
                # included: the climatology is part of the model, not a score)
                every = range(g["n_time"])
                lazy_targets = {n: _chunked(a, time_dim) for n, a in g["targets"].items()}
                clim_in = {v: fields.climatology(lazy_found[v], time_dim, every) for v in dynamic}
                clim_out = {
                    v: fields.climatology(lazy_targets[v], time_dim, every) for v in config.out_vars
                }
                lazy_found = {
                    n: (a - clim_in[n]) if n in clim_in else a for n, a in lazy_found.items()
                }
            # statistics from the training period only
            t0, t1 = int(g["train_idx"][0]), int(g["train_idx"][-1]) + 1
            stat_arrays = {
                # a slice, not an index array: Dask takes it without a shuffle
                name: var.isel({time_dim: slice(t0, t1)}) if time_dim in var.dims else var
                for name, var in lazy_found.items()
            }
            moments.append((*compute_stats(stat_arrays), t1 - t0))
    mean, std = _pooled(moments)
    for v in clim_in:
        # anomalies are centred on their climatology: normalized zero is the
        # climatology, which amplitude augmentation scales about
        mean[v] = 0.0
    attrs = {
        name: {a: var.attrs[a] for a in _CF_ATTRS if a in var.attrs}
        for name, var in grids[0]["targets"].items()
    }

    sets = []
    for g in grids:
        data = pair_arrays(
            g["cds"],
            g["fds"],
            config.in_vars,
            config.out_vars,
            config.factor,
            mean,
            std,
            time_dim=time_dim,
            static_vars=config.static_vars,
            static=channels,
            input_climatology=clim_in,
            output_climatology=clim_out,
            load=opts.in_memory,
        )
        sets.append(data)
    first = grids[0]
    first_y, first_x = (first["cds"][d] for d in first["dims"])
    crop = tuple(crop) if crop is not None else tuple(config.img_size)
    h = min(d.coarse.shape[-2] for d in sets)
    w = min(d.coarse.shape[-1] for d in sets)
    # the windows training sees: downscaling a smaller grid warns
    window = (min(int(crop[0]), h), min(int(crop[1]), w))
    linear = opts.linear_path and not multi and config.linear_window is None
    if linear:
        config = config.replace(linear_window=window, linear_half=_linear_half(window))
    dsr = Downscaler.from_config(
        config,
        seed=seed,
        mean=mean,
        std=std,
        units=units,
        attrs=attrs,
        nonnegative=sorted({*nonnegative, *(v for v in transforms if v in config.out_vars)}),
        grid=training_grid(first_y, first_x, multi_resolution=multi),
        input_climatology=clim_in,
        output_climatology=clim_out,
        static=stored,
        static_packing=packing,
        transforms=transforms,
    )
    dsr.grid["cell_average"] = {v: bool(e <= CELL_AVERAGE_TOLERANCE) for v, e in averaged.items()}
    for v, kind in dsr.constraint_kinds().items():
        # measured on HadCM3 (docs/training.md): additive helps temperature too
        if dsr.grid["cell_average"][v]:
            dsr.constraints[v] = kind
        elif v in dsr.nonnegative:
            warnings.warn(
                f"the coarse {v!r} is not the cell average of the fine one (they differ by "
                f"{averaged[v]:.3g} of the coarse field's spread): no coarse-consistency "
                "constraint (its totals are not kept when downscaling)",
                UserWarning,
                stacklevel=2,
            )
    if first["res_km"] is not None:
        # the resolution embedding reads the grid's spacing (older models: a constant)
        spacings = [float(g["res_km"]) for g in grids]
        dsr.grid["res_km"] = spacings if multi else spacings[0]
    dsr.grid["window"] = list(window)
    crop = window
    if opts.augment not in ("auto", "scale", "none"):
        raise ValueError(f"augment must be 'auto', 'scale' or 'none', got {opts.augment!r}")
    if opts.augment == "scale" and not clim_in:
        raise ValueError(
            "augment='scale' scales anomalies about their climatology: it needs climatology=True"
        )
    scaling = opts.augment == "scale" or (opts.augment == "auto" and bool(clim_in))
    parts = []
    for data, g in zip(sets, grids, strict=True):
        per_time = crops_per_time
        if per_time is None:
            ny, nx = data.coarse.shape[-2:]
            per_time = max(1, (ny // crop[0]) * (nx // crop[1]))
            if scaling:
                # every draw has its own amplitude: a small set gains from several per epoch
                per_time = max(per_time, MIN_AUGMENTED_DRAWS)
        parts.append(
            PairedCrops(
                data.select(g["train_idx"]),
                crop,
                config.factor,
                per_time,
                seed,
                scale=tuple(opts.augment_scale) if scaling else None,
                scaled=[config.in_vars.index(v) for v in clim_in],
                mix=tuple(opts.augment_mix) if scaling and opts.augment_mix else None,
                samples=samples_per_epoch,
            )
        )
    has_linear = dsr.config.linear_window is not None and not multi
    if has_linear:
        # closed form, on the training years: the network then trains on what it leaves
        years = sets[0].select(grids[0]["train_idx"])
        fit_linear_path(dsr.model, years)
    crops = parts[0] if not multi else CropMix(parts)
    vals = [d.select(g["val_idx"]) for d, g in zip(sets, grids, strict=True) if len(g["val_idx"])]
    val = (vals or None) if multi else (vals[0] if vals else None)
    state = None
    if resume:
        resume_from = checkpoint_dir if resume is True else resume
        if resume_from is None:
            raise ValueError("resume=True needs checkpoint_dir")
        state = load_state(resume_from)
        # the architecture must match; training options (a new lr ...) may change
        saved = ReslimConfig.from_dict(state.get("config", {})).to_dict()
        if saved != config.to_dict():
            diff = sorted(k for k in saved if saved[k] != config.to_dict().get(k))
            raise ValueError(
                f"cannot resume from {str(resume_from)!r}: it was trained with another model "
                f"architecture (differs in {diff})"
            )

    def run(crops_: Any, val_: Any, opts_: TrainOptions, stop: int | None) -> list:
        if client is None:
            return fit(dsr, crops_, val_, opts_, resume=state, stop_after=stop)
        from .distributed import fit_distributed

        history, weights = fit_distributed(
            client, dsr, crops_, val_, opts_, resume=state, stop_after=stop
        )
        dsr.model.load_state_dict(weights)
        dsr.model.eval()
        return history

    # the gate decides on held-out years of its own: not with a validation
    # set of the caller's, and not across checkpoints (a run in two parts)
    plain = val is not None or state is not None or stop_after is not None or checkpoint_dir
    if has_linear and opts.gate and not plain:
        dsr.history = fit_gated(dsr, parts[0], years, opts, run)
    else:
        dsr.history = run(crops, val, opts, stop_after)
    return dsr


def _cell_average_error(
    coarse: xr.DataArray, fine: xr.DataArray, cdims, fdims, k: int, time_dim: Hashable
) -> float:
    """RMS of ``coarse`` minus the block means of ``fine``, over the spread of ``coarse``.

    Read on the first few time steps, in the coarse field's units (0 for a
    coarse field made with `xorbit.coarsen`).
    """
    steps = {time_dim: slice(0, CELL_AVERAGE_STEPS)}
    c = coarse.isel({d: s for d, s in steps.items() if d in coarse.dims})
    f = fine.isel({d: s for d, s in steps.items() if d in fine.dims})
    if c.attrs.get("units") and f.attrs.get("units") and c.attrs["units"] != f.attrs["units"]:
        f = convert(f, c.attrs["units"], str(fine.name))
    lead = [d for d in c.dims if d not in cdims]
    cv = np.asarray(c.transpose(*lead, *cdims).values, np.float64)
    fv = np.asarray(f.transpose(*[d for d in f.dims if d not in fdims], *fdims).values, np.float64)
    if fv.shape[:-2] != cv.shape[:-2]:
        return math.inf
    diff = cv - block_mean(fv, k)
    spread = float(np.nanstd(cv)) or 1.0
    return float(np.sqrt(np.nanmean(diff**2))) / spread


def _linear_half(window: tuple[int, int]) -> int | None:
    """The linear path's predictors: every cell of a small window, else each cell's neighbours."""
    return None if window[0] * window[1] <= WHOLE_DOMAIN_MAX else LOCAL_HALF


def _pairs(coarse, fine, multi: bool, climatology: bool, static) -> list[tuple[Any, Any]]:
    """``(coarse, fine)`` pairs: one, or one per grid when lists are given."""
    if not multi:
        if isinstance(fine, (list, tuple)):
            raise TypeError("fine is a list but coarse is not: give both as lists of pairs")
        return [(coarse, fine)]
    if not isinstance(fine, (list, tuple)) or len(fine) != len(coarse) or not coarse:
        raise ValueError(
            "coarse and fine must be lists of the same length (one pair per grid), got "
            f"{len(coarse)} coarse and {len(fine) if isinstance(fine, (list, tuple)) else 1} fine"
        )
    if len(coarse) > 1 and climatology:
        raise ValueError(
            "training on several grids needs climatology=False: a climatology is a per-pixel "
            "field of one grid"
        )
    if len(coarse) > 1 and static is not None:
        raise ValueError(
            "training on several grids takes no static=: static fields are stored on one grid"
        )
    return list(zip(coarse, fine, strict=True))


def _pooled(
    moments: Sequence[tuple[dict[str, float], dict[str, float], int]],
) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and std over several sets from each one's ``(mean, std, time steps)``.

    Weighted by time steps (the grids' sizes differ, but each step is one
    sample of the weather): the pooled variance is the weighted mean of the
    variances plus the variance of the means.
    """
    if len(moments) == 1:
        return dict(moments[0][0]), dict(moments[0][1])
    n = np.array([m[2] for m in moments], np.float64)
    w = n / n.sum()
    mean, std = {}, {}
    for name in moments[0][0]:
        means = np.array([m[0][name] for m in moments])
        var = np.array([m[1][name] ** 2 for m in moments])
        mean[name] = float(np.sum(w * means))
        std[name] = float(np.sqrt(np.sum(w * (var + (means - mean[name]) ** 2))))
    return mean, std


def _chunked(var: xr.DataArray, time_dim: Hashable) -> xr.DataArray:
    """``var`` as Dask when it lies in a file (opened without chunks): reductions
    then stream it instead of loading it whole.  Data in memory or already on
    Dask are returned as they are."""
    if in_memory(var) or var.chunks is not None:
        return var
    return var.chunk({time_dim: 1} if time_dim in var.dims else {})


def _static_inputs(
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
