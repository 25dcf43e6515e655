"""Skill scores and `evaluate` against independent NumPy / closed-form numbers."""

import warnings

import cftime
import dask
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy.stats import norm

import xorbit
from tests.test_accessor import coarse_field
from xorbit import coarsen
from xorbit.datasets import hadcm3_air_temperature
from xorbit.metrics import (
    anomaly_r2,
    bias,
    crps,
    fractional_year,
    mae,
    p01_bias,
    p99_bias,
    pearson,
    power_spectra,
    quantile_bias,
    r2,
    ralsd,
    rmse,
    spread_skill,
    trend,
    trend_bias,
)


def maps(seed=0, nt=3):
    from tests.datasets import powerlaw_field

    t = 280 + 10 * powerlaw_field((nt, 24, 32), seed=seed)
    p = t + np.random.default_rng(seed).normal(scale=0.8, size=t.shape).astype(np.float32)
    truth = coarse_field(t, dlat=2.5).rename("tas")  # 15-72.5 N
    return truth.copy(data=p), truth


def field(data, time):
    """``data[time, lat, lon]`` on a 2.5-degree grid from 15 N with the given time values."""
    return coarse_field(np.asarray(data, np.float64), dlat=2.5).assign_coords(time=time)


def cos_lat(truth, shape):
    """cos(latitude) broadcast to ``shape`` (lat is the second-to-last axis)."""
    return np.broadcast_to(np.cos(np.deg2rad(truth.lat.values))[:, None], shape)


def no_compute(*args, **kwargs):
    raise AssertionError("a Dask graph was computed while only building it")


# ------------------------------------------------------------------ deterministic


def test_metrics_against_numpy():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(10, 4, 5))
    p = t + rng.normal(scale=0.3, size=t.shape) + 0.1
    truth = xr.DataArray(t, dims=("time", "y", "x"))
    pred = xr.DataArray(p, dims=("time", "y", "x"))
    assert float(rmse(pred, truth)) == pytest.approx(np.sqrt(np.mean((p - t) ** 2)))
    assert float(bias(pred, truth)) == pytest.approx(np.mean(p - t))
    assert float(r2(pred, truth)) == pytest.approx(
        1 - np.sum((p - t) ** 2) / np.sum((t - t.mean()) ** 2)
    )
    pa, ta = p - p.mean(0), t - t.mean(0)
    assert float(anomaly_r2(pred, truth)) == pytest.approx(
        1 - np.sum((pa - ta) ** 2) / np.sum((ta - ta.mean()) ** 2)
    )
    # a per-pixel constant offset leaves anomaly R2 unchanged
    offset = pred + xr.DataArray(rng.normal(size=(4, 5)), dims=("y", "x"))
    assert float(anomaly_r2(offset, truth)) == pytest.approx(float(anomaly_r2(pred, truth)))
    # NaN in either is skipped
    t2 = t.copy()
    t2[0, 0, 0] = np.nan
    ok = ~np.isnan(t2)
    assert float(rmse(pred, truth.copy(data=t2))) == pytest.approx(
        np.sqrt(np.mean((p - t2)[ok] ** 2))
    )
    # "y" here is a bare index, not latitude: no cos weights of it
    with pytest.raises(ValueError, match="latitudes on dimension 'y'"):
        rmse(pred, truth, lat_weighted=True)


