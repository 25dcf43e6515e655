"""Longitudes are equal modulo 360 wherever xorbit matches grids.

A model trained with longitudes written one way (HadCM3: 0..360) serves the
same points written the other way (-180..180), and the answer is the same,
in the caller's convention.  Three domains: one inside both conventions'
ranges (HadCM3's North America), one across 0 / 360 (Europe) and one across
180 (the Pacific); a domain across a seam runs monotonically only modulo 360
in one of the two conventions.
"""

import numpy as np
import pytest
import xarray as xr

import xorbit
from tests.test_fields import fine_field, with_static
from xorbit import grid

# first fine longitude of each domain (32 fine columns of 0.5 degrees)
DOMAINS = {"north_america": 225.0, "europe": 352.0, "pacific": 172.0}


def written(obj, convention):
    """``obj`` with longitudes written in ``"0..360"`` or ``"-180..180"``."""
    lon = obj["lon"]
    values = lon.values % 360.0
    if convention == "-180..180":
        values = (lon.values + 180.0) % 360.0 - 180.0
    return obj.assign_coords(lon=("lon", values, lon.attrs))


def same_points(a, b):
    """Two longitude arrays name the same meridians."""
    diff = (np.asarray(a) - np.asarray(b) + 180.0) % 360.0 - 180.0
    return np.abs(diff).max() < 1e-9


def pair(lon0, convention):
    fine = fine_field(nt=12).assign_coords(lon=("lon", lon0 + 0.5 * np.arange(32)))
    fine["lon"].attrs = {"units": "degrees_east", "standard_name": "longitude"}
    fine = written(fine, convention)
    hills = 100.0 * np.cos(np.deg2rad(fine.lat.values))[:, None] * np.sin(np.arange(32) / 5.0)
    orog = xr.DataArray(hills, dims=("lat", "lon"), coords={"lat": fine.lat, "lon": fine.lon})
    return xorbit.coarsen(fine, 4), fine, orog.rename("orog")


def test_unwrap_and_wrap_are_inverse_and_leave_monotonic_grids_alone():
    europe = np.array([350.0, 355.0, 0.0, 5.0])
    run = grid.unwrap_longitude(europe)
    np.testing.assert_array_equal(run, [350, 355, 360, 365])
    np.testing.assert_array_equal(grid.wrap_longitude(run, europe), europe)
    pacific = np.array([170.0, 175.0, -180.0, -175.0])
    np.testing.assert_array_equal(grid.unwrap_longitude(pacific), [170, 175, 180, 185])
    monotonic = np.array([-1.0, 1.0, 3.0])  # never wrapped, even below 0
    np.testing.assert_array_equal(grid.unwrap_longitude(monotonic), monotonic)
    np.testing.assert_array_equal(grid.wrap_longitude(monotonic - 1.0, monotonic), monotonic - 1)


@pytest.mark.parametrize("convention", ["0..360", "-180..180"])
@pytest.mark.parametrize("domain", ["europe", "pacific"])
def test_fine_grid_and_coarsen_across_a_seam(domain, convention):
    """Before: a seam inside the coordinate was 'not strictly monotonic'."""
    coarse, fine, _ = pair(DOMAINS[domain], convention)
    # coarse centres are block means modulo 360 (359.75 and 0.25 average to 0)
    assert same_points(coarse.lon, DOMAINS[domain] + 0.75 + 2.0 * np.arange(8))
    refined = grid.fine_grid(coarse, 4)
    np.testing.assert_allclose(refined["lon"].values, fine.lon.values, atol=1e-9)
    bounds = refined["lon_bnds"].values
    # each fine cell is 0.5 degrees wide around its own centre, in the same convention
    np.testing.assert_allclose(bounds[:, 1] - bounds[:, 0], 0.5)
    np.testing.assert_allclose(bounds.mean(axis=1), refined["lon"].values)


def test_fine_grid_refuses_latitudes_beyond_the_poles():
    """Before: the bounds were clipped at +-90 and the result silently wrong."""
    field = fine_field(nt=1, ny=8, nx=8).assign_coords(lat=("lat", 80.0 + 2.5 * np.arange(8)))
    field["lat"].attrs["units"] = "degrees_north"
    with pytest.raises(ValueError, match=r"latitude 'lat' has 97.5 at position 7, beyond \+-90"):
        grid.fine_grid(field, 4)
    # centres on the poles are fine: only the outer edges are clipped
    poles = field.assign_coords(lat=("lat", np.linspace(-90, 90, 8), {"units": "degrees_north"}))
    assert grid.fine_grid(poles, 4)["lat_bnds"].values.min() == -90.0


@pytest.mark.parametrize("domain", ["north_america", "europe", "pacific"])
def test_match_grid_is_modulo_360(domain):
    _, fine, _ = pair(DOMAINS[domain], "0..360")
    other = written(fine, "-180..180")
    back = grid.match_grid(other, fine)
    np.testing.assert_array_equal(back.values, fine.values)
    np.testing.assert_array_equal(back.lon.values, fine.lon.values)  # the reference's values
    # a grid shifted by a fifth of a degree is another grid
    with pytest.raises(ValueError, match=r"'lon' values are not the prediction's.*modulo 360"):
        grid.match_grid(other.assign_coords(lon=other.lon + 0.2), fine)


@pytest.fixture(scope="module", params=[(d, c) for d in DOMAINS for c in ("0..360", "-180..180")])
def trained(request):
    """A model trained with a domain's longitudes in one convention (fine orography static)."""
    domain, convention = request.param
    coarse, fine, orog = pair(DOMAINS[domain], convention)
    return convention, coarse, fine, with_static(coarse, fine, orog)


def test_downscale_in_the_other_convention_gives_the_same_answer(trained):
    """Before: "the climatology's 'longitude' values are not the data's: offset by up to 360"."""
    convention, coarse, _, dsr = trained
    other = "-180..180" if convention == "0..360" else "0..360"
    same = coarse.orbit.downscale(dsr)
    moved = written(coarse, other).orbit.downscale(dsr)
    np.testing.assert_allclose(moved.values, same.values, rtol=0, atol=1e-5)
    # the output is in the input's convention
    np.testing.assert_allclose(moved.lon.values, written(same, other).lon.values, atol=1e-9)
    # static= given in the other convention is matched too (here: the same field)
    static = xr.Dataset({"orog": written(dsr.static["orog"], other)})
    again = written(coarse, other).orbit.downscale(dsr, static=static)
    np.testing.assert_allclose(again.values, same.values, rtol=0, atol=1e-5)


def test_evaluate_and_baselines_match_modulo_360(trained):
    convention, coarse, fine, dsr = trained
    other = "-180..180" if convention == "0..360" else "0..360"
    pred = coarse.orbit.downscale(dsr)
    scores = xorbit.evaluate(pred, fine).rmse.values
    moved = xorbit.evaluate(pred, written(fine, other)).rmse.values
    np.testing.assert_allclose(moved, scores, rtol=1e-6)
    for method in ("climatology", "ridge"):
        ref = xorbit.baseline(coarse, method, train=(coarse, fine))
        cross = xorbit.baseline(written(coarse, other), method, train=(coarse, fine))
        np.testing.assert_allclose(cross.values, ref.values, rtol=0, atol=1e-4)
        assert same_points(cross.lon, ref.lon) and not np.array_equal(cross.lon, ref.lon)
