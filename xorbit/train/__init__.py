"""`xorbit.train`: from coarse and fine xarray objects to a trained `Downscaler`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import xarray as xr

from .. import grid
from ..data import (
    COORDINATE_FIELDS,
    PairedCrops,
    as_dataset,
    compute_stats,
    coordinate_fields,
    find_variable,
    pair_arrays,
    split_time,
)
from ..downscaler import Downscaler
from ..engine import default_device
from ..model.config import ReslimConfig
from .loop import TrainOptions, fit, load_state, validate

__all__ = ["TrainOptions", "fit", "load_state", "train", "validate"]

_CF_ATTRS = ("standard_name", "long_name", "units", "cell_methods")


def _var_names(obj: xr.DataArray | xr.Dataset) -> list[str]:
    if isinstance(obj, xr.DataArray):
        return [str(obj.name or "var")]
    return [str(v) for v in obj.data_vars]


def _resolve(obj: xr.DataArray | xr.Dataset, name: str, names) -> xr.DataArray | None:
    """``name`` in ``obj`` by name then standard_name; a DataArray is one of ``names``."""
    return find_variable(as_dataset(obj, list(names)), name)


def train(
    coarse: xr.DataArray | xr.Dataset,
    fine: xr.DataArray | xr.Dataset,
    config: ReslimConfig | None = None,
    *,
    epochs: int = 10,
    batch_size: int | None = None,
    client: Any = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | bool | None = None,
    val_fraction: float = 0.2,
    crop: Sequence[int] | None = None,
    crops_per_time: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    device: str | None = None,
    nonnegative: Sequence[str] = (),
    progress: bool = True,
    time_dim: str = "time",
    stop_after: int | None = None,
    **options: Any,
) -> Downscaler:
    """Train a Reslim downscaler on paired coarse and fine fields.

    Parameters
    ----------
    coarse, fine
        The same cells at two resolutions: the fine grid must be the coarse grid
        split ``config.factor`` times (`xorbit.data.coarsen` makes such a coarse
        field from a fine one).  Variables are found by name, then by CF
        ``standard_name``; inputs named in `xorbit.data.COORDINATE_FIELDS` are
        made from the coordinates.
    config
        The model; default ``ReslimConfig.preset("tiny")`` over the variables.
    epochs, batch_size, lr
        Training length, global batch size (default ``config.batch_size``) and
        peak learning rate (default ``config.lr``).
    client
        A ``distributed.Client``: run one DDP rank per worker.
    checkpoint_dir
        Where ``state.pt`` and ``model.xorbit`` are written after every epoch.
    resume
        A checkpoint directory (or ``True`` for ``checkpoint_dir``) to continue.
    val_fraction
        The last part of the time axis held out for validation.
    crop, crops_per_time
        Coarse crop size (default ``config.img_size``) and random crops per time
        step and epoch (default: as many as tile the grid).
    seed
        Makes the run deterministic (initialisation, crops, order).
    device
        ``"cpu"`` or ``"cuda"``; default CUDA when visible.
    nonnegative
        Output variables clamped at zero when downscaling (precipitation).
    stop_after
        Stop after this epoch as if the run were killed there (checkpoints
        included); for testing resumption.
    **options
        Other `TrainOptions` fields (``tv_lambda``, ``weight_decay``, ...).

    Returns
    -------
    The trained `Downscaler`; ``downscaler.history`` holds the per-epoch losses
    and validation RMSEs (model and bicubic, physical units).
    """
    if config is None:
        names = _var_names(fine)
        config = ReslimConfig.preset("tiny", in_vars=names, out_vars=names)
    if time_dim in coarse.dims:
        n_time = coarse.sizes[time_dim]
    else:
        n_time = 1
    train_idx, val_idx = split_time(n_time, val_fraction if n_time > 1 else 0.0)

    # statistics from the training period only, computed lazily with dask
    ydim, xdim = grid.spatial_dims(coarse)
    stat_arrays = {}
    coord_vars = coordinate_fields(coarse, config.in_vars, ydim, xdim)
    for name in config.in_vars:
        var = coord_vars.get(name)
        if var is None:
            var = _resolve(coarse, name, config.out_vars)
            if var is None:
                raise KeyError(
                    f"input variable {name!r} is not in the coarse data "
                    f"(has {_var_names(coarse)}; coordinate fields: {list(COORDINATE_FIELDS)})"
                )
            if time_dim in var.dims:
                var = var.isel({time_dim: train_idx})
        stat_arrays[name] = var
    mean, std = compute_stats(stat_arrays)
    units = {n: stat_arrays[n].attrs.get("units") for n in config.in_vars}
    attrs = {}
    for name in config.out_vars:
        src = _resolve(fine, name, config.out_vars)
        if src is not None:
            attrs[name] = {a: src.attrs[a] for a in _CF_ATTRS if a in src.attrs}

    data = pair_arrays(coarse, fine, config.in_vars, config.out_vars, config.factor, mean, std)
    dsr = Downscaler.from_config(
        config,
        seed=seed,
        mean=mean,
        std=std,
        units=units,
        attrs=attrs,
        nonnegative=list(nonnegative),
    )
    crop = tuple(crop) if crop is not None else tuple(config.img_size)
    h, w = data.coarse.shape[-2:]
    if crops_per_time is None:
        crops_per_time = max(1, (h // min(crop[0], h)) * (w // min(crop[1], w)))
    crops = PairedCrops(data.select(train_idx), crop, config.factor, crops_per_time, seed)
    val = data.select(val_idx) if len(val_idx) else None
    opts = TrainOptions(
        epochs=int(epochs),
        batch_size=int(batch_size or config.batch_size),
        lr=float(lr or config.lr),
        weight_decay=config.weight_decay,
        warmup_epochs=config.warmup_epochs,
        tv_lambda=config.tv_lambda,
        seed=seed,
        device=device or default_device(),
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        progress=progress,
        **options,
    )
    state = None
    if resume:
        where = checkpoint_dir if resume is True else resume
        if where is None:
            raise ValueError("resume=True needs checkpoint_dir")
        state = load_state(where)
        if state.get("config") != config.to_dict():
            raise ValueError(
                f"cannot resume from {str(where)!r}: it was trained with another config"
            )
    if client is not None:
        from .distributed import fit_distributed

        history, weights = fit_distributed(
            client, dsr, crops, val, opts, resume=state, stop_after=stop_after
        )
        dsr.model.load_state_dict(weights)
        dsr.model.eval()
    else:
        history = fit(dsr, crops, val, opts, resume=state, stop_after=stop_after)
    dsr.history = history
    return dsr