def test_global_scores_give_xskillscores_numbers():
    """Same numbers as xskillscore (kept as xarray reductions: see the module docstring)."""
    xs = pytest.importorskip("xskillscore")
    pred, truth = maps(nt=4)
    pred, truth = pred.astype(np.float64), truth.astype(np.float64)
    truth[1, 3:6, 4:9] = np.nan
    w = xr.DataArray(cos_lat(truth, truth.shape), dims=truth.dims, coords=truth.coords)
    kw = {"dim": list(truth.dims), "skipna": True}
    assert float(rmse(pred, truth)) == pytest.approx(float(xs.rmse(pred, truth, **kw)))
    assert float(mae(pred, truth)) == pytest.approx(float(xs.mae(pred, truth, **kw)))
    assert float(bias(pred, truth)) == pytest.approx(float(xs.me(pred, truth, **kw)))
    assert float(r2(pred, truth)) == pytest.approx(float(xs.r2(truth, pred, **kw)))
    assert float(pearson(pred, truth)) == pytest.approx(float(xs.pearson_r(pred, truth, **kw)))
    assert float(rmse(pred, truth, lat_weighted=True)) == pytest.approx(
        float(xs.rmse(pred, truth, weights=w, **kw))
    )
    assert float(mae(pred, truth, lat_weighted=True)) == pytest.approx(
        float(xs.mae(pred, truth, weights=w, **kw))
    )


def test_ssim_and_psnr_match_scikit_image():
    skm = pytest.importorskip("skimage.metrics")
    from xorbit.metrics import psnr, ssim

    pred, truth = maps()
    rng_ = float(truth.max() - truth.min())
    expected = np.mean(
        [
            skm.structural_similarity(
                truth.values[i].astype(np.float64),
                pred.values[i].astype(np.float64),
                data_range=rng_,
            )
            for i in range(3)
        ]
    )
    assert float(ssim(pred, truth)) == pytest.approx(expected, rel=1e-6)
    ps = skm.peak_signal_noise_ratio(truth.values, pred.values, data_range=rng_)
    assert float(psnr(pred, truth)) == pytest.approx(ps, rel=1e-5)
    assert float(ssim(truth, truth)) == pytest.approx(1.0)


# ------------------------------------------------------------------------ trends


def years_360(times):
    return np.array([t.year + ((t.month - 1) * 30 + t.day - 1) / 360 for t in times])


def years_noleap(times):
    before = np.cumsum([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30])
    return np.array([t.year + (before[t.month - 1] + t.day - 1) / 365 for t in times])


def years_gregorian(times):
    t = pd.DatetimeIndex(times)
    day = t.day_of_year - 1 + (t.hour * 3600 + t.minute * 60 + t.second) / 86400
    return np.asarray(t.year + day / np.where(t.is_leap_year, 366, 365))


TIME_AXES = {
    # annual means on HadCM3's 360-day calendar, dated mid-year
    "annual 360_day": (
        [cftime.Datetime360Day(1860 + i, 6, 1) for i in range(60)],
        years_360,
    ),
    "monthly noleap": (
        xr.date_range("2001-01-01", periods=120, freq="MS", calendar="noleap", use_cftime=True),
        years_noleap,
    ),
    # through two leap years, stamped at noon
    "daily datetime64": (
        pd.date_range("1999-01-01T12:00", periods=6 * 365, freq="D").values,
        years_gregorian,
    ),
}


@pytest.mark.parametrize("axis", list(TIME_AXES))
def test_trend_bias_finds_an_added_trend_in_every_calendar(axis):
    times, years = TIME_AXES[axis]
    yrs = years(times)
    rng = np.random.default_rng(1)
    t = rng.normal(size=(len(yrs), 4, 5))
    truth = field(t, times)
    pred = truth + 0.03 * xr.DataArray(
        yrs, dims="time", coords={"time": truth.time}
    )  # 0.3 K/decade
    np.testing.assert_allclose(fractional_year(truth.time), yrs, rtol=0, atol=1e-9)
    assert float(trend_bias(pred, truth)) == pytest.approx(0.3, abs=1e-6)
    assert float(trend_bias(pred, truth, lat_weighted=True)) == pytest.approx(0.3, abs=1e-6)

    # per pixel, NumPy's least-squares line over the valid steps (one pixel has a gap)
    t[5, 2, 3] = np.nan
    per_pixel = trend(field(t, times))
    assert per_pixel.dims == ("lat", "lon")
    expected = np.array(
        [
            [np.polyfit(yrs[ok], s[ok], 1)[0] * 10 for s in row for ok in [~np.isnan(s)]]
            for row in np.moveaxis(t, 0, -1)
        ]
    )
    np.testing.assert_allclose(per_pixel, expected, rtol=1e-9, atol=1e-12)


