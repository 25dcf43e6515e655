"""The steps of `xorbit.train`, one function each, with dataclass records between them.

``train`` reads as the sequence::

    prepared = prepare_pairs(...)        # variables, static fields, transforms, units, split
    stats = statistics(prepared, ...)    # climatologies, then mean and std of the training years
    sets = paired_arrays(prepared, stats)  # normalized arrays (in memory or streamed)
    window = training_window(sets, crop)
    dsr = build_downscaler(...)          # a new model, or one from pretrained weights
    parts = plan_crops(...)              # crops per time step, augmentation
    state = resume_state(...)            # a checkpoint to continue, checked
    history = run_training(...)          # the linear path, the gate, the network

Each step takes what the one before it returned and can be called (and
tested) alone.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from .. import fields, grid
from .. import transforms as _transforms
from ..downscaler import Downscaler, training_grid
from ..model.config import ReslimConfig
from ..model.constraints import block_mean
from ..ridge import LOCAL_HALF, WHOLE_DOMAIN_MAX, whole_affordable
from ..units import convert, to_model_units
from ..variables import as_dataset, gather
from . import finetune, linear, loop
from .samples import CropMix, PairedArrays, PairedCrops, compute_stats, in_memory, pair_arrays
from .samples import split_time as _split_time
from .static import static_inputs

__all__ = [
    "CELL_AVERAGE_STEPS",
    "CELL_AVERAGE_TOLERANCE",
    "MIN_AUGMENTED_DRAWS",
    "Prepared",
    "PreparedPair",
    "Statistics",
    "build_downscaler",
    "paired_arrays",
    "plan_crops",
    "prepare_pairs",
    "resume_state",
    "run_training",
    "statistics",
    "training_window",
]

# Draws of each time step per epoch, at least, when amplitude augmentation is on.
MIN_AUGMENTED_DRAWS = 4
# A coarse field whose RMS difference from the fine field's block means is at
# most this fraction of its spread is a cell average (float32 round-off of
# `xorbit.coarsen` is ~1e-7); read on this many time steps.
CELL_AVERAGE_TOLERANCE = 1e-3
CELL_AVERAGE_STEPS = 8
_CF_ATTRS = ("standard_name", "long_name", "units", "cell_methods")


@dataclass
class PreparedPair:
    """One coarse/fine pair as the model sees it (found, transformed, in model units).

    ``coarse``, ``fine``: the datasets with every input and output under its
    model name; ``inputs``, ``targets``: those variables; ``dims``: the coarse
    grid's (y, x); ``train_idx``, ``val_idx``: the time split; ``res_km``: the
    coarse spacing (``None`` where the coordinates carry no units).
    """

    coarse: xr.Dataset
    fine: xr.Dataset
    dims: tuple[Hashable, Hashable]
    inputs: dict[str, xr.DataArray]
    targets: dict[str, xr.DataArray]
    n_time: int
    train_idx: np.ndarray
    val_idx: np.ndarray
    res_km: float | None


@dataclass
class Prepared:
    """Every pair, and what the first one decides for all (`prepare_pairs`).

    ``config``: the model's config with the static inputs added and its own
    spacing (``res_km``); ``units``: the inputs' units (every pair is converted
    to them); ``static``, ``static_packing``, ``static_channels``: the stored
    static fields, their grids and the input channels made from them;
    ``cell_average_error``: per output, how far its coarse field is from the
    cell average of the fine one (`cell_average_error`); ``attrs``: the
    outputs' CF attributes.
    """

    pairs: list[PreparedPair]
    config: ReslimConfig
    units: dict[str, Any]
    transforms: dict[str, str]
    static: dict[str, xr.DataArray] = field(default_factory=dict)
    static_packing: dict[str, str] = field(default_factory=dict)
    static_channels: xr.Dataset | None = None
    cell_average_error: dict[str, float] = field(default_factory=dict)
    attrs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def multi(self) -> bool:
        """Several grids train one model."""
        return len(self.pairs) > 1


@dataclass
class Statistics:
    """Normalization (``mean``, ``std`` per input and output) and per-pixel climatologies."""

    mean: dict[str, float]
    std: dict[str, float]
    input_climatology: dict[str, xr.DataArray] = field(default_factory=dict)
    output_climatology: dict[str, xr.DataArray] = field(default_factory=dict)


# ----------------------------------------------------------------- step 1: pairs
def prepare_pairs(
    pairs: Sequence[tuple[Any, Any]],
    config: ReslimConfig,
    *,
    static: xr.Dataset | None = None,
    transforms: Mapping[str, str] | None = None,
    val_fraction: float = 0.0,
    time_dim: Hashable = "time",
    multi: bool | None = None,
) -> Prepared:
    """Find every variable of every pair, add the static inputs, transform, convert, split.

    ``transforms``: checked ones (`xorbit.transforms.check`).  ``multi``: the
    pairs were given as lists (names the pair in errors); default: several.
    """
    transforms = dict(transforms or {})
    multi = len(pairs) > 1 if multi is None else multi
    dynamic = [v for v in config.in_vars if v not in config.static_vars]
    first = as_dataset(pairs[0][0], config.in_vars, candidates=dynamic)
    stored, packing, channels, config = static_inputs(static, first, config)
    prepared = Prepared([], config, {}, transforms, stored, packing, channels)
    for i, (c, f) in enumerate(pairs):
        where = f" of pair {i}" if multi else ""
        prepared.pairs.append(
            _prepare_pair(
                prepared, c, f, where, first=i == 0, val_fraction=val_fraction, time_dim=time_dim
            )
        )
    if multi and any(p.res_km is None for p in prepared.pairs):
        raise ValueError(
            "training on several grids needs each grid's spacing in km: give the spatial "
            "coordinates units (degrees_north / degrees_east, m or km)"
        )
    if prepared.pairs[0].res_km is not None:
        # the model's own spacing: its resolution embedding reads spacings
        # relative to it (`ReslimConfig.res_embed`)
        prepared.config = config.replace(res_km=float(prepared.pairs[0].res_km))
    prepared.attrs = {
        name: {a: var.attrs[a] for a in _CF_ATTRS if a in var.attrs}
        for name, var in prepared.pairs[0].targets.items()
    }
    return prepared


def _prepare_pair(
    prepared: Prepared, c: Any, f: Any, where: str, *, first: bool, val_fraction: float, time_dim
) -> PreparedPair:
    """One pair: found by name, the first pair's cell-average check and units."""
    config = prepared.config
    dynamic = [v for v in config.in_vars if v not in config.static_vars]
    cds = as_dataset(c, config.in_vars, candidates=dynamic)
    fds = as_dataset(f, config.out_vars)
    ydim, xdim = grid.spatial_dims(cds)
    fy, fx = grid.spatial_dims(fds)
    found = gather(
        [cds, prepared.static_channels],
        config.in_vars,
        ydim=ydim,
        xdim=xdim,
        where=f"the coarse data{where}",
    )
    targets = gather(
        [fds], config.out_vars, ydim=fy, xdim=fx, role="output", where=f"the fine data{where}"
    )
    given_found, given_targets = dict(found), dict(targets)
    if first:
        # which outputs' coarse fields are cell averages of their fine ones:
        # coarse-consistency constraints are right for those only
        prepared.cell_average_error = {
            v: cell_average_error(
                found[v], targets[v], (ydim, xdim), (fy, fx), config.factor, time_dim
            )
            for v in config.out_vars
        }
    for name, kind in prepared.transforms.items():
        # in the transform's units (mm/day), then into model space
        for role in (found, targets):
            if name in role:
                var = _transforms.to_transform_units(role[name], kind, name)
                role[name] = _transforms.forward(var, kind)
    if first:
        prepared.units = {n: found[n].attrs.get("units") for n in config.in_vars}
    else:  # the first pair's units for every pair
        found = to_model_units(found, prepared.units)
        targets = to_model_units(targets, {v: prepared.units.get(v) for v in config.out_vars})
    n_time = c.sizes[time_dim] if time_dim in c.dims else 1
    train_idx, val_idx = _split_time(n_time, val_fraction if n_time > 1 else 0.0)
    return PreparedPair(
        # the data as the model sees them, for `pair_arrays` to find by name
        coarse=cds.assign({n: v for n, v in found.items() if v is not given_found[n]}),
        fine=fds.assign({n: v for n, v in targets.items() if v is not given_targets[n]}),
        dims=(ydim, xdim),
        inputs=found,
        targets=targets,
        n_time=n_time,
        train_idx=train_idx,
        val_idx=val_idx,
        res_km=grid.spacing_km(cds, ydim, xdim),  # as `pair_arrays` records it
    )


