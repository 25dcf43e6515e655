"""`xorbit.baseline`: interpolation, climatology (delta), ridge and QDM on real and generated data."""

import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import xorbit
from xorbit import coarsen
from xorbit.baselines import fit_ridge
from xorbit.datasets import hadcm3_air_temperature
from xorbit.grid import match_grid
from xorbit.metrics import anomaly_r2, rmse
from xorbit.regrid import upsample_array
from xorbit.ridge import windows as _windows

SPLIT = 2040


@pytest.fixture(scope="module")
def hadcm3():
    """The demo split: train up to 2040, hold out 2041-2099."""
    fine = hadcm3_air_temperature()
    coarse = coarsen(fine, 4)
    fine = fine.isel(latitude=slice(0, 36), longitude=slice(0, 48))
    train = fine.time.dt.year <= SPLIT
    return {
        "train": (coarse.sel(time=train), fine.sel(time=train)),
        "test": (coarse.sel(time=~train), fine.sel(time=~train)),
    }


def test_climatology_is_its_definition(hadcm3):
    (ct, ft), (cs, _) = hadcm3["train"], hadcm3["test"]
    got = xorbit.baseline(cs, "climatology", train=(ct, ft))
    up = lambda c: upsample_array(c.values.astype(np.float64), 4, "bicubic")  # noqa: E731
    expected = up(cs) + (ft.values - up(ct)).mean(axis=0)
    assert got.dims == cs.dims and got.shape == (59, 36, 48)
    np.testing.assert_allclose(got.values, expected, rtol=0, atol=1e-4)
    # on the grid .orbit.interpolate (and .orbit.downscale) gives
    xr.testing.assert_identical(got.latitude, cs.orbit.interpolate(4).latitude)


def test_ridge_beats_climatology_on_held_out_years(hadcm3):
    (ct, ft), (cs, truth) = hadcm3["train"], hadcm3["test"]
    scores = {}
    for method in ("bicubic", "climatology", "ridge"):
        pred = xorbit.baseline(cs, method, train=(ct, ft))
        t = match_grid(truth, pred)
        scores[method] = (float(rmse(pred, t)), float(anomaly_r2(pred, t)))
    (rb, ab), (rc, ac), (rr, ar) = scores["bicubic"], scores["climatology"], scores["ridge"]
    assert rb == pytest.approx(0.940, abs=0.002) and rc == pytest.approx(0.271, abs=0.002)
    assert ar > ac + 0.001 and rr < rc - 0.02, scores  # measured: 0.2244 K, 0.9764
    assert ab == pytest.approx(ac, abs=1e-4)  # a constant offset leaves anomalies alone


def test_qdm_reproduces_the_training_quantiles(hadcm3):
    ct, ft = hadcm3["train"]
    got = xorbit.baseline(ct, "qdm", train=(ct, ft), nquantiles=50)
    q = [0.05, 0.25, 0.5, 0.75, 0.95]
    want = ft.quantile(q, "time").values
    have = got.quantile(q, "time").values
    bicubic = ct.orbit.interpolate(4).quantile(q, "time").values
    err, before = np.abs(have - want), np.abs(bicubic - want)
    # measured: mean 0.005 K, worst 0.12 K (of 6 K before); interpolation between 50 quantiles
    assert err.mean() < 0.02 and err.max() < 0.05 * before.max(), (err.mean(), err.max())


def test_dask_input_stays_lazy_and_equals_eager(hadcm3):
    (ct, ft), (cs, _) = hadcm3["train"], hadcm3["test"]
    for method in ("bilinear", "climatology", "ridge", "qdm"):
        eager = xorbit.baseline(cs, method, train=(ct, ft))
        lazy = xorbit.baseline(cs.chunk(time=10), method, train=(ct, ft))
        assert isinstance(lazy.data, da.Array), method
        np.testing.assert_allclose(lazy.values, eager.values, rtol=0, atol=1e-4, err_msg=method)


def test_a_dataset_gets_every_spatial_variable(hadcm3):
    (ct, ft), (cs, _) = hadcm3["train"], hadcm3["test"]
    ds = xr.Dataset({"tas": cs, "tas2": cs + 1.0, "year": cs.time.dt.year})
    train = (xr.Dataset({"tas": ct, "tas2": ct + 1.0}), xr.Dataset({"tas": ft, "tas2": ft + 1.0}))
    out = xorbit.baseline(ds, "climatology", train=train)
    assert set(out.data_vars) == {"tas", "tas2"} and "latitude_bnds" in out.coords
    np.testing.assert_allclose(out.tas2.values, out.tas.values + 1.0, atol=1e-4)