def test_trend_needs_dates():
    _, truth = maps()
    with pytest.raises(ValueError, match="time coordinate 'time' holds int64 values, not dates"):
        trend(truth)
    with pytest.raises(ValueError, match="trend needs dimension 'year'"):
        trend(truth, "year")


# --------------------------------------------------------------------- quantiles


def test_p99_and_p01_bias_match_numpys_per_pixel_quantiles():
    rng = np.random.default_rng(2)
    t = rng.gamma(2.0, size=(200, 6, 7))
    p = 1.2 * rng.gamma(2.0, size=t.shape)
    t[3, 1, 1] = np.nan  # a missing value drops that step from both
    p[10, 4, 2] = np.nan
    p[:, 0, 0] = np.nan  # a pixel missing throughout drops out
    truth, pred = field(t, np.arange(200)), field(p, np.arange(200))
    both = ~np.isnan(t) & ~np.isnan(p)
    tm, pm = np.where(both, t, np.nan), np.where(both, p, np.nan)
    w = cos_lat(truth, t.shape[1:])
    scores = [(p99_bias, 0.99), (p01_bias, 0.01)]
    scores += [(lambda *a, q=q, **k: quantile_bias(*a, q=q, **k), q) for q in (0.0, 0.5, 1.0)]
    for score, q in scores:
        with warnings.catch_warnings():  # the pixel missing throughout
            warnings.simplefilter("ignore", RuntimeWarning)
            diff = np.nanquantile(pm, q, axis=0) - np.nanquantile(tm, q, axis=0)
        assert float(score(pred, truth)) == pytest.approx(np.nanmean(diff), rel=1e-12)
        ok = ~np.isnan(diff)
        latw = np.sum(w[ok] * diff[ok]) / np.sum(w[ok])
        assert float(score(pred, truth, lat_weighted=True)) == pytest.approx(latw, rel=1e-12)
    assert float(p99_bias(pred, truth)) > 0.5  # 20 % too wet in the tail

    # an ensemble: each member's quantiles against the truth's, then averaged
    t = np.nan_to_num(t, nan=0.5)
    members = rng.gamma(2.0, size=(3, *t.shape))
    ens = truth.expand_dims(sample=3).copy(data=members)
    expected = np.mean(
        [np.quantile(m, 0.99, axis=0) - np.quantile(t, 0.99, axis=0) for m in members]
    )
    assert float(p99_bias(ens, truth.copy(data=t))) == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------- spectra


def test_ralsd_of_known_spectra():
    pred, truth = maps(nt=4)
    truth = truth.astype(np.float64)
    assert float(ralsd(truth, truth)) == pytest.approx(0.0, abs=1e-12)
    # c times the anomaly is c times the amplitude at every wavenumber (the mean
    # and any plane are detrended away): |10 log10 c²| dB
    for c in (2.0, 0.5):
        scaled = 280 + c * (truth - 280)
        assert float(ralsd(scaled, truth)) == pytest.approx(abs(10 * np.log10(c**2)), rel=1e-9)
    # a factor per map: the mean of the per-map distances
    c = xr.DataArray([1.5, 2.0, 3.0, 1.0], dims="time", coords={"time": truth.time})
    expected = np.mean(np.abs(20 * np.log10(c.values)))
    assert float(ralsd(c * truth, truth)) == pytest.approx(expected, rel=1e-9)
    # white noise lifts the small scales, where the power-law truth has little
    assert float(ralsd(pred, truth)) > 0.1
    with pytest.raises(ValueError, match=r"ralsd needs maps of at least 8 x 8 pixels \('lat'"):
        ralsd(truth.isel(lat=slice(0, 6)), truth.isel(lat=slice(0, 6)))


