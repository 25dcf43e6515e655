"""Interpolation baselines against independent numbers (skill scores: test_metrics.py)."""

import importlib.abc

import numpy as np
import pytest
import xarray as xr

from tests.test_accessor import coarse_field
from xorbit import coarsen
from xorbit.datasets import hadcm3_air_temperature
from xorbit.metrics import r2, rmse
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


def latlon(d, lat0=-60.0, lat1=60.0, lon0=0.0, lon1=120.0):
    lat = np.arange(lat0 + d / 2, lat1, d)
    lon = np.arange(lon0 + d / 2, lon1, d)
    return xr.Dataset(
        coords={
            "lat": ("lat", lat, {"units": "degrees_north", "standard_name": "latitude"}),
            "lon": ("lon", lon, {"units": "degrees_east", "standard_name": "longitude"}),
        }
    )


def area_mean(a):
    """Area-weighted mean with exact spherical cell areas (independent of xorbit)."""
    lat = a[a.cf["latitude"].name].values
    d = np.abs(np.diff(lat)).mean()
    w = np.sin(np.deg2rad(np.clip(lat + d / 2, -90, 90))) - np.sin(
        np.deg2rad(np.clip(lat - d / 2, -90, 90))
    )
    w = xr.DataArray(w, dims=a[a.cf["latitude"].name].dims)
    return float((a * w).sum() / (w * xr.ones_like(a)).sum())


@pytest.mark.parametrize(("src_d", "dst_d", "glob"), [(2.0, 3.0, False), (2.5, 3.75, True)])
def test_conservative_regridding_keeps_the_area_weighted_mean(src_d, dst_d, glob):
    from xorbit.regrid import regrid

    kw = dict(lat0=-90.0, lat1=90.0, lon0=0.0, lon1=360.0) if glob else {}
    src, dst = latlon(src_d, **kw), latlon(dst_d, **kw)
    rng = np.random.default_rng(1)
    orog = xr.DataArray(
        rng.gamma(2.0, 300.0, size=(src.sizes["lat"], src.sizes["lon"])),
        dims=("lat", "lon"),
        coords=src.coords,
        name="orog",
        attrs={"units": "m"},
    )
    out = regrid(orog, dst, "conservative")
    assert out.shape == (dst.sizes["lat"], dst.sizes["lon"]) and out.attrs["units"] == "m"
    assert abs(area_mean(out) - area_mean(orog)) / abs(area_mean(orog)) < 1e-6
    # a constant stays exactly constant
    np.testing.assert_allclose(regrid(orog * 0 + 5.0, dst).values, 5.0, rtol=1e-12)


def test_conservative_upsampling_of_hadcm3_keeps_the_mean_and_the_cells():
    coarse = coarsen(hadcm3_air_temperature(), 4).isel(time=slice(0, 3))
    up = coarse.chunk(time=1).orbit.interpolate(4, "conservative")
    assert up.shape == (3, 36, 48)
    # refining onto the split grid: every fine cell carries its parent's value
    np.testing.assert_allclose(
        up.values, np.repeat(np.repeat(coarse.values, 4, 1), 4, 2), rtol=1e-6
    )
    for t in range(3):
        a, b = area_mean(coarse.isel(time=t)), area_mean(up.isel(time=t))
        assert abs(a - b) / abs(a) < 1e-6


def test_bilinear_regrid_between_grids_without_xesmf(monkeypatch):
    import xorbit.regrid as rg
    from xorbit.regrid import regrid

    monkeypatch.setattr(rg, "_import_xesmf", lambda: (None, "disabled by the test"))
    src, dst = latlon(2.0), latlon(3.0)
    lin = 2 * src.lat + 0.5 * src.lon + 0 * src.lat * src.lon
    with pytest.warns(rg.RegridFallbackWarning, match="disabled by the test"):
        out = regrid(lin.rename("f"), dst, "bilinear")
    expected = 2 * dst.lat + 0.5 * dst.lon
    np.testing.assert_allclose(out.values, expected.transpose(*out.dims).values, atol=1e-6)
    with pytest.raises(ValueError, match="unknown method 'cubic'"):
        regrid(lin.rename("f"), dst, "cubic")


