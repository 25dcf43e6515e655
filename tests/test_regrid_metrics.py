"""Interpolation baselines and skill scores against independent numbers."""

import numpy as np
import pytest
import xarray as xr

from tests.test_accessor import coarse_field
from xorbit.data import coarsen
from xorbit.datasets import hadcm3_air_temperature
from xorbit.metrics import anomaly_r2, bias, r2, rmse
from xorbit.regrid import interpolate, upsample_array


def test_bicubic_on_hadcm3_matches_the_documented_floor():
    fine = hadcm3_air_temperature()
    coarse = coarsen(fine, 4)
    up = coarse.chunk(time=60).orbit.interpolate(4, "bicubic")
    assert up.shape == fine.shape
    np.testing.assert_allclose(up.latitude, fine.latitude)
    truth = fine.assign_coords(latitude=up.latitude, longitude=up.longitude)
    # data-notes: RMSE ~0.97 K, R2 ~0.991 over all years
    assert float(rmse(up, truth)) == pytest.approx(0.97, abs=0.03)
    assert float(r2(up, truth)) == pytest.approx(0.991, abs=0.003)


def test_interpolation_reproduces_linear_fields_and_constants():
    y, x = np.meshgrid(np.arange(6.0), np.arange(8.0), indexing="ij")
    lin = 3 + 2 * x - y
    fy, fx = np.meshgrid(
        (np.arange(12) + 0.5) / 2 - 0.5, (np.arange(16) + 0.5) / 2 - 0.5, indexing="ij"
    )
    exact = 3 + 2 * fx - fy
    # away from the edges (the stencils reach 2 coarse pixels): bilinear is exact on
    # a linear field; torch's bicubic is Keys' kernel with a = -0.75 (as OpenCV),
    # which is not: it over/undershoots by 3/64 of the step between coarse values
    up = upsample_array(lin[None], 2, "bilinear")[0]
    np.testing.assert_allclose(up[4:-4, 4:-4], exact[4:-4, 4:-4], atol=1e-9)
    up = upsample_array(lin[None], 2, "bicubic")[0]
    err = np.abs(up - exact)[4:-4, 4:-4]
    assert err.max() == pytest.approx(3 / 64 * 3, rel=1e-6)  # step 2 in x plus 1 in y
    np.testing.assert_allclose(upsample_array(np.full((1, 5, 5), 7.0), 4, "bicubic"), 7.0)
    np.testing.assert_array_equal(upsample_array(np.ones((2, 3)), 3, "nearest"), np.ones((6, 9)))
    with pytest.raises(ValueError, match="unknown interpolation method 'spline'"):
        interpolate(coarse_field(np.zeros((1, 4, 4))), 2, "spline")


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