def cell_average_error(
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


# ------------------------------------------------------------ step 2: statistics
def statistics(
    prepared: Prepared, *, climatology: bool = True, client: Any = None, time_dim: Hashable = "time"
) -> Statistics:
    """Climatologies (every time step given) and normalization (the training years only).

    Data in files are reduced chunk by chunk with Dask (on ``client``'s
    cluster when given), never loaded whole here.  Inputs with a climatology
    are centred on it (normalized zero is the climatology, which amplitude
    augmentation scales about).
    """
    config = prepared.config
    dynamic = [v for v in config.in_vars if v not in config.static_vars]
    stats = Statistics({}, {})
    moments = []
    with client.as_current() if client is not None else contextlib.nullcontext():
        for p in prepared.pairs:
            lazy_found = {n: _chunked(a, time_dim) for n, a in p.inputs.items()}
            if climatology:  # one pair only (`xorbit.training._pairs`)
                # per-pixel means over every time step given (validation years
                # included: the climatology is part of the model, not a score)
                every = range(p.n_time)
                lazy_targets = {n: _chunked(a, time_dim) for n, a in p.targets.items()}
                stats.input_climatology = {
                    v: fields.climatology(lazy_found[v], time_dim, every) for v in dynamic
                }
                stats.output_climatology = {
                    v: fields.climatology(lazy_targets[v], time_dim, every) for v in config.out_vars
                }
                clim = stats.input_climatology
                lazy_found = {n: (a - clim[n]) if n in clim else a for n, a in lazy_found.items()}
            t0, t1 = int(p.train_idx[0]), int(p.train_idx[-1]) + 1
            stat_arrays = {
                # a slice, not an index array: Dask takes it without a shuffle
                name: var.isel({time_dim: slice(t0, t1)}) if time_dim in var.dims else var
                for name, var in lazy_found.items()
            }
            moments.append((*compute_stats(stat_arrays), t1 - t0))
    stats.mean, stats.std = pooled(moments)
    for v in stats.input_climatology:
        stats.mean[v] = 0.0
    return stats


def pooled(
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


# ---------------------------------------------------------------- step 3: arrays
def paired_arrays(
    prepared: Prepared, stats: Statistics, *, time_dim: Hashable = "time", load: bool | None = None
) -> list[PairedArrays]:
    """Each pair's normalized anomalies (`pair_arrays`): in memory, or read sample by sample."""
    config = prepared.config
    return [
        pair_arrays(
            p.coarse,
            p.fine,
            config.in_vars,
            config.out_vars,
            config.factor,
            stats.mean,
            stats.std,
            time_dim=time_dim,
            static_vars=config.static_vars,
            static=prepared.static_channels,
            input_climatology=stats.input_climatology,
            output_climatology=stats.output_climatology,
            load=load,
        )
        for p in prepared.pairs
    ]


def training_window(
    sets: Sequence[PairedArrays], crop: Sequence[int] | None, config: ReslimConfig
) -> tuple[int, int]:
    """The coarse windows training sees: ``crop`` (default ``config.img_size``), at most the grid."""
    crop = tuple(crop) if crop is not None else tuple(config.img_size)
    h = min(d.coarse.shape[-2] for d in sets)
    w = min(d.coarse.shape[-1] for d in sets)
    return (min(int(crop[0]), h), min(int(crop[1]), w))


# ----------------------------------------------------------------- step 4: model
def build_downscaler(
    prepared: Prepared,
    stats: Statistics,
    window: tuple[int, int],
    *,
    seed: int = 0,
    nonnegative: Sequence[str] = (),
    linear_path: bool = True,
    init: finetune.Pretrained | None = None,
    freeze: str | Sequence[str] | None = None,
    pretrained_lr_scale: float = 1.0,
) -> Downscaler:
    """A `Downscaler` for the prepared data: normalization, climatologies, static
    fields, transforms, the grid it was trained on and its coarse-consistency constraints.

    The network is new (seeded), or starts from ``init``'s weights
    (`xorbit.training.finetune`): those ``freeze`` names are fixed, and the
    record goes to ``provenance``.
    """
    config, first = prepared.config, prepared.pairs[0]
    if init is not None:
        # a new spacing is read relative to the pretrained model's own
        config = config.replace(res_km=init.config.res_km)
    if linear_path and not prepared.multi and config.linear_window is None:
        config = config.replace(linear_window=window, linear_half=linear_half(config, window))
    first_y, first_x = (first.coarse[d] for d in first.dims)
    transforms = prepared.transforms
    dsr = Downscaler.from_config(
        config,
        seed=seed,
        mean=stats.mean,
        std=stats.std,
        units=prepared.units,
        attrs=prepared.attrs,
        nonnegative=sorted({*nonnegative, *(v for v in transforms if v in config.out_vars)}),
        grid=training_grid(first_y, first_x, multi_resolution=prepared.multi),
        input_climatology=stats.input_climatology,
        output_climatology=stats.output_climatology,
        static=prepared.static,
        static_packing=prepared.static_packing,
        transforms=transforms,
    )
    describe_training(dsr, prepared, window)
    if init is not None:
        status = finetune.transfer(init.model, dsr.model)
        frozen = finetune.frozen_names(status, freeze)
        dsr.provenance = finetune.provenance(init, status, frozen, freeze, pretrained_lr_scale)
    elif freeze is not None:
        raise ValueError("freeze= fixes pretrained weights: it needs init=")
    return dsr


def describe_training(dsr: Downscaler, prepared: Prepared, window: tuple[int, int]) -> None:
    """Record in ``dsr.grid`` what the data say: cell averages (and so the
    constraints), the grids' spacing and the training window."""
    errors = prepared.cell_average_error
    dsr.grid["cell_average"] = {v: bool(e <= CELL_AVERAGE_TOLERANCE) for v, e in errors.items()}
    for v, kind in dsr.constraint_kinds().items():
        # measured on HadCM3 (docs/training.md): additive helps temperature too
        if dsr.grid["cell_average"][v]:
            dsr.constraints[v] = kind
        elif v in dsr.nonnegative:
            warnings.warn(
                f"the coarse {v!r} is not the cell average of the fine one (they differ by "
                f"{errors[v]:.3g} of the coarse field's spread): no coarse-consistency "
                "constraint (its totals are not kept when downscaling)",
                UserWarning,
                stacklevel=4,
            )
    if prepared.pairs[0].res_km is not None:
        # the resolution embedding reads the grid's spacing (older models: a constant)
        spacings = [float(p.res_km) for p in prepared.pairs if p.res_km is not None]
        dsr.grid["res_km"] = spacings if prepared.multi else spacings[0]
    dsr.grid["window"] = list(window)


def linear_half(config: ReslimConfig, window: tuple[int, int]) -> int | None:
    """The linear path's predictors: every cell of a window whose whole-grid map is
    affordable (on more than `WHOLE_DOMAIN_MAX` cells, `fit_linear_path` then
    lets the cross-validation choose between it and the neighbours), else each
    cell's neighbours."""
    cells = window[0] * window[1]
    n_dyn = len([v for v in config.in_vars if v not in config.static_vars])
    q = len(config.out_vars) * config.factor**2
    return None if cells <= WHOLE_DOMAIN_MAX or whole_affordable(cells, n_dyn, q) else LOCAL_HALF


# ----------------------------------------------------------------- step 5: crops
def plan_crops(
    sets: Sequence[PairedArrays],
    prepared: Prepared,
    stats: Statistics,
    window: tuple[int, int],
    opts: loop.TrainOptions,
    *,
    crops_per_time: int | None = None,
    samples_per_epoch: int | None = None,
    seed: int = 0,
) -> list[PairedCrops]:
    """Each pair's training crops: how many per time step, and their augmentation."""
    if opts.augment not in ("auto", "scale", "none"):
        raise ValueError(f"augment must be 'auto', 'scale' or 'none', got {opts.augment!r}")
    clim_in = stats.input_climatology
    if opts.augment == "scale" and not clim_in:
        raise ValueError(
            "augment='scale' scales anomalies about their climatology: it needs climatology=True"
        )
    scaling = opts.augment == "scale" or (opts.augment == "auto" and bool(clim_in))
    config = prepared.config
    parts = []
    for data, p in zip(sets, prepared.pairs, strict=True):
        per_time = crops_per_time
        if per_time is None:
            ny, nx = data.coarse.shape[-2:]
            per_time = max(1, (ny // window[0]) * (nx // window[1]))
            if scaling:
                # every draw has its own amplitude: a small set gains from several per epoch
                per_time = max(per_time, MIN_AUGMENTED_DRAWS)
        parts.append(
            PairedCrops(
                data.select(p.train_idx),
                window,
                config.factor,
                per_time,
                seed,
                scale=_pair(opts.augment_scale) if scaling else None,
                scaled=[config.in_vars.index(v) for v in clim_in],
                mix=_pair(opts.augment_mix) if scaling and opts.augment_mix else None,
                samples=samples_per_epoch,
            )
        )
    return parts


def _pair(values: Sequence[float]) -> tuple[float, float]:
    """``(lo, hi)`` of an option that a YAML file may give as a list."""
    lo, hi = values
    return float(lo), float(hi)


# ---------------------------------------------------------------- step 6: resume
def resume_state(
    resume: Any,
    checkpoint_dir: Any,
    config: ReslimConfig,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The training state to continue (`loop.load_state`), checked against ``config``
    and, for a fine-tuning run, its ``provenance`` (the optimizer's groups)."""
    if not resume:
        return None
    resume_from = checkpoint_dir if resume is True else resume
    if resume_from is None:
        raise ValueError("resume=True needs checkpoint_dir")
    state = loop.load_state(resume_from)
    # the architecture must match; training options (a new lr ...) may change
    saved = ReslimConfig.from_dict(state.get("config", {})).to_dict()
    if saved != config.to_dict():
        diff = sorted(k for k in saved if saved[k] != config.to_dict().get(k))
        raise ValueError(
            f"cannot resume from {str(resume_from)!r}: it was trained with another model "
            f"architecture (differs in {diff})"
        )
    groups = state.get("optimizer_groups") or len(
        state.get("optimizer", {}).get("param_groups", [None])
    )
    expected = 2 if (provenance or {}).get("pretrained") else 1
    if groups != expected:
        raise ValueError(
            f"cannot resume from {str(resume_from)!r}: "
            + (
                "it was fine-tuned from a pretrained model: pass the same init= to resume"
                if groups > expected
                else "it was trained from scratch: resume it without init="
            )
        )
    return state


# ------------------------------------------------------------------ step 7: fit
def run_training(
    dsr: Downscaler,
    parts: Sequence[PairedCrops],
    sets: Sequence[PairedArrays],
    prepared: Prepared,
    opts: loop.TrainOptions,
    *,
    client: Any = None,
    state: dict[str, Any] | None = None,
    stop_after: int | None = None,
) -> list[dict[str, float]]:
    """Fit the linear path, then train the network (in this process or one DDP rank per
    worker of ``client``), gated where it can be; returns the history."""
    multi = prepared.multi
    has_linear = dsr.config.linear_window is not None and not multi
    vals = [
        d.select(p.val_idx) for d, p in zip(sets, prepared.pairs, strict=True) if len(p.val_idx)
    ]
    val = (vals or None) if multi else (vals[0] if vals else None)
    run = _runner(dsr, client, state)
    # the gate decides on held-out years of its own: not with a validation
    # set of the caller's, and not across checkpoints (a run in two parts)
    plain = val is not None or state is not None or stop_after is not None or opts.checkpoint_dir
    # and not for an ensemble: a gate shut on the central member's RMSE would
    # leave members without spread.  Too few years to decide on: no path,
    # whether the gate would run or not
    short = has_linear and opts.gate and linear.too_short(len(parts[0].data))
    if has_linear and opts.gate and not plain and not opts.ensemble and not short:
        # fits the path itself, on its own split of the training years
        return linear.fit_gated(dsr, parts[0], parts[0].data, opts, run)
    crops = parts[0] if not multi else CropMix(list(parts))
    if short:
        dsr.model.linear.clear()
    elif has_linear:
        # closed form, on the training years: the network then trains on what it leaves
        linear.fit_linear_path(dsr.model, parts[0].data, floors=dsr.nonnegative)
        # ... or on what a path that has not seen each year leaves (cross_fit),
        # the dry pixels it already predicts dry left alone
        crops = copy.copy(parts[0])
        crops.data = linear.network_targets(
            dsr.model, parts[0].data, opts.cross_fit, dsr.nonnegative
        )
    return run(crops, val, opts, stop_after)


def _runner(dsr: Downscaler, client: Any, state: dict[str, Any] | None) -> Callable[..., list]:
    """``run(crops, val, opts, stop_after) -> history``: `loop.fit` here, or over DDP ranks."""

    def run(crops: Any, val: Any, opts: loop.TrainOptions, stop: int | None) -> list:
        if client is None:
            return loop.fit(dsr, crops, val, opts, resume=state, stop_after=stop)
        from .distributed import fit_distributed

        history, weights = fit_distributed(
            client, dsr, crops, val, opts, resume=state, stop_after=stop
        )
        dsr.model.load_state_dict(weights)
        dsr.model.eval()
        return history

    return run
