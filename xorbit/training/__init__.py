"""`xorbit.train`: from coarse and fine xarray objects to a trained `Downscaler`."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import xarray as xr

from .. import transforms as _transforms
from ..downscaler import Downscaler
from ..engine import default_device
from ..model.config import NOISE_CHANNELS, ReslimConfig
from ..model.reslim import Reslim
from ..variables import var_names
from . import finetune
from .loop import TrainOptions, fit, load_state, validate
from .memory import MemoryPlan, plan
from .recipe import (
    MIN_AUGMENTED_DRAWS,
    build_downscaler,
    paired_arrays,
    plan_crops,
    prepare_pairs,
    resume_state,
    run_training,
    statistics,
    training_window,
)
from .sharding import check_strategy

__all__ = [
    "MIN_AUGMENTED_DRAWS",
    "MemoryPlan",
    "TrainOptions",
    "fit",
    "load_state",
    "plan",
    "train",
    "validate",
]


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
    init: Downscaler | Reslim | str | os.PathLike | None = None,
    freeze: str | Sequence[str] | None = None,
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
        A ``distributed.Client``: run one training rank per worker.  The
        ``strategy`` option says how: ``"ddp"`` (each rank holds the whole
        model), ``"fsdp"`` (parameters, gradients and AdamW state sharded over
        the ranks, `xorbit.training.sharding`) or ``"auto"`` (default: FSDP when
        `xorbit.training.plan` says one rank's whole training state would not
        fit its worker's ``memory_limit``, or its GPU).  A run that fits
        neither way is refused before it starts, with the plan in the
        ``MemoryError``.  ``checkpoint_activations=True`` trades compute for
        activation memory (with or without a client).
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
    init
        Start from pretrained weights (fine-tuning, `xorbit.training.finetune`):
        a `Downscaler`, the path of a saved ``.xorbit`` file, or a `Reslim`
        from `xorbit.model.checkpoint.import_orbit2`.  Its architecture is
        kept; ``config`` names the variables and the training window
        (``img_size``); by default the pretrained inputs the data have (or
        that the coordinates make), then the data's other variables, on the
        pretrained window.  ``transforms`` defaults to the pretrained model's,
        and the model has a linear path if the pretrained one has
        (``linear_path=``, or the ``options=`` given, decide otherwise).  Weights move by
        variable name: known inputs keep their embeddings, new inputs and
        outputs start fresh, missing ones are dropped; the position table is
        resized to a new window.  Normalization, climatologies and the linear
        path come from the new data.  ``downscaler.provenance`` records it.
    freeze
        With ``init``: pretrained parameters to keep fixed, ``"encoder"``
        (everything before the head), ``"blocks"`` (the transformer blocks)
        or a list of name patterns (``["blocks.0.*"]``).  Only parameters
        copied whole are frozen.  The others pretrained train at
        ``pretrained_lr_scale`` (a `TrainOptions` field) times ``lr``.
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
    source = finetune.pretrained(init) if init is not None else None
    config, transforms = _model_config(pairs, config, source, transforms, options)
    opts = _options(config, options, epochs, seed, device, checkpoint_dir, progress, lr, batch_size)
    config = _noise_config(config, opts)
    transforms = _check_transforms(transforms, config)
    if check_strategy(opts.strategy) == "fsdp" and client is None:
        raise ValueError(
            "strategy='fsdp' shards the model over the ranks of a Dask cluster: pass client= "
            "(one process trains the whole model, as with 'ddp')"
        )
    prepared = prepare_pairs(
        pairs,
        config,
        static=static,
        transforms=transforms,
        val_fraction=val_fraction,
        time_dim=time_dim,
        multi=multi,
    )
    stats = statistics(prepared, climatology=climatology, client=client, time_dim=time_dim)
    sets = paired_arrays(prepared, stats, time_dim=time_dim, load=opts.in_memory)
    window = training_window(sets, crop, prepared.config)
    dsr = build_downscaler(
        prepared,
        stats,
        window,
        seed=seed,
        nonnegative=nonnegative,
        linear_path=opts.linear_path,
        init=source,
        freeze=freeze,
        pretrained_lr_scale=opts.pretrained_lr_scale,
    )
    parts = plan_crops(
        sets,
        prepared,
        stats,
        window,
        opts,
        crops_per_time=crops_per_time,
        samples_per_epoch=samples_per_epoch,
        seed=seed,
    )
    state = resume_state(resume, checkpoint_dir, dsr.config, dsr.provenance)
    dsr.history = run_training(
        dsr, parts, sets, prepared, opts, client=client, state=state, stop_after=stop_after
    )
    return dsr


def _model_config(
    pairs: Sequence[tuple[Any, Any]],
    config: ReslimConfig | None,
    source: finetune.Pretrained | None,
    transforms: dict[str, str] | None,
    options: dict[str, Any],
) -> tuple[ReslimConfig, dict[str, str] | None]:
    """The config (the default one, or the pretrained architecture over the
    variables) and the transforms; a fine-tuned model has a linear path where
    its pretrained one has (unless ``linear_path=`` says otherwise)."""
    explicit, config = config is not None, config or _default_config(pairs, source)
    if source is None:
        return config, transforms
    if "options" not in options:
        options.setdefault("linear_path", source.config.linear_window is not None)
    config = finetune.finetune_config(source.config, config, explicit)
    if transforms is None:
        transforms = finetune.default_transforms(source, config)
    return config, transforms


def _noise_config(config: ReslimConfig, opts: TrainOptions) -> ReslimConfig:
    """An ensemble's config has noise channels (`NOISE_CHANNELS` unless it has
    some); a config with noise trained without ``ensemble=`` is warned about."""
    if opts.ensemble and not config.noise_channels:
        config = config.replace(noise_channels=NOISE_CHANNELS)
    config.check_ensemble(opts.ensemble)
    if config.noise_channels and not opts.ensemble:
        warnings.warn(
            f"this model has noise_channels={config.noise_channels} but trains without "
            "ensemble=: on the deterministic loss it learns nothing of its noise, and its "
            "members (samples=) will not be calibrated; pass ensemble=M (e.g. 8)",
            UserWarning,
            stacklevel=3,
        )
    return config


def _default_config(
    pairs: Sequence[tuple[Any, Any]], source: finetune.Pretrained | None = None
) -> ReslimConfig:
    """``tiny`` over the fine data's variables, in and out; with a pretrained
    model, its architecture over its inputs the data have (`finetune.default_config`)."""
    names = var_names(pairs[0][1])
    if source is not None:
        return finetune.default_config(source.config, var_names(pairs[0][0]), names)
    return ReslimConfig.preset("tiny", in_vars=names, out_vars=names)


def _options(
    config: ReslimConfig,
    options: dict[str, Any],
    epochs: int,
    seed: int,
    device: str | None,
    checkpoint_dir: str | os.PathLike | None,
    progress: bool,
    lr: float | None,
    batch_size: int | None,
) -> TrainOptions:
    """The preset's `TrainOptions` (or ``options=``), with ``train``'s keywords on top."""
    base = options.pop("options", None) or TrainOptions.for_config(config)
    return base.replace(
        epochs=int(epochs),
        seed=seed,
        device=device or default_device(),
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        progress=progress,
        **({"lr": float(lr)} if lr is not None else {}),
        **({"batch_size": int(batch_size)} if batch_size is not None else {}),
        **options,
    )


def _check_transforms(transforms: dict[str, str] | None, config: ReslimConfig) -> dict[str, str]:
    """Known kinds, on known variables, none static."""
    transforms = _transforms.check(transforms, [*config.in_vars, *config.out_vars])
    fixed = sorted(set(transforms) & set(config.static_vars))
    if fixed:
        raise ValueError(f"transforms name static variables {fixed}; transform dynamic ones only")
    return transforms


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
