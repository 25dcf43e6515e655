"""`xorbit.train`: from coarse and fine xarray objects to a trained `Downscaler`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import xarray as xr

from .. import grid
from ..downscaler import Downscaler, training_grid
from ..engine import default_device
from ..model.config import ReslimConfig
from ..variables import as_dataset, gather, var_names
from .loop import TrainOptions, fit, load_state, validate
from .samples import PairedCrops, compute_stats, pair_arrays, split_time

__all__ = ["TrainOptions", "fit", "load_state", "train", "validate"]

_CF_ATTRS = ("standard_name", "long_name", "units", "cell_methods")


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
        split ``config.factor`` times (`xorbit.coarsen` makes such a coarse
        field from a fine one).  Variables are found by name, then by CF
        ``standard_name``; inputs named in `xorbit.variables.COORDINATE_FIELDS` are
        made from the coordinates.
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
        Other `TrainOptions` fields (``tv_lambda``, ``weight_decay``, ...);
        ``options=TrainOptions(...)`` passes them all at once.

    Returns
    -------
    The trained `Downscaler`; ``downscaler.history`` holds the per-epoch losses
    and validation RMSEs (model and bicubic, physical units).
    """
    if config is None:
        names = var_names(fine)
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
    n_time = coarse.sizes[time_dim] if time_dim in coarse.dims else 1
    train_idx, val_idx = split_time(n_time, val_fraction if n_time > 1 else 0.0)

    # statistics from the training period only, computed lazily with dask
    dynamic = [v for v in config.in_vars if v not in config.static_vars]
    cds = as_dataset(coarse, config.in_vars, candidates=dynamic)
    fds = as_dataset(fine, config.out_vars)
    ydim, xdim = grid.spatial_dims(cds)
    found = gather([cds], config.in_vars, ydim=ydim, xdim=xdim, where="the coarse data")
    stat_arrays = {
        name: var.isel({time_dim: train_idx}) if time_dim in var.dims else var
        for name, var in found.items()
    }
    mean, std = compute_stats(stat_arrays)
    units = {n: stat_arrays[n].attrs.get("units") for n in config.in_vars}
    fy, fx = grid.spatial_dims(fds)
    targets = gather([fds], config.out_vars, ydim=fy, xdim=fx, role="output", where="the fine data")
    attrs = {
        name: {a: var.attrs[a] for a in _CF_ATTRS if a in var.attrs}
        for name, var in targets.items()
    }

    data = pair_arrays(
        cds,
        fds,
        config.in_vars,
        config.out_vars,
        config.factor,
        mean,
        std,
        time_dim=time_dim,
        static_vars=config.static_vars,
    )
    dsr = Downscaler.from_config(
        config,
        seed=seed,
        mean=mean,
        std=std,
        units=units,
        attrs=attrs,
        nonnegative=list(nonnegative),
        grid=training_grid(cds[ydim], cds[xdim]),
    )
    crop = tuple(crop) if crop is not None else tuple(config.img_size)
    h, w = data.coarse.shape[-2:]
    if crops_per_time is None:
        crops_per_time = max(1, (h // min(crop[0], h)) * (w // min(crop[1], w)))
    crops = PairedCrops(data.select(train_idx), crop, config.factor, crops_per_time, seed)
    val = data.select(val_idx) if len(val_idx) else None
    state = None
    if resume:
        where = checkpoint_dir if resume is True else resume
        if where is None:
            raise ValueError("resume=True needs checkpoint_dir")
        state = load_state(where)
        # the architecture must match; training options (a new lr ...) may change
        saved = ReslimConfig.from_dict(state.get("config", {})).to_dict()
        if saved != config.to_dict():
            diff = sorted(k for k in saved if saved[k] != config.to_dict().get(k))
            raise ValueError(
                f"cannot resume from {str(where)!r}: it was trained with another model "
                f"architecture (differs in {diff})"
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