def test_ridge_recovers_a_known_linear_map():
    """Each fine pixel's residual is a known combination of coarse pixels near it."""
    rng = np.random.default_rng(0)
    t, ny, nx, k = 200, 6, 7, 2
    x = rng.standard_normal((t, ny, nx))
    own = np.repeat(np.repeat(x, k, axis=1), k, axis=2)  # each fine pixel: its own cell
    east = np.repeat(np.repeat(np.roll(x, -1, axis=2), k, axis=1), k, axis=2)
    r = 2.0 * own - 0.5 * east + 0.01 * rng.standard_normal((t, ny * k, nx * k))
    for window in (None, 1):  # the whole domain, and 3 x 3 windows wrapping in longitude
        fit = fit_ridge(x, r, k, window=window, periodic=True)
        test = rng.standard_normal((20, ny, nx))
        want = 2.0 * np.repeat(np.repeat(test, k, 1), k, 2) - 0.5 * np.repeat(
            np.repeat(np.roll(test, -1, axis=2), k, 1), k, 2
        )
        err = np.abs(fit.predict(test) - want).max()
        assert err < 0.05, (window, err, fit.alpha)
    # windows are shifted inward at a non-periodic edge and keep their size
    w = _windows(5, 5, 1, periodic=False)
    assert w.shape == (25, 9) and set(w[0]) == {0, 1, 2, 5, 6, 7, 10, 11, 12}


def test_errors_name_the_problem(hadcm3):
    (ct, ft), (cs, _) = hadcm3["train"], hadcm3["test"]
    with pytest.raises(ValueError, match="unknown baseline method 'krige'"):
        xorbit.baseline(cs, "krige", factor=4)
    with pytest.raises(ValueError, match=r"'ridge' is learnt from data: pass train="):
        xorbit.baseline(cs, "ridge")
    with pytest.raises(ValueError, match="pass factor="):
        xorbit.baseline(cs, "bicubic")
    with pytest.raises(ValueError, match="factor=2, but the training pair is 4 times finer"):
        xorbit.baseline(cs, "climatology", train=(ct, ft), factor=2)
    shifted = ft.assign_coords(latitude=ft.latitude + 0.5)
    with pytest.raises(ValueError, match=r"'latitude' values are not the grid's"):
        xorbit.baseline(cs, "climatology", train=(ct, shifted))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert xorbit.baseline(cs, "nearest", factor=4).shape == (59, 36, 48)


def test_ridge_reads_several_predictors():
    """A fine detail set by a second coarse variable (a wind) is out of reach of
    the output's own ridge and within reach of the ridge on both."""
    rng = np.random.default_rng(4)
    t, ny, nx, k = 80, 4, 5, 2
    lat = np.arange(ny) * 1.0 + 40
    lon = np.arange(nx) * 1.0 + 10
    u = rng.normal(size=(t, ny, nx))
    tas_fine = rng.normal(size=(t, ny * k, nx * k)) * 0.1
    pattern = np.tile([[1.0, -1.0], [-1.0, 1.0]], (ny, nx))  # zero mean in every cell
    tas_fine += u.repeat(k, 1).repeat(k, 2) * pattern
    fcoords = {
        "time": np.arange(t),
        "lat": np.repeat(lat, k) + np.tile([-0.25, 0.25], ny),
        "lon": np.repeat(lon, k) + np.tile([-0.25, 0.25], nx),
    }
    fine = xr.Dataset({"tas": (("time", "lat", "lon"), tas_fine)}, coords=fcoords)
    coarse = coarsen(fine, k)
    coarse["u"] = (("time", "lat", "lon"), u)
    train = (coarse.isel(time=slice(0, 60)), fine.isel(time=slice(0, 60)))
    test = coarse.isel(time=slice(60, None))
    truth = fine.isel(time=slice(60, None)).tas
    alone = xorbit.baseline(test, "ridge", train=train)
    both = xorbit.baseline(test, "ridge", train=train, predictors=["tas", "u"])
    assert list(both.data_vars) == ["tas"]  # u is a predictor, not an output
    assert float(rmse(both.tas, truth)) < 0.3 * float(rmse(alone.tas, truth))
    with pytest.raises(KeyError, match=r"predictors \['v'\] are not in the coarse data"):
        xorbit.baseline(test, "ridge", train=train, predictors=["tas", "v"])
    with pytest.raises(ValueError, match="predictors= is an option of the ridge baseline"):
        xorbit.baseline(test, "climatology", train=train, predictors=["u"])