def test_xesmf_and_the_pip_path_agree(monkeypatch):
    pytest.importorskip("xesmf")  # ESMF is not on PyPI: skipped on pip-only installs
    import xorbit.regrid as rg

    src, dst = latlon(2.0), latlon(3.0)
    f = np.sin(np.deg2rad(src.lat)) * np.cos(np.deg2rad(src.lon))
    with_esmf = rg.regrid(f.rename("f"), dst, "bilinear")
    monkeypatch.setattr(rg, "_import_xesmf", lambda: (None, "disabled by the test"))
    with pytest.warns(rg.RegridFallbackWarning):
        without = rg.regrid(f.rename("f"), dst, "bilinear")
    np.testing.assert_allclose(with_esmf.values, without.values, atol=1e-3)


class BrokenESMF(importlib.abc.MetaPathFinder):
    """Makes ``import xesmf`` fail the way a broken ESMF install does."""

    def find_spec(self, name, path=None, target=None):
        if name == "xesmf" or name.startswith("xesmf."):
            raise OSError("libesmf.so: cannot open shared object file")
        return None


def test_falling_back_from_xesmf_warns_with_the_reason(monkeypatch):
    import sys

    from xorbit.regrid import RegridFallbackWarning, regrid

    monkeypatch.delitem(sys.modules, "xesmf", raising=False)
    monkeypatch.setattr(sys, "meta_path", [BrokenESMF(), *sys.meta_path])
    src, dst = latlon(2.0), latlon(3.0)
    lin = (2 * src.lat + 0.5 * src.lon).rename("f")
    with pytest.warns(RegridFallbackWarning) as record:
        out = regrid(lin, dst, "nearest")
    (message,) = [str(w.message) for w in record]
    assert "libesmf.so: cannot open shared object file" in message
    assert "xarray-regrid" in message and "nearest" in message
    assert out.shape == (40, 40)
    # a plain ImportError is reported the same way
    monkeypatch.setitem(sys.modules, "xesmf", None)
    with pytest.warns(RegridFallbackWarning, match="import of xesmf halted"):
        regrid(lin, dst, "bilinear")


def torch_upsample(a, factor, method, periodic):
    """The reference: ``torch.nn.functional.interpolate`` on padded planes, cropped."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    ny, nx = a.shape[-2:]
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).reshape(-1, 1, ny, nx)
    pad = 0 if method == "nearest" else 2
    if pad:
        t = F.pad(t, (0, 0, pad, pad), mode="replicate")
        t = F.pad(t, (pad, pad, 0, 0), mode="circular" if periodic else "replicate")
    kw = {} if method == "nearest" else {"align_corners": False}
    up = F.interpolate(t, scale_factor=factor, mode=method, **kw)
    if pad:
        up = up[..., pad * factor : -pad * factor, pad * factor : -pad * factor]
    return up.reshape(*a.shape[:-2], ny * factor, nx * factor).numpy()


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("factor", [2, 3, 4])
@pytest.mark.parametrize("method", ["nearest", "bilinear", "bicubic"])
def test_numpy_interpolation_matches_torch(method, factor, periodic):
    rng = np.random.default_rng(factor)
    a = 280 + 10 * rng.normal(size=(2, 3, 7, 9))
    a[0, 1, 3, 4] = np.nan  # NaN spreads over the kernel's footprint, as in torch
    expected = torch_upsample(a, factor, method, periodic)
    out = upsample_array(a, factor, method, periodic=periodic)
    assert out.shape == (2, 3, 7 * factor, 9 * factor) and out.dtype == a.dtype
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    # float32 in, float32 out, computed in float64
    out32 = upsample_array(a.astype(np.float32), factor, method, periodic=periodic)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, expected.astype(np.float32), rtol=1e-6)


def test_regrid_module_does_not_import_torch():
    import ast
    import inspect

    import xorbit.regrid

    tree = ast.parse(inspect.getsource(xorbit.regrid))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert "numpy" in imported  # the walk does see the imports
    assert "torch" not in imported