def test_power_spectra_see_missing_small_scales():
    fine = hadcm3_air_temperature().isel(time=slice(0, 10))
    up = coarsen(fine, 4).orbit.interpolate(4, "bicubic")
    truth = fine.assign_coords(latitude=up.latitude, longitude=up.longitude)
    spec = power_spectra(truth=truth, bicubic=up)
    assert spec.sizes["wavenumber"] == 48
    # beyond the coarse grid's resolution (12 half-cycles along 48 fine pixels)
    # interpolation has almost no variance; at large scales it has all of it
    hi = spec.sel(wavenumber=slice(16, None))
    assert float(hi.bicubic.sum() / hi.truth.sum()) < 0.1
    lo = spec.sel(wavenumber=slice(1, 3))
    assert float(lo.bicubic.sum() / lo.truth.sum()) == pytest.approx(1.0, abs=0.03)
    # and RALSD sees the same: bicubic is several dB off, a perfect field 0
    assert float(ralsd(up, truth)) > 3
    chunked = power_spectra(truth=truth.chunk(time=3, latitude=10, longitude=20))
    assert chunked.truth.chunks is not None
    np.testing.assert_allclose(chunked.truth.values, spec.truth.values, rtol=1e-10)


# --------------------------------------------------------------------- ensembles


def gaussian_ensemble(n_members, spread=1.0, seed=3, shape=(40, 8, 10)):
    """Truth and members drawn from N(mu, sigma) with mu, sigma varying in space and time."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(scale=3.0, size=shape)
    sigma = 0.5 + rng.uniform(size=shape)
    y = mu + sigma * rng.standard_normal(shape)
    x = mu + spread * sigma * rng.standard_normal((n_members, *shape))
    truth = field(y, np.arange(shape[0]))
    ens = truth.expand_dims(sample=n_members).copy(data=x)
    return ens, truth, mu, sigma, y, x


def test_crps_of_a_gaussian_ensemble_matches_the_closed_form():
    ens, truth, mu, sigma, y, _ = gaussian_ensemble(400, shape=(10, 8, 10))
    z = (y - mu) / sigma
    closed = sigma * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / np.sqrt(np.pi))
    assert float(crps(ens, truth)) == pytest.approx(closed.mean(), rel=0.02)
    w = cos_lat(truth, closed.shape)
    assert float(crps(ens, truth, lat_weighted=True)) == pytest.approx(
        np.sum(w * closed) / np.sum(w), rel=0.02
    )

    # exactly the ensemble estimator E|X - y| - E|X - X'| / 2 at every point
    ens, truth, *_, y, x = gaussian_ensemble(7, shape=(3, 8, 10))
    exact = np.abs(x - y).mean(0) - 0.5 * np.abs(x[:, None] - x[None]).mean((0, 1))
    assert float(crps(ens, truth)) == pytest.approx(exact.mean(), rel=1e-10)
    with pytest.raises(ValueError, match="crps: the truth has the ensemble dimension 'sample'"):
        crps(ens, ens)
    with pytest.raises(ValueError, match="crps needs dimension 'member'"):
        crps(ens, truth, sample_dim="member")


def test_spread_skill_is_one_for_a_calibrated_ensemble():
    n = 5  # small, so that the (n + 1) / n correction matters: without it 0.91
    ens, truth, *_, y, x = gaussian_ensemble(n, shape=(200, 8, 10))
    ratio = float(spread_skill(ens, truth))
    assert ratio == pytest.approx(1.0, abs=0.02)
    expected = np.sqrt((n + 1) / n * x.var(0, ddof=1).mean()) / np.sqrt(
        ((x.mean(0) - y) ** 2).mean()
    )
    assert ratio == pytest.approx(expected, rel=1e-12)
    under, truth, *_ = gaussian_ensemble(n, spread=0.5, shape=(200, 8, 10))
    assert float(spread_skill(under, truth)) < 0.7  # over-confident
    with pytest.raises(ValueError, match="at least 2 members along 'sample', got 1"):
        spread_skill(ens.isel(sample=[0]), truth)


# ---------------------------------------------------------------------- evaluate


def test_evaluate_returns_every_score_per_variable():
    pred, truth = maps()
    base = truth + 1.5  # a worse baseline
    scores = xorbit.evaluate(pred.chunk(time=1), truth, baseline=base).compute()
    assert list(scores.variable.values) == ["tas"]
    deterministic = {"rmse", "rmse_latw", "mae", "mae_latw", "bias", "r2", "pearson"}
    maps_and_time = {"ssim", "psnr", "ralsd", "anomaly_r2", "p99_bias", "p99_bias_latw"}
    maps_and_time.add("gradient_energy_ratio")
    # no trend: the time axis holds step numbers, not dates
    expected_keys = {*deterministic, *maps_and_time, "p01_bias", "p01_bias_latw"}
    assert set(scores.data_vars) == expected_keys | {"rmse_baseline", "skill_rmse"}
    p, t = pred.values, truth.values
    s = scores.sel(variable="tas")
    assert float(s.rmse) == pytest.approx(np.sqrt(np.mean((p - t) ** 2)), rel=1e-5)
    assert float(s.mae) == pytest.approx(np.mean(np.abs(p - t)), rel=1e-5)
    assert float(s.pearson) == pytest.approx(np.corrcoef(p.ravel(), t.ravel())[0, 1], rel=1e-5)
    assert float(s.rmse_baseline) == pytest.approx(1.5, rel=1e-5)
    assert float(s.skill_rmse) == pytest.approx(1 - float(s.rmse) / 1.5, rel=1e-5)
    w = cos_lat(truth, p.shape)
    latw = np.sqrt(np.sum(w * (p - t) ** 2) / np.sum(w))
    assert float(s.rmse_latw) == pytest.approx(latw, rel=1e-5)

    def roughness(a):
        return np.mean(np.diff(a, axis=-2) ** 2) + np.mean(np.diff(a, axis=-1) ** 2)

    assert float(s.gradient_energy_ratio) == pytest.approx(roughness(p) / roughness(t), rel=1e-5)
    assert scores.rmse.attrs["units"] == "K"
    assert scores.ralsd.attrs["units"] == "dB"
    assert float(pearson(truth, truth)) == pytest.approx(1.0)
    with pytest.raises(KeyError, match="'pr' is not in the truth"):
        xorbit.evaluate(pred.rename("pr").to_dataset(), truth.to_dataset())
    with pytest.raises(ValueError, match="truth's 'lat' values are not the prediction's"):
        xorbit.evaluate(pred, truth.assign_coords(lat=truth.lat + 0.1))

    dated = xorbit.evaluate(
        *(x.assign_coords(time=TIME_AXES["monthly noleap"][0][:3]) for x in (pred, truth))
    )
    assert {"trend_bias", "trend_bias_latw"} <= set(dated.data_vars)
    assert dated.trend_bias.attrs["units"] == "K / decade"
    # on a grid without latitudes there are no latitude-weighted scores
    plain = xorbit.evaluate(*(x.rename(lat="y", lon="x").drop_vars(["y", "x"]) for x in maps()))
    assert not any(str(k).endswith("_latw") for k in plain.data_vars)
    # maps too small for radial spectra: no ralsd (SSIM still works from 7 x 7)
    small = xorbit.evaluate(pred[:, :7, :7], truth[:, :7, :7])
    assert "ralsd" not in small and "ssim" in small


def two_variables(seed):
    pred, truth = maps(seed=seed, nt=6)
    times = TIME_AXES["monthly noleap"][0][:6]
    pred, truth = (x.astype(np.float64).assign_coords(time=times) for x in (pred, truth))
    return (
        xr.Dataset({"tas": pred, "tas2": 2 * pred}),
        xr.Dataset({"tas": truth, "tas2": 2 * truth}),
    )


def ensemble_of(truth, seed, n=4):
    rng = np.random.default_rng(seed)
    return truth.expand_dims(sample=n).map(lambda v: v + rng.normal(size=v.shape))


def test_evaluate_compares_methods_like_separate_calls():
    noisy, truth = two_variables(seed=4)
    ens = ensemble_of(truth, seed=5)
    scores = xorbit.evaluate({"noisy": noisy, "ensemble": ens}, truth, baseline=truth + 1)
    assert scores.rmse.dims == ("method", "variable")
    assert list(scores.method.values) == ["noisy", "ensemble"]
    assert list(scores.variable.values) == ["tas", "tas2"]
    alone = {
        name: xorbit.evaluate(p, truth, baseline=truth + 1)
        for name, p in (("noisy", noisy), ("ensemble", ens))
    }
    for name, one in alone.items():
        row = scores.sel({"method": name}, drop=True)  # sel(method=) is sel's own argument
        xr.testing.assert_allclose(row[list(one.data_vars)], one)
    # scores only an ensemble has are NaN for the deterministic method
    assert np.isnan(scores.crps.sel({"method": "noisy"})).all()
    assert set(alone["ensemble"].data_vars) - set(alone["noisy"].data_vars) == {
        "crps",
        "crps_latw",
        "spread_skill",
    }
    # deterministic scores of an ensemble are those of its mean
    mean_scores = xorbit.evaluate(ens.mean("sample"), truth)
    for key in ("rmse", "mae", "bias", "r2", "pearson", "ssim", "psnr", "anomaly_r2"):
        np.testing.assert_allclose(alone["ensemble"][key], mean_scores[key], rtol=1e-10)
    with pytest.raises(ValueError, match="empty dict"):
        xorbit.evaluate({}, truth)
    with pytest.raises(ValueError, match="truth has the ensemble dimension 'sample'"):
        xorbit.evaluate(ens, ens)


def test_small_dask_inputs_are_read_in_one_compute_and_scored_alike(monkeypatch):
    """Each method's graph of every score took seconds to build for a small field."""
    noisy, truth = two_variables(seed=6)
    ens = ensemble_of(truth, seed=7)
    preds = {"noisy": noisy, "ensemble": ens}
    eager = xorbit.evaluate(preds, truth, baseline=truth + 1)
    calls = []
    compute = dask.compute
    monkeypatch.setattr(dask, "compute", lambda *a, **k: calls.append(len(a)) or compute(*a, **k))
    chunked = xorbit.evaluate(
        {k: v.chunk(time=4) for k, v in preds.items()},
        truth.chunk(time=4),
        baseline=(truth + 1).chunk(time=4),
    )
    assert calls == [4]  # two methods, the truth and the baseline, together
    assert all(v.chunks is None for v in chunked.data_vars.values())  # in memory already
    xr.testing.assert_allclose(chunked, eager, rtol=1e-9)


