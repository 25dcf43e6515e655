"""Skill scores as xarray objects: RMSE, bias, R², anomaly R² (Dask-friendly)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import xarray as xr

__all__ = ["anomaly_r2", "bias", "r2", "rmse"]


def _valid(pred: xr.DataArray, truth: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    pred, truth = xr.align(pred, truth, join="exact")
    both = pred.notnull() & truth.notnull()
    return pred.where(both), truth.where(both)


def rmse(pred: xr.DataArray, truth: xr.DataArray, dims: Sequence[Hashable] | None = None):
    """Root mean square error over ``dims`` (all dims by default)."""
    p, t = _valid(pred, truth)
    return ((p - t) ** 2).mean(dims) ** 0.5


def bias(pred: xr.DataArray, truth: xr.DataArray, dims: Sequence[Hashable] | None = None):
    """Mean of ``pred - truth`` over ``dims``."""
    p, t = _valid(pred, truth)
    return (p - t).mean(dims)


def r2(pred: xr.DataArray, truth: xr.DataArray, dims: Sequence[Hashable] | None = None):
    """Coefficient of determination ``1 - SSE / SS(truth - mean(truth))``."""
    p, t = _valid(pred, truth)
    return 1 - ((p - t) ** 2).sum(dims) / ((t - t.mean(dims)) ** 2).sum(dims)


def anomaly_r2(
    pred: xr.DataArray,
    truth: xr.DataArray,
    time_dim: Hashable = "time",
    dims: Sequence[Hashable] | None = None,
):
    """R² of anomalies: each series minus its own time mean at every pixel.

    A constant per-pixel offset (a climatological correction) does not change
    it; only getting the year-to-year variations right does.
    """
    p, t = _valid(pred, truth)
    return r2(p - p.mean(time_dim), t - t.mean(time_dim), dims)
