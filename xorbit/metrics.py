"""Skill scores as xarray objects (Dask-friendly): `evaluate` and its parts.

Every score skips pixels where either field is NaN.  `evaluate` returns one
``xr.Dataset`` with a ``variable`` dimension (and a ``method`` dimension when
given several predictions) and one data variable per score; `power_spectra`
returns radially averaged spectra separately.

A prediction with a ``sample`` dimension is an ensemble: the deterministic
scores use its mean, the distributional ones (quantiles, trends, spectra) each
member, and ``crps`` / ``spread_skill`` the members against each other.
`spread_scale` fits the one factor that makes an ensemble's spread match its
error, `scale_spread` applies it (calibrating MC-dropout members).

Libraries do the field's standard computations: xskillscore the CRPS, xrft the
Fourier spectra of RALSD.  The means over every pixel and time (rmse, mae, bias,
r2, pearson) stay plain xarray reductions: they give xskillscore's numbers, but
xskillscore reduces inside one ``apply_ufunc`` that needs each reduced dimension
in a single Dask chunk, i.e. the whole data set in memory for a score over
(time, lat, lon).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import dask
import numpy as np
import xarray as xr
from scipy.ndimage import uniform_filter

from . import grid

__all__ = [
    "SMALL_INPUT_BYTES",
    "anomaly_r2",
    "bias",
    "crps",
    "evaluate",
    "fractional_year",
    "gradient_energy",
    "mae",
    "p01_bias",
    "p99_bias",
    "pearson",
    "power_spectra",
    "psnr",
    "quantile_bias",
    "r2",
    "ralsd",
    "rank_flatness",
    "rank_histogram",
    "rmse",
    "scale_spread",
    "spread_scale",
    "spread_skill",
    "ssim",
    "trend",
    "trend_bias",
]

Field = xr.DataArray | xr.Dataset


# Set inside `evaluate`, which aligns and masks each pair once for all its
# scores: every score function would otherwise add its own alignment and masks
# to the graph (seconds of graph building for a small Dask input).
_ALREADY_VALID: ContextVar[bool] = ContextVar("_ALREADY_VALID", default=False)


def _valid(pred: xr.DataArray, truth: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    """Both fields aligned, with NaN wherever either is NaN.

    A dimension only one side has (an ensemble's ``sample``) is reduced out of
    the mask, so the truth keeps its own dims and a pixel counts only where
    every member is valid.
    """
    if _ALREADY_VALID.get():
        return pred, truth
    try:
        pred, truth = xr.align(pred, truth, join="exact")
    except ValueError as err:
        raise ValueError(
            f"prediction and truth are not on the same grid ({err}); regrid or assign_coords first"
        ) from err

    def ok(x: xr.DataArray, other: xr.DataArray) -> xr.DataArray:
        extra = [d for d in x.dims if d not in other.dims]
        return x.notnull().all(extra) if extra else x.notnull()

    both = ok(pred, truth) & ok(truth, pred)
    return pred.where(both), truth.where(both)


def _has_latitude(obj: xr.DataArray) -> bool:
    """Whether the Y dimension carries latitudes (not projected metres or a bare index)."""
    ydim, _ = grid.spatial_dims(obj)
    return ydim in obj.coords and grid._cf_meaning(obj[ydim]) == "latitude"


def _weights(obj: xr.DataArray, lat_weighted: bool) -> xr.DataArray | None:
    if not lat_weighted:
        return None
    ydim, _ = grid.spatial_dims(obj)
    if not _has_latitude(obj):
        raise ValueError(
            f"latitude weights need latitudes on dimension {ydim!r} (standard_name latitude "
            "or units degrees_north); this grid has none, use lat_weighted=False"
        )
    w = np.cos(np.deg2rad(obj[ydim])).clip(min=0)
    return (w / w.mean()).fillna(0)


def _mean(x: xr.DataArray, dims, weights: xr.DataArray | None) -> xr.DataArray:
    if weights is None:
        return x.mean(dims)
    return x.weighted(weights).mean(dims)


def _whole(x: xr.DataArray, dims: Sequence[Hashable]) -> xr.DataArray:
    """``x`` with each of ``dims`` in a single Dask chunk (NumPy data unchanged).

    Quantiles need a pixel's whole series, spectra and SSIM whole maps, CRPS
    every member.  The other dims are left to Dask ("auto") so that a field
    stored one map per time step does not become one chunk holding everything
    when its time axis is joined.
    """
    if x.chunks is None:
        return x
    return x.chunk({d: (-1 if d in dims else "auto") for d in x.dims})


def _require_dim(x: xr.DataArray, dim: Hashable, score: str) -> None:
    if dim not in x.dims:
        raise ValueError(f"{score} needs dimension {dim!r}; the field has dims {tuple(x.dims)}")


# --------------------------------------------------------------- deterministic scores


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
    return r2(p - p.mean([time_dim]), t - t.mean([time_dim]), dims)


def pearson(pred, truth, dims: Sequence[Hashable] | None = None):
    """Pearson correlation over ``dims``."""
    p, t = _valid(pred, truth)
    pa, ta = p - p.mean(dims), t - t.mean(dims)
    return (pa * ta).sum(dims) / np.sqrt((pa**2).sum(dims) * (ta**2).sum(dims))


def _ssim_2d(a: np.ndarray, b: np.ndarray, data_range, win: int = 7) -> np.ndarray:
    """Mean SSIM of the last two axes, as scikit-image's default (7x7 uniform window)."""
    # an ensemble's members against the one truth map
    a, b = np.broadcast_arrays(np.nan_to_num(np.asarray(a, np.float64)), np.nan_to_num(b))
    data_range = np.asarray(data_range, np.float64)
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


def ssim(pred, truth, data_range: float | xr.DataArray | None = None) -> xr.DataArray:
    """Structural similarity of each 2-D map, averaged over the other dims.

    ``data_range`` defaults to the truth's max - min (computed lazily on Dask
    input).  Maps need at least 7 x 7 pixels; NaN is treated as 0 (mask NaN
    regions out before for a fair score).
    """
    p, t = _valid(pred, truth)
    ydim, xdim = grid.spatial_dims(t)
    if t.sizes[ydim] < 7 or t.sizes[xdim] < 7:
        raise ValueError(
            f"ssim needs maps of at least 7 x 7 pixels, got {t.sizes[ydim]} x {t.sizes[xdim]}"
        )
    if data_range is None:
        data_range = t.max() - t.min()
    per_map = xr.apply_ufunc(
        _ssim_2d,
        _whole(p, [ydim, xdim]),
        _whole(t, [ydim, xdim]),
        data_range,
        input_core_dims=[[ydim, xdim], [ydim, xdim], []],
        dask="parallelized",
        output_dtypes=[np.float64],
    )
    return per_map.mean()


def psnr(pred, truth, data_range: float | xr.DataArray | None = None) -> xr.DataArray:
    """Peak signal-to-noise ratio in dB, ``10 log10(range² / MSE)``."""
    p, t = _valid(pred, truth)
    if data_range is None:
        data_range = t.max() - t.min()
    # a NumPy ufunc of a DataArray is a DataArray (__array_ufunc__), not as typed
    return 10 * np.log10(data_range**2 / ((p - t) ** 2).mean())  # type: ignore[return-value]


# ------------------------------------------------------------ climate statistics


def _is_dates(coord: xr.DataArray) -> bool:
    if np.issubdtype(coord.dtype, np.datetime64):
        return True
    if coord.dtype == object and coord.size:
        import cftime

        return isinstance(coord.values.flat[0], cftime.datetime)
    return False


def fractional_year(time: xr.DataArray) -> xr.DataArray:
    """Decimal years of datetime64 or cftime dates, in the dates' own calendar.

    ``year + (day of year - 1 + fraction of the day) / days in that year``, with
    360 days in a ``360_day`` year, 365 in ``noleap`` and 365 or 366 in the
    Gregorian calendars; so 1 January is always a whole year and a 360_day
    series of monthly steps is evenly spaced.
    """
    if not _is_dates(time):
        raise ValueError(
            f"time coordinate {time.name!r} holds {time.dtype} values, not dates; decode it "
            "(xr.decode_cf) or assign datetime64 / cftime values to compute trends"
        )
    dt = time.dt
    seconds = dt.hour * 3600 + dt.minute * 60 + dt.second + dt.microsecond * 1e-6
    return dt.year + (dt.dayofyear - 1 + seconds / 86400) / dt.days_in_year


def trend(
    x: xr.DataArray, time_dim: Hashable = "time", years: xr.DataArray | None = None
) -> xr.DataArray:
    """Least-squares linear trend of every series along ``time_dim``, per decade.

    The slope against `fractional_year` times 10 (``years``, when already
    computed for this time axis), over the time steps where that pixel is not
    NaN; in the field's units per decade.
    """
    _require_dim(x, time_dim, "trend")
    if years is None:
        years = fractional_year(x[time_dim])
    years = years.where(x.notnull())
    # cov(years, x) / var(years) over the same steps; ddof cancels.  Unlike
    # xskillscore.linslope it is plain reductions, so time may stay chunked.
    return (10 * xr.cov(years, x, [time_dim]) / xr.cov(years, years, [time_dim])).drop_vars(
        [time_dim], errors="ignore"
    )


def _trend_map(pred, truth, time_dim: Hashable) -> tuple[xr.DataArray, xr.DataArray]:
    """Per-pixel trend of ``pred`` minus that of ``truth``, and the masked truth."""
    p, t = _valid(pred, truth)
    _require_dim(t, time_dim, "trend_bias")
    years = fractional_year(t[time_dim])  # cftime dates: slow, once for both
    return trend(p, time_dim, years) - trend(t, time_dim, years), t


def trend_bias(
    pred, truth, time_dim: Hashable = "time", lat_weighted: bool = False
) -> xr.DataArray:
    """Per-pixel `trend` of ``pred`` minus that of ``truth``, averaged over pixels (per decade)."""
    diff, t = _trend_map(pred, truth, time_dim)
    return _mean(diff, None, _weights(t, lat_weighted))


def _nanquantile(a: np.ndarray, q: float) -> np.ndarray:
    """NumPy's default ("linear") ``q`` quantile along the last axis, skipping NaN.

    Vectorised: ``np.nanquantile`` (which xarray's ``quantile`` calls) loops in
    Python over every pixel's series, minutes for a million-pixel map.
    """
    a = np.sort(a, axis=-1)  # NaN sort last
    n = np.count_nonzero(~np.isnan(a), axis=-1)
    last = np.maximum(n - 1, 0)
    pos = q * last
    lo = np.floor(pos).astype(np.intp)
    below = np.take_along_axis(a, lo[..., None], -1)[..., 0]
    above = np.take_along_axis(a, np.minimum(lo + 1, last)[..., None], -1)[..., 0]
    return np.where(n > 0, below + (pos - lo) * (above - below), np.nan)


def _quantile_map(pred, truth, q: float, time_dim: Hashable):
    """Per-pixel ``q`` quantile of ``pred`` minus that of ``truth``, and the masked truth."""
    if not 0 <= q <= 1:
        raise ValueError(f"quantile q must lie in [0, 1], got {q}")
    p, t = _valid(pred, truth)
    _require_dim(t, time_dim, "quantile_bias")
    if t.sizes[time_dim] == 0:
        raise ValueError(f"quantile_bias needs at least one step along {time_dim!r}, got 0")

    def per_pixel(x: xr.DataArray) -> xr.DataArray:
        return xr.apply_ufunc(
            _nanquantile,
            _whole(x, [time_dim]),
            kwargs={"q": q},
            input_core_dims=[[time_dim]],
            dask="parallelized",
            output_dtypes=[x.dtype],
        )

    return per_pixel(p) - per_pixel(t), t


def quantile_bias(
    pred, truth, q: float, time_dim: Hashable = "time", lat_weighted: bool = False
) -> xr.DataArray:
    """Per-pixel ``q`` quantile over ``time_dim`` of ``pred`` minus that of ``truth``, mean over pixels.

    Quantiles interpolate linearly between order statistics (NumPy's default
    method); a pixel missing at every step drops out; an ensemble's members are
    scored one by one and averaged.
    """
    diff, t = _quantile_map(pred, truth, q, time_dim)
    return _mean(diff, None, _weights(t, lat_weighted))


def p99_bias(pred, truth, time_dim: Hashable = "time", lat_weighted: bool = False):
    """`quantile_bias` at 0.99: is the hot (wet) tail of each pixel right?"""
    return quantile_bias(pred, truth, 0.99, time_dim, lat_weighted)


def p01_bias(pred, truth, time_dim: Hashable = "time", lat_weighted: bool = False):
    """`quantile_bias` at 0.01: the cold (dry) tail."""
    return quantile_bias(pred, truth, 0.01, time_dim, lat_weighted)


# ----------------------------------------------------------------------- spectra


RALSD_NFACTOR = 2  # xrft's ``nfactor``: min(ny, nx) / 2 radial wavenumber bins


def _isotropic_spectrum(x: xr.DataArray, ydim: Hashable, xdim: Hashable) -> xr.DataArray:
    """Radially averaged FFT power of every map (xrft), over ``freq_r`` in cycles per pixel.

    The coordinates are replaced by pixel indices: RALSD compares two spectra
    bin by bin, so physical units do not matter, and a grid that is only
    nearly regular (a Gaussian grid) would fail xrft's even-spacing check.
    Masked pixels take their map's mean.  A linear trend is removed and a Hann
    window applied, so that the jump between opposite edges of a limited-area
    map does not leak into every wavenumber.
    """
    import xrft

    x = xr.DataArray(x.data, dims=x.dims)
    x = _whole(x.fillna(x.mean([ydim, xdim])), [ydim, xdim])
    fy, fx = f"freq_{ydim}", f"freq_{xdim}"
    with warnings.catch_warnings():
        # xrft's own use of Dataset.drop and the truncate=False notice
        warnings.simplefilter("ignore", FutureWarning)
        ps = xrft.power_spectrum(x, dim=[ydim, xdim], detrend="linear", window="hann")
        iso = xrft.isotropize(ps, [fy, fx], nfactor=RALSD_NFACTOR, truncate=False)
    # bins up to the Nyquist wavenumber of both axes; a bin holding only k = 0
    # (the map mean, which the detrending removed) and empty bins have radius 0
    kmax = min(float(ps[fy].max()), float(ps[fx].max()))
    kr = iso["freq_r"].values
    return iso.isel(freq_r=np.flatnonzero((kr > 0) & (kr <= kmax)))


def ralsd(pred, truth) -> xr.DataArray:
    """Radially averaged log-spectral distance in dB, per 2-D map, averaged over the other dims.

    ``sqrt(mean over radial wavenumbers of (10 log10(P_pred / P_truth))²)``
    with FFT power spectra from xrft (see `_isotropic_spectrum`).  Identical
    spectra give 0; a prediction with ``c`` times the truth's amplitude at every
    wavenumber gives ``|20 log10 c|``.  Maps need at least 8 x 8 pixels.
    """
    p, t = _valid(pred, truth)
    ydim, xdim = grid.spatial_dims(t)
    if min(t.sizes[ydim], t.sizes[xdim]) < 8:
        raise ValueError(
            f"ralsd needs maps of at least 8 x 8 pixels ({ydim!r} x {xdim!r}), "
            f"got {t.sizes[ydim]} x {t.sizes[xdim]}"
        )
    log_ratio = 10 * np.log10(
        _isotropic_spectrum(p, ydim, xdim) / _isotropic_spectrum(t, ydim, xdim)
    )
    # log_ratio is a DataArray: NumPy's ufuncs keep it one (__array_ufunc__)
    return ((log_ratio**2).mean("freq_r") ** 0.5).mean()  # type: ignore[arg-type]


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
            _whole(f, [ydim, xdim]),
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


# -------------------------------------------------------------------- ensembles


def _members(pred: xr.DataArray, truth: xr.DataArray, sample_dim: Hashable, score: str) -> int:
    _require_dim(pred, sample_dim, score)
    if sample_dim in truth.dims:
        raise ValueError(
            f"{score}: the truth has the ensemble dimension {sample_dim!r}; only the "
            "prediction may (select one truth or rename the dimension)"
        )
    return pred.sizes[sample_dim]


def _crps_map(pred, truth, sample_dim: Hashable) -> tuple[xr.DataArray, xr.DataArray]:
    """CRPS at every point (xskillscore), and the masked truth."""
    import xskillscore as xs

    _members(pred, truth, sample_dim, "crps")
    p, t = _valid(pred, truth)
    return xs.crps_ensemble(t, _whole(p, [sample_dim]), member_dim=sample_dim, dim=[]), t


def crps(
    pred,
    truth,
    sample_dim: Hashable = "sample",
    dims: Sequence[Hashable] | None = None,
    lat_weighted: bool = False,
) -> xr.DataArray:
    """Continuous ranked probability score of an ensemble, mean over ``dims`` (all by default).

    Per point ``E|X - y| - E|X - X'|/2`` over the members (xskillscore's
    ``crps_ensemble``, from properscoring); in the variable's units, 0 is perfect,
    and a one-member ensemble scores its absolute error.
    """
    per_point, t = _crps_map(pred, truth, sample_dim)
    return _mean(per_point, dims, _weights(t, lat_weighted))


def spread_skill(
    pred,
    truth,
    sample_dim: Hashable = "sample",
    dims: Sequence[Hashable] | None = None,
    lat_weighted: bool = False,
) -> xr.DataArray:
    """Ensemble spread over the RMSE of the ensemble mean; 1 for a calibrated ensemble.

    ``sqrt((n + 1) / n * mean(var)) / rmse(ensemble mean)``, with ``var`` the
    unbiased (ddof=1) variance across the ``n`` members at each point.  The
    factor makes an ensemble whose members and truth are draws from the same
    distribution score 1 for any ``n`` (Fortin et al. 2014): the mean of ``n``
    draws misses the truth by ``(1 + 1/n)`` times the variance.  Below 1:
    over-confident; above 1: under-confident.
    """
    n = _members(pred, truth, sample_dim, "spread_skill")
    if n < 2:
        raise ValueError(f"spread_skill needs at least 2 members along {sample_dim!r}, got {n}")
    p, t = _valid(pred, truth)
    w = _weights(t, lat_weighted)
    # _valid left every member or none at a point: skipna=False keeps masked
    # points NaN without the 0/0 warnings of a NaN-skipping variance
    mean = p.mean([sample_dim], skipna=False)
    var = ((p - mean) ** 2).sum([sample_dim], skipna=False) / (n - 1)
    spread = ((n + 1) / n * _mean(var, dims, w)) ** 0.5
    return spread / _mean((mean - t) ** 2, dims, w) ** 0.5


def rank_histogram(pred, truth, sample_dim: Hashable = "sample") -> xr.DataArray:
    """Counts of the truth's rank among the ``n`` members, over ``rank`` 1 .. n + 1.

    At every valid point (every time, pixel and variable) the truth is ranked
    among the members (xskillscore's ``rank_histogram``; ties broken at random);
    a calibrated ensemble gives a flat histogram, an over-confident one a U, a
    biased one a slope.  `rank_flatness` sums it up in one number.  Loads the
    fields.
    """
    import xskillscore as xs

    # a Dataset: every variable's points together
    pairs = (
        [(pred[v], truth[v]) for v in pred.data_vars]
        if isinstance(pred, xr.Dataset)
        else [(pred, truth)]
    )
    parts = [_ranked_points(p, t, sample_dim) for p, t in pairs]
    obs = xr.concat([o for o, _ in parts], "point")
    ens = xr.concat([e for _, e in parts], "point")
    # xskillscore breaks ties (rare in continuous fields) with numpy's legacy
    # global generator: seeded here, and the caller's state put back
    state = np.random.get_state()  # noqa: NPY002
    try:
        np.random.seed(0)  # noqa: NPY002
        return xs.rank_histogram(obs, ens, dim="point", member_dim=str(sample_dim))
    finally:
        np.random.set_state(state)  # noqa: NPY002


def _ranked_points(pred, truth, sample_dim: Hashable) -> tuple[xr.DataArray, xr.DataArray]:
    """The valid points of one variable: truth ``[point]``, members ``[sample, point]``."""
    n = _members(pred, truth, sample_dim, "rank_histogram")
    p, t = _valid(pred, truth)
    t = t.reset_coords(drop=True)
    p = p.reset_coords(drop=True).transpose(sample_dim, *t.dims)
    tv = np.asarray(t.values)
    ok = np.isfinite(tv).ravel()
    obs = xr.DataArray(tv.ravel()[ok], dims="point")
    ens = xr.DataArray(np.asarray(p.values).reshape(n, -1)[:, ok], dims=(sample_dim, "point"))
    return obs, ens


def rank_flatness(pred, truth, sample_dim: Hashable = "sample") -> float:
    """How far the `rank_histogram` is from flat: Candille and Talagrand's (2005) delta.

    ``sum_i (s_i - N / (n + 1))² / (N n / (n + 1))`` over the ``n + 1`` bins of
    ``N`` ranks: about 1 for a calibrated ensemble (the value a flat
    histogram's sampling noise gives, for independent points), far above 1 for
    an unreliable one.  Neighbouring pixels are not independent, so a
    calibrated ensemble over a field scores somewhat above 1.
    """
    counts = np.asarray(rank_histogram(pred, truth, sample_dim).values, np.float64)
    total, bins = counts.sum(), counts.size
    return float(((counts - total / bins) ** 2).sum() / (total * (bins - 1) / bins))


def gradient_energy(field) -> xr.DataArray:
    """Mean squared difference between neighbouring pixels, per variable: how rough a field is.

    ``mean(dy² + dx²)`` over every map (and member) of ``field``, in squared
    units per pixel.  An ensemble mean is smoother than the truth; a member
    should be as rough: compare with the truth's (``gradient_energy(member) /
    gradient_energy(truth)``).
    """
    ydim, xdim = grid.spatial_dims(field)
    dy = field.diff(ydim) ** 2
    dx = field.diff(xdim) ** 2
    return dy.mean() + dx.mean()


def spread_scale(
    pred,
    truth,
    sample_dim: Hashable = "sample",
    dims: Sequence[Hashable] | None = None,
    lat_weighted: bool = False,
):
    """The factor ``alpha`` by which to scale the members' spread so that `spread_skill` is 1.

    Fit it on calibration data (e.g. years held out from training but not
    scored), apply it to other data with `scale_spread`.  Scaling every
    member's deviation from the ensemble mean by ``alpha`` leaves the mean (and
    its RMSE) unchanged and multiplies the spread by ``alpha``, so ``alpha`` is
    ``1 / spread_skill(pred, truth)``: above 1 for an over-confident ensemble
    (MC dropout usually is), below 1 for an under-confident one.

    Parameters
    ----------
    pred
        The ensemble, with ``sample_dim`` (at least 2 members).
    truth
        The reference on the same grid, without ``sample_dim``.
    sample_dim
        The ensemble-member dimension.
    dims
        Dimensions to fit one factor over (all by default: one number per
        variable); e.g. ``["time"]`` fits one factor per pixel.
    lat_weighted
        Cos-latitude weights for the spread and the error, as `spread_skill`.

    Returns
    -------
    xarray.Dataset or xarray.DataArray
        ``alpha`` as an xarray object (a Dataset of one factor per variable for a
        Dataset); lazy on Dask input.
    """
    return 1 / spread_skill(pred, truth, sample_dim, dims, lat_weighted)


def scale_spread(pred, alpha, sample_dim: Hashable = "sample"):
    """The ensemble with its spread scaled: ``mean + alpha (member - mean)``.

    Parameters
    ----------
    pred
        The ensemble, with ``sample_dim``.
    alpha
        A number, or an xarray object broadcasting against ``pred`` (what
        `spread_scale` returns: a Dataset applies per variable).
    sample_dim
        The ensemble-member dimension.

    Returns
    -------
    xarray.DataArray or xarray.Dataset
        Same type, dims and attributes as ``pred``; lazy on Dask input.  The
        ensemble mean is unchanged; NaN stays NaN.  A variable bounded below (a
        precipitation clamped at 0) is not clamped again: clip it if it matters.
    """
    _require_dim(pred, sample_dim, "scale_spread")
    with xr.set_options(keep_attrs=True):
        mean = pred.mean(sample_dim, skipna=False)
        out = mean + alpha * (pred - mean)
    return out.transpose(*pred.dims)


# --------------------------------------------------------------------- evaluate


# Dask inputs of `evaluate` that together take at most this many bytes are read
# in one `dask.compute` (every method, the truth and the baseline at once) and
# scored in memory: building the lazy graph of every score costs more (about
# 0.5 s per method) than scoring a small field.
SMALL_INPUT_BYTES = 64 * 2**20
# False outside `evaluate`; True inside, once the inputs are settled
_SMALL_LOADED: ContextVar[bool] = ContextVar("_SMALL_LOADED", default=False)


def _loaded_if_small(fields: list[Any]) -> list[Any]:
    """``fields`` (None allowed), the Dask-backed ones computed together if all are small."""
    lazy = [f for f in fields if f is not None and dask.is_dask_collection(f)]
    total = sum(int(f.nbytes) for f in fields if f is not None)
    if not lazy or total > SMALL_INPUT_BYTES:
        return fields
    done = iter(dask.compute(*lazy))
    return [next(done) if f is not None and dask.is_dask_collection(f) else f for f in fields]


def _evaluate_one(pred, truth, baseline, time_dim, sample_dim) -> dict[str, xr.DataArray]:
    if sample_dim in truth.dims:
        raise ValueError(
            f"the truth has the ensemble dimension {sample_dim!r}; only the prediction may"
        )
    scores: dict[str, xr.DataArray] = {}
    if baseline is not None:
        if sample_dim in baseline.dims:
            baseline = baseline.mean(sample_dim)
        scores["rmse_baseline"] = rmse(baseline, truth)
    # aligned and masked once here, for every score below
    pred, truth = _valid(pred, truth)
    token = _ALREADY_VALID.set(True)
    try:
        scores = _scores(pred, truth, time_dim, sample_dim) | scores
    finally:
        _ALREADY_VALID.reset(token)
    if baseline is not None:
        scores["skill_rmse"] = 1 - scores["rmse"] / scores["rmse_baseline"]
    return scores


def _scores(pred, truth, time_dim, sample_dim) -> dict[str, xr.DataArray]:
    """Every score of one aligned, masked pair (`_evaluate_one`)."""
    ensemble = sample_dim in pred.dims
    # deterministic scores judge the ensemble mean; the distributional ones
    # below take every member, whose extremes and small scales the mean lacks
    det = pred.mean(sample_dim) if ensemble else pred
    latw = _has_latitude(truth)
    scores = {"rmse": rmse(det, truth)}
    if latw:
        scores["rmse_latw"] = rmse(det, truth, lat_weighted=True)
    scores["mae"] = mae(det, truth)
    if latw:
        scores["mae_latw"] = mae(det, truth, lat_weighted=True)
    scores |= {
        "bias": bias(det, truth),
        "r2": r2(det, truth),
        "pearson": pearson(det, truth),
        "ssim": ssim(det, truth),
        "psnr": psnr(det, truth),
    }
    ydim, xdim = grid.spatial_dims(truth)
    if min(truth.sizes[ydim], truth.sizes[xdim]) >= 8:
        scores["ralsd"] = ralsd(pred, truth)

    def add_means(name: str, per_pixel: xr.DataArray, t: xr.DataArray) -> None:
        # one per-pixel map for both means: NumPy input would compute it twice
        scores[name] = _mean(per_pixel, None, None)
        if latw:
            scores[f"{name}_latw"] = _mean(per_pixel, None, _weights(t, True))

    if time_dim in truth.dims and truth.sizes[time_dim] > 1:
        scores["anomaly_r2"] = anomaly_r2(det, truth, time_dim)
        add_means("p99_bias", *_quantile_map(pred, truth, 0.99, time_dim))
        add_means("p01_bias", *_quantile_map(pred, truth, 0.01, time_dim))
        if truth.sizes[time_dim] > 2 and _is_dates(truth[time_dim]):
            add_means("trend_bias", *_trend_map(pred, truth, time_dim))
    if ensemble:
        add_means("crps", *_crps_map(pred, truth, sample_dim))
        if pred.sizes[sample_dim] > 1:
            scores["spread_skill"] = spread_skill(pred, truth, sample_dim)
    # one member's roughness over the truth's (1: as rough; a blurred field < 1)
    scores["gradient_energy_ratio"] = gradient_energy(pred) / gradient_energy(truth)
    return scores


_IN_UNITS = ("rmse", "mae", "bias", "rmse_baseline", "p99_bias", "p01_bias", "crps")


def evaluate(
    pred: Field | Mapping[str, Field],
    truth: Field,
    *,
    baseline: Field | None = None,
    time_dim: Hashable = "time",
    sample_dim: Hashable = "sample",
) -> xr.Dataset:
    """Scores of ``pred`` against ``truth``, one row per variable (and per method).

    Parameters
    ----------
    pred
        A prediction with the truth's variables on the truth's grid (a DataArray
        is one variable), or a dict ``{method_name: prediction}`` to compare
        several methods at once.  A prediction with ``sample_dim`` is an ensemble.
    truth
        The reference; it may not have ``sample_dim``.
    baseline
        Optional reference forecast (e.g. bicubic): adds ``rmse_baseline`` and
        ``skill_rmse = 1 - rmse / rmse_baseline`` (positive: better than it).
    time_dim
        For ``anomaly_r2``, the quantile and the trend scores.
    sample_dim
        The ensemble-member dimension.

    Returns
    -------
    xarray.Dataset
        ``xr.Dataset`` with dimension ``variable`` (``(method, variable)`` for a
        dict, the method coordinate in the dict's order) and data variables
        ``rmse``, ``mae``, ``bias``, ``r2``, ``pearson``, ``ssim``, ``psnr``,
        ``gradient_energy_ratio`` (the prediction's, or a member's, roughness
        over the truth's, `gradient_energy`); ``ralsd`` on maps of at least 8 x 8 pixels; with more than one time step ``anomaly_r2``, ``p99_bias``,
        ``p01_bias``; with more than two dated steps ``trend_bias``; for an
        ensemble ``crps`` and ``spread_skill``; ``_latw`` variants of rmse, mae,
        the quantile, trend and crps scores on latitude grids; the baseline scores.
        A score one method of a dict lacks (crps of a deterministic one) is NaN.
        Lazy on Dask input: call ``.compute()``.  Dask inputs that together
        take at most `SMALL_INPUT_BYTES` (64 MiB) are instead read in one
        ``dask.compute`` (every method, the truth and the baseline at once)
        and scored in memory: for a small field that is faster than building
        the lazy graph of every score.

    Raises
    ------
    KeyError
        If a variable of ``pred`` is missing from ``truth`` (or ``baseline``).
    ValueError
        If the grids differ (matched by value: truth and baseline may come in another
        orientation, longitude convention or a larger domain), or the truth has
        ``sample_dim``.
    """
    if not _SMALL_LOADED.get():
        token = _SMALL_LOADED.set(True)  # the inputs of this call, loaded or not, once
        try:
            names: list[str] | None = None
            given: list[Any] = [pred]
            if isinstance(pred, Mapping) and not isinstance(pred, xr.Dataset):
                names, given = list(pred), list(pred.values())
            *loaded, truth, baseline = _loaded_if_small([*given, truth, baseline])
            pred = loaded[0] if names is None else dict(zip(names, loaded, strict=True))
            return evaluate(
                pred, truth, baseline=baseline, time_dim=time_dim, sample_dim=sample_dim
            )
        finally:
            _SMALL_LOADED.reset(token)
    if isinstance(pred, Mapping) and not isinstance(pred, xr.Dataset):  # a Dataset is a Mapping
        if not pred:
            raise ValueError("evaluate got an empty dict of predictions; give {name: prediction}")
        rows = [
            evaluate(p, truth, baseline=baseline, time_dim=time_dim, sample_dim=sample_dim)
            for p in pred.values()
        ]
        out = xr.concat(
            rows, dim="method", data_vars="all", coords="minimal", compat="equals", join="outer"
        )
        return out.assign_coords(method=[str(m) for m in pred])

    def as_ds(obj, name):
        if obj is None or isinstance(obj, xr.Dataset):
            return obj
        return obj.to_dataset(name=obj.name if obj.name is not None else name)

    # an unnamed prediction takes the truth's name, so methods line up by variable
    default = truth.name if isinstance(truth, xr.DataArray) and truth.name is not None else "var"
    pred_ds, truth_ds, base_ds = as_ds(pred, default), as_ds(truth, None), as_ds(baseline, None)
    names = list(pred_ds.data_vars)
    if isinstance(truth, xr.DataArray) and len(names) == 1:
        truth_ds = truth.to_dataset(name=names[0])
    if isinstance(baseline, xr.DataArray) and len(names) == 1:
        base_ds = baseline.to_dataset(name=names[0])
    # truth and baseline on the prediction's cells, matched by value: another
    # orientation, a larger domain or the other longitude convention is fine
    truth_ds = grid.match_grid(truth_ds, pred_ds, label="truth", ref_label="prediction")
    if base_ds is not None:
        base_ds = grid.match_grid(base_ds, pred_ds, label="baseline", ref_label="prediction")
    rows = []
    for name in names:
        for label, ds in (("truth", truth_ds), ("baseline", base_ds)):
            if ds is not None and name not in ds:
                raise KeyError(
                    f"variable {name!r} is not in the {label} (has {sorted(map(str, ds))})"
                )
        base = base_ds[name] if base_ds is not None else None
        scores = _evaluate_one(pred_ds[name], truth_ds[name], base, time_dim, sample_dim)
        # (dims, data): a score keeps neither the field's coords nor its attrs
        # (an rmse is no air_temperature); units are set below
        rows.append(xr.Dataset({k: (v.dims, v.data) for k, v in scores.items()}))
    out = xr.concat(rows, dim="variable", data_vars="all", coords="minimal", join="outer")
    out = out.assign_coords(variable=[str(n) for n in names])
    units = {pred_ds[n].attrs.get("units") for n in names}
    if len(units) == 1 and None not in units:
        unit = units.pop()
        for key in out.data_vars:
            if str(key).removesuffix("_latw") in _IN_UNITS:
                out[key].attrs["units"] = unit
            elif str(key).startswith("trend_bias"):
                out[key].attrs["units"] = f"{unit} / decade"
    for key in ("psnr", "ralsd"):
        if key in out:
            out[key].attrs["units"] = "dB"
    return out