def test_every_score_is_lazy_and_chunking_does_not_change_it(monkeypatch):
    monkeypatch.setattr(xorbit.metrics, "SMALL_INPUT_BYTES", 0)  # stay lazy however small
    noisy, truth = two_variables(seed=6)
    ens = ensemble_of(truth, seed=7)
    truth["tas"][2, 5:9, 3:12] = np.nan  # a masked patch
    preds = {"noisy": noisy, "ensemble": ens}
    eager = xorbit.evaluate(preds, truth, baseline=truth + 1)

    def chunk(x):  # several chunks along time and both spatial dims
        return x.chunk(time=4, lat=10, lon=12)

    with dask.config.set(scheduler=no_compute):
        lazy = xorbit.evaluate(
            {k: chunk(v) for k, v in preds.items()}, chunk(truth), baseline=chunk(truth + 1)
        )
        tr = trend(chunk(truth.tas))
    assert all(v.chunks is not None for v in lazy.data_vars.values())
    assert tr.chunks is not None
    assert {"trend_bias", "p99_bias", "p01_bias", "ralsd", "crps", "spread_skill"} <= set(lazy)
    xr.testing.assert_allclose(lazy.compute(), eager, rtol=1e-9)
    np.testing.assert_allclose(tr.values, trend(truth.tas).values, rtol=1e-9)
