"""Tests of `xorbit.grid`: spatial dims, cell bounds and the refined (fine) grid."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from xorbit.grid import cell_bounds, fine_grid, is_global_longitude, refine_coord, spatial_dims

LAT_ATTRS = {"standard_name": "latitude", "units": "degrees_north", "axis": "Y"}
LON_ATTRS = {"standard_name": "longitude", "units": "degrees_east", "axis": "X"}


def hadcm3_lat(dtype=np.float64) -> np.ndarray:
    """The 36 latitudes of the cropped HadCM3 North America grid."""
    return (15.0 + 1.25 * np.arange(36)).astype(dtype)


def hadcm3_lon(dtype=np.float64) -> np.ndarray:
    """The 48 longitudes (degrees east, 0..360 convention) of the same grid."""
    return (225.0 + 1.875 * np.arange(48)).astype(dtype)


def field(
    lat,
    lon,
    ydim: str = "lat",
    xdim: str = "lon",
    lat_attrs: dict | None = None,
    lon_attrs: dict | None = None,
    ntime: int = 0,
) -> xr.DataArray:
    """A smooth (time,) lat, lon field with the given coordinates and attrs."""
    lat = np.asarray(lat)
    lon = np.asarray(lon)
    values = np.cos(np.deg2rad(lat))[:, None] * np.sin(np.deg2rad(lon))[None, :]
    dims: tuple[str, ...] = (ydim, xdim)
    coords: dict = {
        ydim: (ydim, lat, dict(LAT_ATTRS if lat_attrs is None else lat_attrs)),
        xdim: (xdim, lon, dict(LON_ATTRS if lon_attrs is None else lon_attrs)),
    }
    if ntime:
        values = np.stack([values + t for t in range(ntime)])
        dims = ("time", *dims)
        coords["time"] = ("time", np.arange(ntime, dtype=np.float64), {"axis": "T"})
    return xr.DataArray(values.astype(np.float32), dims=dims, coords=coords, name="tas")


def hadcm3_field(**kwargs) -> xr.DataArray:
    return field(hadcm3_lat(), hadcm3_lon(), **kwargs)


def coord(values, name: str = "lat", attrs: dict | None = None) -> xr.DataArray:
    """A standalone 1-D dimension coordinate."""
    if attrs is None:
        attrs = LAT_ATTRS if name == "lat" else LON_ATTRS
    return xr.DataArray(
        np.asarray(values), dims=(name,), name=name, attrs=dict(attrs)
    ).assign_coords({name: np.asarray(values)})


def assert_contiguous(bnds) -> None:
    bnds = np.asarray(bnds)
    np.testing.assert_array_equal(bnds[1:, 0], bnds[:-1, 1])


# --------------------------------------------------------------------------- spatial_dims


def test_spatial_dims_by_cf_attrs_with_odd_names():
    da = field([10.0, 20.0, 30.0], [0.0, 90.0], ydim="rlat", xdim="rlon")
    assert spatial_dims(da) == ("rlat", "rlon")
    assert spatial_dims(da.to_dataset()) == ("rlat", "rlon")


def test_spatial_dims_by_units_only():
    da = field(
        [10.0, 20.0],
        [0.0, 90.0, 180.0],
        ydim="phi",
        xdim="lam",
        lat_attrs={"units": "degrees_north"},
        lon_attrs={"units": "degrees_east"},
        ntime=2,
    )
    assert spatial_dims(da) == ("phi", "lam")


def test_spatial_dims_name_fallback_without_attrs():
    da = field([1.0, 2.0], [3.0, 4.0], ydim="y", xdim="x", lat_attrs={}, lon_attrs={})
    assert spatial_dims(da) == ("y", "x")
    bare = xr.DataArray(np.zeros((2, 3)), dims=("latitude", "longitude"))
    assert spatial_dims(bare) == ("latitude", "longitude")


def test_spatial_dims_error_lists_dims_and_fix():
    da = xr.DataArray(np.zeros((2, 3, 4)), dims=("time", "row", "col"))
    with pytest.raises(ValueError, match=r"\('time', 'row', 'col'\)") as err:
        spatial_dims(da)
    msg = str(err.value)
    assert "latitude (Y) and longitude (X)" in msg
    assert "axis" in msg and "standard_name" in msg and "explicitly" in msg


def test_spatial_dims_curvilinear_2d_latitude_refused():
    y, x = np.meshgrid(np.arange(3.0), np.arange(4.0), indexing="ij")
    da = xr.DataArray(
        np.zeros((3, 4)),
        dims=("j", "i"),
        coords={
            "nav_lat": (("j", "i"), 10 + y + 0.1 * x, {"standard_name": "latitude"}),
            "nav_lon": (("j", "i"), 20 + x + 0.1 * y, {"standard_name": "longitude"}),
        },
    )
    with pytest.raises(ValueError, match="curvilinear grids are not supported") as err:
        spatial_dims(da)
    assert "'nav_lat'" in str(err.value)


def test_spatial_dims_curvilinear_by_name_even_with_y_x_dims():
    lat2d = np.arange(12.0).reshape(3, 4)
    da = xr.DataArray(np.zeros((3, 4)), dims=("y", "x"), coords={"lat": (("y", "x"), lat2d)})
    with pytest.raises(ValueError, match=r"'lat' is 2-D.*curvilinear"):
        spatial_dims(da)


# --------------------------------------------------------------------------- cell_bounds


def test_cell_bounds_inferred_ascending_and_descending():
    up = cell_bounds(coord([0.0, 1.0, 3.0], "lon"))
    np.testing.assert_allclose(up, [[-0.5, 0.5], [0.5, 2.0], [2.0, 4.0]])
    down = cell_bounds(coord([30.0, 20.0, 10.0]))
    np.testing.assert_allclose(down, [[35.0, 25.0], [25.0, 15.0], [15.0, 5.0]])
    assert up.dtype == np.float64 and up.shape == (3, 2)


def test_cell_bounds_latitude_clipped_at_poles_longitude_not_wrapped():
    lat = cell_bounds(coord(np.linspace(-90.0, 90.0, 73)))
    assert lat[0, 0] == -90.0 and lat[-1, 1] == 90.0
    assert lat[0, 1] == -88.75
    lon = cell_bounds(coord(np.arange(144) * 2.5, "lon"))
    assert lon[0, 0] == -1.25 and lon[-1, 1] == 358.75


def test_cell_bounds_uses_bounds_variable_from_dataset_and_dataarray():
    lat = np.array([10.0, 12.0, 20.0])
    bnds = np.array([[9.0, 11.0], [11.0, 16.0], [16.0, 30.0]])
    ds = field(lat, [0.0, 1.0]).to_dataset()
    ds["lat"].attrs["bounds"] = "lat_bnds"
    ds["lat_bnds"] = (("lat", "nv"), bnds)
    np.testing.assert_array_equal(cell_bounds(ds["lat"], ds), bnds)
    # without the Dataset the bounds variable cannot be seen: bounds are inferred
    np.testing.assert_allclose(cell_bounds(ds["lat"]), [[9, 11], [11, 16], [16, 24]])
    # a transposed (nv, lat) bounds variable is read the right way round
    ds["lat_bnds"] = (("nv", "lat"), bnds.T)
    np.testing.assert_array_equal(cell_bounds(ds["lat"], ds), bnds)


def test_cell_bounds_missing_bounds_variable_falls_back_to_inference():
    c = coord([0.0, 2.0, 4.0], "lon", {**LON_ATTRS, "bounds": "lon_bnds"})
    np.testing.assert_allclose(cell_bounds(c, xr.Dataset()), [[-1, 1], [1, 3], [3, 5]])


def test_cell_bounds_single_point_needs_bounds():
    with pytest.raises(ValueError, match="'lat' has 1 point"):
        cell_bounds(coord([45.0]))
    ds = xr.Dataset(coords={"lat": ("lat", [45.0], {"bounds": "lat_bnds"})})
    ds["lat_bnds"] = (("lat", "bnds"), [[40.0, 50.0]])
    np.testing.assert_array_equal(cell_bounds(ds["lat"], ds), [[40.0, 50.0]])


def test_cell_bounds_non_monotonic_named():
    with pytest.raises(ValueError, match=r"'lon' is not strictly monotonic: 20\.0 at position 1"):
        cell_bounds(coord([0.0, 20.0, 10.0, 30.0], "lon"))
    with pytest.raises(ValueError, match="'lat' is not strictly monotonic"):
        cell_bounds(coord([1.0, 1.0, 2.0]))


def test_cell_bounds_bad_bounds_shape_named():
    ds = xr.Dataset(coords={"lat": ("lat", [1.0, 2.0], {"bounds": "lat_bnds"})})
    ds["lat_bnds"] = (("lat", "nv"), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="'lat_bnds' of coordinate 'lat' has shape"):
        cell_bounds(ds["lat"], ds)


# --------------------------------------------------------------------------- refine_coord


def test_refine_ascending_latitude():
    fine, bnds = refine_coord(coord([10.0, 20.0, 30.0]), 2)
    np.testing.assert_allclose(fine, [7.5, 12.5, 17.5, 22.5, 27.5, 32.5])
    np.testing.assert_allclose(bnds[:, 0], [5, 10, 15, 20, 25, 30])
    np.testing.assert_allclose(bnds[:, 1], [10, 15, 20, 25, 30, 35])
    assert fine.dims == ("lat",) and bnds.dims == ("lat", "bnds")
    assert bnds.name == "lat_bnds" and fine.attrs["bounds"] == "lat_bnds"


def test_refine_descending_latitude_keeps_order():
    fine, bnds = refine_coord(coord([30.0, 20.0, 10.0]), 2)
    np.testing.assert_allclose(fine, [32.5, 27.5, 22.5, 17.5, 12.5, 7.5])
    np.testing.assert_allclose(bnds[0], [35.0, 30.0])
    np.testing.assert_allclose(bnds[-1], [10.0, 5.0])
    assert_contiguous(bnds)
    assert np.all(np.diff(fine.values) < 0)


@pytest.mark.parametrize(
    ("lon", "first", "last"),
    [
        (np.arange(0.0, 360.0, 90.0), -22.5, 292.5),  # 0..360 convention
        (np.arange(-180.0, 180.0, 90.0), -202.5, 112.5),  # -180..180 convention
    ],
)
def test_refine_longitude_kept_as_given(lon, first, last):
    fine, bnds = refine_coord(coord(lon, "lon"), 2)
    assert fine.size == 8
    assert float(fine[0]) == first and float(fine[-1]) == last
    np.testing.assert_allclose(np.diff(fine), 45.0)
    assert float(bnds[0, 0]) == lon[0] - 45.0 and float(bnds[-1, 1]) == lon[-1] + 45.0


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_coarsen_then_refine_round_trip_hadcm3_grid(factor):
    fine_field = hadcm3_field()
    coarse = fine_field.coarsen(lat=factor, lon=factor).mean()
    assert coarse.sizes == {"lat": 36 // factor, "lon": 48 // factor}
    for name, truth in (("lat", hadcm3_lat()), ("lon", hadcm3_lon())):
        fine, bnds = refine_coord(coarse[name], factor, coarse)
        assert fine.shape == truth.shape and bnds.shape == (truth.size, 2)
        np.testing.assert_allclose(fine.values, truth, rtol=0, atol=1e-9)
        assert_contiguous(bnds)
        step = truth[1] - truth[0]
        np.testing.assert_allclose(bnds[:, 1] - bnds[:, 0], step, rtol=0, atol=1e-9)
        np.testing.assert_allclose(bnds.mean("bnds"), truth, rtol=0, atol=1e-9)


def test_round_trip_descending_and_float32():
    lat32 = hadcm3_lat(np.float32)[::-1]
    fine_field = field(lat32, hadcm3_lon(np.float32))
    assert fine_field.lat.dtype == np.float32
    coarse = fine_field.coarsen(lat=4, lon=4).mean()
    fine, bnds = refine_coord(coarse["lat"], 4)
    assert fine.dtype == np.float64 and bnds.dtype == np.float64
    np.testing.assert_allclose(fine.values, hadcm3_lat()[::-1], rtol=0, atol=1e-9)
    assert_contiguous(bnds)


def test_refine_explicit_irregular_bounds_split():
    ds = xr.Dataset(coords={"lat": ("lat", [1.0, 4.0, 10.0], {"bounds": "lat_bnds"})})
    ds["lat_bnds"] = (("lat", "bnds"), [[0.0, 2.0], [2.0, 8.0], [8.0, 16.0]])
    fine, bnds = refine_coord(ds["lat"], 2, ds)
    np.testing.assert_allclose(fine, [0.5, 1.5, 3.5, 6.5, 10.0, 14.0])
    np.testing.assert_allclose(bnds[:, 0], [0, 1, 2, 5, 8, 12])
    np.testing.assert_allclose(bnds[:, 1], [1, 2, 5, 8, 12, 16])
    # centres of split cells are part midpoints, not the (off-centre) coarse points
    assert float(fine[0]) != 1.0


def test_refine_attrs():
    attrs = {"long_name": "Latitude", "units": "degrees_north", "_FillValue": np.nan}
    fine, _ = refine_coord(coord([1.0, 2.0], "latitude", attrs), 2)
    assert fine.attrs == {
        "long_name": "Latitude",
        "units": "degrees_north",
        "standard_name": "latitude",
        "axis": "Y",
        "bounds": "latitude_bnds",
    }
    # recognised by name only
    fine, _ = refine_coord(coord([1.0, 2.0], "lon", {}), 3)
    assert fine.attrs == {**LON_ATTRS, "bounds": "lon_bnds"}
    # neither latitude nor longitude: only bounds is added
    fine, _ = refine_coord(coord([0.0, 1000.0], "x", {"units": "m"}), 2)
    assert fine.attrs == {"units": "m", "bounds": "x_bnds"}
    np.testing.assert_allclose(fine, [-250.0, 250.0, 750.0, 1250.0])


def test_refine_factor_one_returns_coordinate_unchanged():
    c = coord(np.array([10.0, 20.0, 30.0], dtype=np.float32))
    fine, bnds = refine_coord(c, 1)
    assert fine is c
    np.testing.assert_allclose(bnds, [[5, 15], [15, 25], [25, 35]])
    assert bnds.name == "lat_bnds" and bnds.dims == ("lat", "bnds")


@pytest.mark.parametrize("factor", [0, -2, 2.0, 1.5, "2", True])
def test_refine_bad_factor(factor):
    with pytest.raises(ValueError, match="factor must be an int >= 1"):
        refine_coord(coord([1.0, 2.0]), factor)


def test_refine_numpy_integer_factor():
    fine, _ = refine_coord(coord([1.0, 2.0]), np.int64(2))
    assert fine.size == 4


# --------------------------------------------------------------------------- fine_grid


def test_fine_grid_coords_and_carried_over():
    da = hadcm3_field(ntime=3).assign_coords(
        height=1.5,
        latitude_longitude=np.int32(0),
        land=(("lat", "lon"), np.ones((36, 48))),
    )
    for obj in (da, da.to_dataset()):
        grid = fine_grid(obj, 2)
        assert list(grid)[:4] == ["lat", "lon", "lat_bnds", "lon_bnds"]
        assert set(grid) - {"lat", "lon", "lat_bnds", "lon_bnds"} == {
            "time",
            "height",
            "latitude_longitude",
        }
        assert grid["lat"].size == 72 and grid["lon"].size == 96
        assert grid["lat_bnds"].shape == (72, 2) and grid["lon_bnds"].shape == (96, 2)
        np.testing.assert_array_equal(grid["time"], da["time"])
        assert float(grid["height"]) == 1.5 and grid["latitude_longitude"].ndim == 0
        np.testing.assert_allclose(grid["lat"][:2], [14.6875, 15.3125])
        np.testing.assert_allclose(grid["lon"][:2], [224.53125, 225.46875])

    # old bounds on the spatial dims are replaced by the fine ones
    ds = da.to_dataset().assign_coords(lat_bnds=(("lat", "bnds"), cell_bounds(da["lat"])))
    grid = fine_grid(ds, 2)
    assert grid["lat_bnds"].shape == (72, 2)

    # usable as-is to build the fine Dataset
    out = xr.Dataset({"tas": (("time", "lat", "lon"), np.zeros((3, 72, 96)))}, coords=grid)
    assert dict(out.sizes) == {"time": 3, "lat": 72, "lon": 96, "bnds": 2}
    assert "land" not in out.coords
    assert out["lat"].attrs["bounds"] == "lat_bnds"
    assert spatial_dims(out) == ("lat", "lon")
    np.testing.assert_array_equal(cell_bounds(out["lat"], out), grid["lat_bnds"].values)
    assert_contiguous(out["lon_bnds"])


def test_fine_grid_dataset_and_explicit_dims():
    ds = field([50.0, 40.0], [0.0, 10.0, 20.0], ydim="r", xdim="c", lat_attrs={}, lon_attrs={})
    ds = ds.to_dataset()
    with pytest.raises(ValueError, match=r"\('r', 'c'\)"):
        fine_grid(ds, 2)
    grid = fine_grid(ds, 2, ydim="r", xdim="c")
    np.testing.assert_allclose(grid["r"], [52.5, 47.5, 42.5, 37.5])
    assert grid["c_bnds"].dims == ("c", "bnds")
    with pytest.raises(ValueError, match="'nope' is not in"):
        fine_grid(ds, 2, ydim="nope", xdim="c")


def test_fine_grid_dim_without_coordinate_values():
    da = xr.DataArray(np.zeros((2, 3)), dims=("lat", "lon"), coords={"lon": [0.0, 1.0, 2.0]})
    with pytest.raises(ValueError, match="'lat' has no coordinate values"):
        fine_grid(da, 2)


# --------------------------------------------------------------------------- is_global_longitude


def test_is_global_longitude():
    global_lon = coord(np.arange(144) * 2.5, "lon")
    assert is_global_longitude(global_lon)
    assert is_global_longitude(coord(np.arange(-180.0, 180.0, 2.5), "lon"))
    assert is_global_longitude(coord(np.arange(0.0, 360.0, 1.875, dtype=np.float32), "lon"))
    assert not is_global_longitude(coord(hadcm3_lon(), "lon"))  # regional 225..315 E
    assert not is_global_longitude(global_lon[:-1])  # one column short
    assert not is_global_longitude(coord(np.arange(145) * 2.5, "lon"))  # one too many


def test_is_global_longitude_false_for_latitude_and_irregular():
    # a (contrived) latitude spanning 360 degrees is still not a periodic longitude
    assert not is_global_longitude(coord(np.arange(144) * 2.5 - 180.0, "lat"))
    irregular = np.concatenate([np.arange(0.0, 180.0, 2.0), np.arange(180.0, 360.0, 4.0)])
    assert not is_global_longitude(coord(irregular, "lon"))
    assert not is_global_longitude(coord([10.0], "lon"))


def test_is_global_longitude_with_bounds_variable():
    ds = xr.Dataset(coords={"lon": ("lon", [90.0, 270.0], {"bounds": "lon_bnds"})})
    ds["lon_bnds"] = (("lon", "bnds"), [[0.0, 180.0], [180.0, 360.0]])
    assert is_global_longitude(ds["lon"], ds)
    ds["lon_bnds"] = (("lon", "bnds"), [[0.0, 180.0], [180.0, 350.0]])
    assert not is_global_longitude(ds["lon"], ds)
