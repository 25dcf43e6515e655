"""Fit a model's linear path (`xorbit.model.linear`) on its training windows, in closed form.

Every training time step contributes the windows of a regular tiling of its
grid (the last row and column of windows shifted inward, as crops are), at
most `MAX_SAMPLES` in all; no augmentation.  The targets are the fine fields
minus the model's own interpolation (`Reslim.skip`), so the linear path is
exactly what the network would add to it first; the network then trains on
top, starting from zero.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..model.linear import LinearPath
from ..model.reslim import Reslim
from ..ridge import CENSOR_TOLERANCE, WHOLE_DOMAIN_MAX, RidgeFit, fit_ridge
from .loop import TrainOptions, lr_factor, validate
from .samples import PairedArrays, PairedCrops

if TYPE_CHECKING:
    from ..downscaler import Downscaler

__all__ = [
    "MAX_SAMPLES",
    "dry_kept",
    "fit_gated",
    "fit_linear_path",
    "network_targets",
    "too_short",
    "window_starts",
]

# At most this many windows go into the fit (time steps times positions), and
# at most MAX_BYTES of them (the fine targets dominate).
MAX_SAMPLES = 4096
MAX_BYTES = 2**29
# Doubles one design matrix batch may hold (`fit_ridge`'s batch of cells).
BATCH_DOUBLES = 2e7


def window_starts(n: int, size: int) -> list[int]:
    """Starts of windows of ``size`` that tile ``n`` cells, the last one shifted inward."""
    if size >= n:
        return [0]
    starts = list(range(0, n - size + 1, size))
    if starts[-1] != n - size:
        starts.append(n - size)
    return starts


def fit_linear_path(
    model: Reslim,
    data: PairedArrays,
    *,
    max_samples: int = MAX_SAMPLES,
    floors: Sequence[str] = (),
) -> RidgeFit:
    """Fit ``model.linear`` on the windows of ``data`` (normalized training arrays); returns the fit.

    Samples run in time order (windows of one time step together), so the
    cross-validation's contiguous folds are blocks of years.  A path on every
    cell of a window larger than `xorbit.ridge.WHOLE_DOMAIN_MAX` cells
    (``linear_half=None``) is fitted with ``window="cv"``: where the
    cross-validation prefers each cell's neighbours, the model's path and
    ``config.linear_half`` change to them.

    ``floors``: outputs clamped at zero (`Downscaler.nonnegative`).  Their dry
    pixels (``data.fine_zero``) are censored targets for a whole-window path
    (`xorbit.ridge.censored_targets`): the path then predicts a latent field
    that may go below zero where it is dry, which the clamp turns into rain
    (on the orographic case 0.9994 -> 0.9476 mm/day).
    """
    c = model.config
    if c.linear_window is None:
        raise ValueError("this model has no linear path (ReslimConfig.linear_window is None)")
    wy, wx = c.linear_window
    k = c.factor
    h, w = data.coarse.shape[-2:]
    positions = [(y, x) for y in window_starts(h, wy) for x in window_starts(w, wx)]
    times = np.arange(len(data))
    n_out = data.fine.shape[1]
    per_sample = 4 * data.coarse.shape[1] * wy * wx + 3 * 8 * n_out * wy * wx * k * k
    max_samples = max(4, min(max_samples, MAX_BYTES // per_sample))
    if len(times) > max_samples:  # a long record: every n-th step, still in order
        times = times[np.linspace(0, len(times) - 1, max_samples).round().astype(int)]
    if len(times) * len(positions) > max_samples:
        # fewer positions per time step, spread evenly, rather than fewer years
        per_time = max(1, max_samples // len(times))
        pick = np.linspace(0, len(positions) - 1, per_time).round().astype(int)
        positions = [positions[i] for i in np.unique(pick)]
    xs, ys, zs = [], [], []
    zero = floor_of(data, c.out_vars, floors)
    for t in times:
        every = slice(None)  # one time step, read whole (a FieldStack reads [t, :, y, x])
        coarse = np.asarray(data.coarse[int(t), :, every, every])
        fine = np.asarray(data.fine[int(t), :, every, every])
        for y0, x0 in positions:
            xs.append(coarse[:, y0 : y0 + wy, x0 : x0 + wx])
            ys.append(fine[:, y0 * k : (y0 + wy) * k, x0 * k : (x0 + wx) * k])
            if zero is not None:
                zs.append(zero[:, y0 * k : (y0 + wy) * k, x0 * k : (x0 + wx) * k])
    x = np.nan_to_num(np.stack(xs).astype(np.float32))  # as the crops give them
    y = np.stack(ys).astype(np.float64)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        skip = model.skip(model._pad(xt), c.in_vars)[..., : wy * k, : wx * k].double().numpy()
    dyn = model.channel_indices(c.in_vars, model.dynamic_vars)
    # None: every cell; on a large window, every cell or the neighbours, by cross-validation
    half: int | str | None = c.linear_half
    if half is None:
        half = "cv" if wy * wx > WHOLE_DOMAIN_MAX else max(wy, wx)
    p = len(dyn) * (wy * wx if not isinstance(half, int) else (2 * half + 1) ** 2)
    batch = max(1, int(BATCH_DOUBLES // max(1, len(x) * p)))
    floor = np.stack(zs) - skip if zs and np.isfinite(zs[0]).any() else None
    fit = fit_ridge(x[:, dyn], y - skip, k, window=half, batch=batch, floor=floor)
    if fit.half != c.linear_half:  # the cross-validation chose the neighbours
        model.config = c.replace(linear_half=fit.half)
        path = LinearPath(c.linear_window, len(dyn), n_out, k, fit.half)
        model.linear = path.to(model.linear.coef.device)
    model.linear.load_fit(fit)
    return fit


def network_targets(
    model: Reslim, data: PairedArrays, folds: int, floors: Sequence[str] = ()
) -> PairedArrays:
    """What the network trains on, on top of the model's path: `dry_kept` (the
    dry pixels of ``floors`` outputs), then `cross_fitted` (``folds``)."""
    return cross_fitted(model, dry_kept(model, data, floors), folds, floors)


def floor_of(data: PairedArrays, out_vars: Sequence[str], floors: Sequence[str]) -> Any:
    """``data.fine_zero`` for the ``floors`` outputs, NaN (no floor) for the others."""
    if data.fine_zero is None:
        return None
    return np.where([[[v in floors]] for v in out_vars], data.fine_zero, np.nan)


def _one_window(model: Reslim, data: PairedArrays) -> bool:
    """Whether the whole grid of ``data`` is one linear window of the model."""
    c = model.config
    return c.linear_window is not None and data.coarse.shape[-2:] == tuple(c.linear_window)


def dry_kept(model: Reslim, data: PairedArrays, floors: Sequence[str]) -> PairedArrays:
    """``data`` with each dry target of a ``floors`` output that the model's skip
    and path already predict dry (below the floor) moved to that prediction.

    A path fitted on censored targets predicts a latent field, below the floor
    where it is dry; the clamp at zero makes that dry.  Against the raw target
    (the floor) the network would learn to lift those pixels back towards the
    floor and, overshooting, to make them wet (orographic case: 1.0551 mm/day
    with the correction kept, against the path's 0.9476).  With the target at
    the prediction there is nothing to correct; where the path predicts rain
    at a dry pixel the target stays the floor.  In-memory data whose whole
    grid is one linear window only (else ``data``).
    """
    c = model.config
    if not (floors and data.fine_zero is not None and _one_window(model, data)):
        return data
    if not isinstance(data.fine, np.ndarray):  # streamed
        return data
    h, w = data.coarse.shape[-2:]
    k = c.factor
    x = torch.from_numpy(np.nan_to_num(np.asarray(data.coarse, dtype=np.float32)))
    with torch.no_grad():
        skip = model.skip(model._pad(x), c.in_vars)[..., : h * k, : w * k]
        base = (skip + model.linear_map(x, c.in_vars)).numpy()
    zero = floor_of(data, c.out_vars, floors)[None]
    dry = (data.fine <= zero + CENSOR_TOLERANCE) & (base < zero)
    if not dry.any():
        return data
    return dataclasses.replace(data, fine=np.where(dry, base, data.fine).astype(data.fine.dtype))


def cross_fitted(
    model: Reslim, data: PairedArrays, folds: int, floors: Sequence[str] = ()
) -> PairedArrays:
    """``data`` with each target moved by the model's path minus an out-of-fold path.

    Experimental (``TrainOptions.cross_fit``).  The network learns the residual
    of the path; on the path's own training years that residual is the small
    in-sample one (the orographic case: a local ridge scores 0.71 mm/day there,
    1.34 on new samples), mostly the path's overfitting.  Shifting each target
    by ``path(x) - path_without_its_fold(x)`` shows the network the residual of
    a path that has not seen the sample, with ``folds`` contiguous blocks of
    time steps.  The model's own path (fitted on all of ``data``) is unchanged.
    In-memory data whose whole grid is one linear window only (else ``data``).
    """
    c = model.config
    if folds < 2 or len(data) < 2 * folds or not _one_window(model, data):
        return data
    if not isinstance(data.fine, np.ndarray):  # streamed
        return data
    x = torch.from_numpy(np.nan_to_num(np.asarray(data.coarse, dtype=np.float32)))
    with torch.no_grad():
        full = model.linear_map(x, c.in_vars)
        out = torch.empty_like(full)
        bounds = np.linspace(0, len(data), folds + 1).round().astype(int)
        for a, b in itertools.pairwise(bounds):
            other = copy.deepcopy(model)
            fit_linear_path(other, data.select(np.r_[0:a, b : len(data)]), floors=floors)
            out[a:b] = other.linear_map(x[a:b], c.in_vars)
    shift = (full - out).numpy().astype(data.fine.dtype)
    return dataclasses.replace(data, fine=data.fine + shift)


# The gate's validation: the last GATE_BLOCK of the training years, held out
# for the first GATE_EPOCHS of the epochs.  With fewer than GATE_MIN_STEPS
# years left to train on there is no decision and no path: a ridge map from
# so few years extrapolates worse than none (10 years of the HadCM3 east half
# scored 0.66 K with the path, 0.20 K without; docs/benchmarks.md section 14),
# and from 10 years on the gate itself finds that (it cleared the path there).
GATE_BLOCK = 0.2
GATE_EPOCHS = 0.75
GATE_MIN_STEPS = 6


def _block_rmse(dsr: Downscaler, block: PairedArrays, opts: TrainOptions) -> np.ndarray:
    """RMSE of every output on the gate's held-out block, as the model stands."""
    got = validate(dsr, block, tile=opts.tile, halo=opts.halo, device=opts.device)
    return np.array([got[f"rmse_{v}"] for v in dsr.model.config.out_vars])


# run(crops, val, options, stop_after) -> history: one process or DDP
Run = Callable[[Any, Any, TrainOptions, "int | None"], list[dict[str, float]]]


def too_short(n: int) -> bool:
    """Whether ``n`` training steps are too few for the gate to decide: fewer than
    `GATE_MIN_STEPS` besides its held-out block.  A path fitted on so few years
    extrapolates worse than none, so it is cleared."""
    return n - max(1, round(GATE_BLOCK * n)) < GATE_MIN_STEPS


def fit_gated(
    dsr: Downscaler, crops: PairedCrops, years: PairedArrays, opts: TrainOptions, run: Run
) -> list[dict[str, float]]:
    """Train the network on top of the linear path, and keep it only if it helps.

    The decision is made on years the model has not seen, blocked (the last
    `GATE_BLOCK` of the training years, the hardest: a warming climate's
    extremes), and the last years still train the final model:

    1. the linear path is fitted on the earlier years and the network trained
       on them for the first `GATE_EPOCHS` of the schedule;
    2. on the held-out block, three models are scored: with the network's
       correction, the linear path alone (``gate`` 0), and the interpolation
       skip alone (no path either);
    3. if the path helped (alone or under the correction), it is fitted again
       on every year, else it is cleared (a path fitted on windows smaller
       than the domain can be worse than none where the map depends on
       position); if the correction helped too, the network trains on every
       year for the rest of the schedule, else its weight (``model.gate``) is
       set to 0 and training stops.

    The last record of step 1 holds ``gate_rmse_ratio`` (the mean over the
    outputs of RMSE with over RMSE without the correction) and
    ``linear_rmse_ratio`` (the path alone over the skip alone), and every
    record after it ``gate``.  Records with fewer than `GATE_MIN_STEPS` earlier
    years leave nothing to decide on (`too_short`): `recipe.run_training`
    clears their path and trains the network on every year, without the gate.
    """
    model = dsr.model
    n = len(years)
    n_block = max(1, round(GATE_BLOCK * n))
    if too_short(n):
        raise ValueError(f"fit_gated: {n} time steps are too few to gate (too_short)")
    early = years.select(np.arange(n - n_block))
    block = years.select(np.arange(n - n_block, n))
    floors = dsr.nonnegative
    fit_linear_path(model, early, floors=floors)
    first = copy.copy(crops)
    first.data = network_targets(model, early, opts.cross_fit, floors)
    e1 = max(1, round(GATE_EPOCHS * opts.epochs))
    history = run(first, None, opts, e1 if e1 < opts.epochs else None)
    score = functools.partial(_block_rmse, dsr, block, opts)
    on = score()  # skip + path + correction
    model.gate.fill_(0.0)
    off = score()  # skip + path
    model.linear.clear()
    bare = score()  # the skip alone
    ratio = float(np.mean(on / off))
    path_ratio = float(np.mean(off / bare))
    keep_path = bool(min(np.mean(on / bare), path_ratio) < 1.0)
    keep = keep_path and ratio < 1.0
    history[-1]["gate_rmse_ratio"] = ratio
    history[-1]["linear_rmse_ratio"] = path_ratio
    if keep_path:
        fit_linear_path(model, years, floors=floors)  # the final linear path: every year
    model.gate.fill_(1.0 if keep else 0.0)
    if keep and e1 < opts.epochs:
        # the rest of the schedule, from where it stood, on every year
        peak = opts.lr * lr_factor(
            e1, int(opts.warmup_epochs), opts.epochs, opts.lr, opts.warmup_start_lr, opts.min_lr
        )
        rest = opts.replace(epochs=opts.epochs - e1, lr=peak, warmup_epochs=0)
        final = copy.copy(crops)
        final.data = network_targets(model, years, opts.cross_fit, floors)
        more = run(final, None, rest, None)
        for record in more:
            record["epoch"] += e1
        history += more
    for record in history[len(history) - (opts.epochs - e1 if keep else 0) - 1 :]:
        record["gate"] = float(model.gate)
    return history
