"""Skill scores as xarray objects (Dask-friendly): `evaluate` and its parts.

Every score skips pixels where either field is NaN.  `evaluate` returns one
``xr.Dataset`` with a ``variable`` dimension and one data variable per score;
`power_spectra` returns radially averaged spectra separately.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import xarray as xr
from scipy.ndimage import uniform_filter

from . import grid

__all__ = [
    "anomaly_r2",
    "bias",
    "evaluate",
    "mae",
    "pearson",
    "power_spectra",
    "psnr",
    "r2",
    "rmse",
    "ssim",
]


def _valid(pred: xr.DataArray, truth: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    try:
        pred, truth = xr.align(pred, truth, join="exact")
    except ValueError as err:
        raise ValueError(
            f"prediction and truth are not on the same grid ({err}); regrid or assign_coords first"
        ) from err
    both = pred.notnull() & truth.notnull()
    return pred.where(both), truth.where(both)


def _weights(obj: xr.DataArray, lat_weighted: bool) -> xr.DataArray | None:
    if not lat_weighted:
        return None
    ydim, _ = grid.spatial_dims(obj)
    w = np.cos(np.deg2rad(obj[ydim])).clip(min=0)
    return w / w.mean()


def _mean(x: xr.DataArray, dims, weights: xr.DataArray | None) -> xr.DataArray:
    if weights is None:
        return x.mean(dims)
    return x.weighted(weights.fillna(0)).mean(dims)


def rmse(pred, truth, dims: Sequence[Hashable] | None = None, lat_weighted: bool = False):
    """Root mean square error over ``dims`` (all by default); cos-latitude weighted on request."""
    p, t = _valid(pred, truth)
    return _mean((p - t) ** 2, dims, _weights(t, lat_weighted)) ** 0.5


def mae(pred, truth, dims: Sequence[Hashable] | None = None, lat_weighted: bool = False):
    """Mean absolute error over ``dims``."""
    p, t = _valid(pred, truth)
    return _mean(abs(p - t), dims, _weights(t, lat_weighted))


def bias(pred, truth, dims: Sequence[Hashable] | None = None, lat_weighted: bool = False):
    """Mean of ``pred - truth`` over ``dims``."""
    p, t = _valid(pred, truth)
    return _mean(p - t, dims, _weights(t, lat_weighted))


def r2(pred, truth, dims: Sequence[Hashable] | None = None):
    """Coefficient of determination ``1 - SSE / SS(truth - mean(truth))``."""
    p, t = _valid(pred, truth)
    return 1 - ((p - t) ** 2).sum(dims) / ((t - t.mean(dims)) ** 2).sum(dims)


def anomaly_r2(pred, truth, time_dim: Hashable = "time", dims=None):
    """R² of anomalies: each series minus its own time mean at every pixel.

    A constant per-pixel offset (a climatological correction) does not change
    it; only getting the year-to-year variations right does.
    """
    p, t = _valid(pred, truth)
    return r2(p - p.mean(time_dim), t - t.mean(time_dim), dims)


def pearson(pred, truth, dims: Sequence[Hashable] | None = None):
    """Pearson correlation over ``dims``."""
    p, t = _valid(pred, truth)
    pa, ta = p - p.mean(dims), t - t.mean(dims)
    return (pa * ta).sum(dims) / np.sqrt((pa**2).sum(dims) * (ta**2).sum(dims))


def _ssim_2d(a: np.ndarray, b: np.ndarray, data_range: float, win: int = 7) -> np.ndarray:
    """Mean SSIM of the last two axes, as scikit-image's default (7x7 uniform window)."""
    a = np.nan_to_num(np.asarray(a, np.float64))
    b = np.nan_to_num(np.asarray(b, np.float64))
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    size = (1,) * (a.ndim - 2) + (win, win)
    n = win * win
    cov_norm = n / (n - 1)
    ux, uy = uniform_filter(a, size), uniform_filter(b, size)
    vx = cov_norm * (uniform_filter(a * a, size) - ux * ux)
    vy = cov_norm * (uniform_filter(b * b, size) - uy * uy)
    vxy = cov_norm * (uniform_filter(a * b, size) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (win - 1) // 2
    return s[..., pad : s.shape[-2] - pad, pad : s.shape[-1] - pad].mean(axis=(-2, -1))


def ssim(pred, truth, data_range: float | None = None) -> xr.DataArray:
    """Structural similarity of each 2-D map, averaged over the other dims.

    ``data_range`` defaults to the truth's max - min.  Maps need at least 7 x 7
    pixels; NaN is treated as 0 (mask NaN regions out before for a fair score).
    """
    p, t = _valid(pred, truth)
    ydim, xdim = grid.spatial_dims(t)
    if t.sizes[ydim] < 7 or t.sizes[xdim] < 7:
        raise ValueError(
            f"ssim needs maps of at least 7 x 7 pixels, got {t.sizes[ydim]} x {t.sizes[xdim]}"
        )
    if data_range is None:
        data_range = float(t.max() - t.min())
    per_map = xr.apply_ufunc(
        _ssim_2d,
        p,
        t,
        kwargs={"data_range": data_range},
        input_core_dims=[[ydim, xdim], [ydim, xdim]],
        dask="parallelized",
        output_dtypes=[np.float64],
    )
    return per_map.mean()


def psnr(pred, truth, data_range: float | None = None) -> xr.DataArray:
    """Peak signal-to-noise ratio in dB, ``10 log10(range² / MSE)``."""
    p, t = _valid(pred, truth)
    if data_range is None:
        data_range = t.max() - t.min()
    return 10 * np.log10(data_range**2 / ((p - t) ** 2).mean())


def _evaluate_one(pred, truth, baseline, time_dim) -> dict[str, xr.DataArray]:
    scores = {
        "rmse": rmse(pred, truth),
        "rmse_latw": rmse(pred, truth, lat_weighted=True),
        "mae": mae(pred, truth),
        "mae_latw": mae(pred, truth, lat_weighted=True),
        "bias": bias(pred, truth),
        "r2": r2(pred, truth),
        "pearson": pearson(pred, truth),
        "ssim": ssim(pred, truth),
        "psnr": psnr(pred, truth),
    }
    if time_dim in truth.dims and truth.sizes[time_dim] > 1:
        scores["anomaly_r2"] = anomaly_r2(pred, truth, time_dim)
    if baseline is not None:
        base = rmse(baseline, truth)
        scores["rmse_baseline"] = base
        scores["skill_rmse"] = 1 - scores["rmse"] / base
    return scores


def evaluate(
    pred: xr.DataArray | xr.Dataset,
    truth: xr.DataArray | xr.Dataset,
    *,
    baseline: xr.DataArray | xr.Dataset | None = None,
    time_dim: Hashable = "time",
) -> xr.Dataset:
    """Scores of ``pred`` against ``truth``, one row per variable.

    Parameters
    ----------
    pred, truth
        Same variables on the same grid (a DataArray is one variable).
    baseline
        Optional reference forecast (e.g. bicubic): adds ``rmse_baseline`` and
        ``skill_rmse = 1 - rmse / rmse_baseline`` (positive: better than it).
    time_dim
        For ``anomaly_r2`` (each pixel's time mean removed first).

    Returns
    -------
    ``xr.Dataset`` with dimension ``variable`` and data variables ``rmse``,
    ``rmse_latw``, ``mae``, ``mae_latw``, ``bias``, ``r2``, ``anomaly_r2``,
    ``pearson``, ``ssim``, ``psnr`` (and the baseline scores).  Lazy on Dask
    input: call ``.compute()``.

    Raises
    ------
    KeyError
        If a variable of ``pred`` is missing from ``truth`` (or ``baseline``).
    ValueError
        If the grids differ.
    """

    def as_ds(obj, name):
        if obj is None or isinstance(obj, xr.Dataset):
            return obj
        return obj.to_dataset(name=obj.name if obj.name is not None else name)

    pred_ds, truth_ds, base_ds = as_ds(pred, "var"), as_ds(truth, None), as_ds(baseline, None)
    names = list(pred_ds.data_vars)
    if isinstance(truth, xr.DataArray) and len(names) == 1:
        truth_ds = truth.to_dataset(name=names[0])
    if isinstance(baseline, xr.DataArray) and len(names) == 1:
        base_ds = baseline.to_dataset(name=names[0])
    rows = []
    for name in names:
        for label, ds in (("truth", truth_ds), ("baseline", base_ds)):
            if ds is not None and name not in ds:
                raise KeyError(
                    f"variable {name!r} is not in the {label} (has {sorted(map(str, ds))})"
                )
        base = base_ds[name] if base_ds is not None else None
        scores = _evaluate_one(pred_ds[name], truth_ds[name], base, time_dim)
        rows.append(xr.Dataset({k: v.reset_coords(drop=True) for k, v in scores.items()}))
    out = xr.concat(rows, dim="variable").assign_coords(variable=[str(n) for n in names])
    units = {n: pred_ds[n].attrs.get("units") for n in names}
    for key in ("rmse", "rmse_latw", "mae", "mae_latw", "bias", "rmse_baseline"):
        if key in out and len(set(units.values())) == 1 and None not in units.values():
            out[key].attrs["units"] = next(iter(units.values()))
    out["psnr"].attrs["units"] = "dB"
    return out


def _radial_spectrum(a: np.ndarray, nbins: int) -> np.ndarray:
    """Variance per wavenumber band from a 2-D DCT (Denis et al. 2002).

    The cosine transform treats a limited-area field as mirrored, not periodic,
    so the jump between opposite edges does not leak a spurious k^-2 tail into
    the small scales as an FFT would.
    """
    from scipy.fft import dctn

    a = np.nan_to_num(np.asarray(a, np.float64))
    ny, nx = a.shape[-2:]
    coef = dctn(a, type=2, norm="ortho", axes=(-2, -1))
    var = coef**2 / (ny * nx)
    alpha = np.hypot(np.arange(ny)[:, None] / ny, np.arange(nx)[None, :] / nx)
    idx = np.clip(np.rint(alpha * max(ny, nx)).astype(int), 0, nbins - 1).ravel()
    flat = var.reshape(*var.shape[:-2], -1)
    out = np.zeros((*var.shape[:-2], nbins))
    np.add.at(np.moveaxis(out, -1, 0), idx, np.moveaxis(flat, -1, 0))
    return out


def power_spectra(**fields: xr.DataArray) -> xr.Dataset:
    """Radially averaged power spectra of 2-D maps, averaged over other dims.

    ``power_spectra(truth=t, xorbit=p, bicubic=b)`` → Dataset with one spectrum
    per keyword over ``wavenumber`` (half-cycles per domain along the longer
    side, from a discrete cosine transform; the mean, wavenumber 0, is dropped).
    Downscaling that adds realistic small scales lifts the high-wavenumber tail
    toward the truth's; interpolation falls below it.
    """
    if not fields:
        raise ValueError("power_spectra needs at least one field, e.g. truth=...")
    out = {}
    for name, f in fields.items():
        ydim, xdim = grid.spatial_dims(f)
        nbins = max(f.sizes[ydim], f.sizes[xdim]) + 1
        spec = xr.apply_ufunc(
            _radial_spectrum,
            f,
            kwargs={"nbins": nbins},
            input_core_dims=[[ydim, xdim]],
            output_core_dims=[["wavenumber"]],
            dask="parallelized",
            output_dtypes=[np.float64],
            dask_gufunc_kwargs={"output_sizes": {"wavenumber": nbins}},
        )
        other = [d for d in spec.dims if d != "wavenumber"]
        out[name] = spec.mean(other) if other else spec
    ds = xr.Dataset(out)
    return ds.assign_coords(wavenumber=np.arange(ds.sizes["wavenumber"])).isel(
        wavenumber=slice(1, None)
    )
