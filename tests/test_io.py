"""CF-compliant, compressed, atomic and resumable output."""

import json

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import xorbit
from tests.datasets import tiny_config
from xorbit import coarsen
from xorbit.datasets import hadcm3_air_temperature
from xorbit.io import bitround, to_netcdf, to_zarr

TIMES = xr.coders.CFDatetimeCoder(use_cftime=True)


@pytest.fixture(scope="module")
def downscaled():
    """A downscaled HadCM3 field (untrained model: the file, not the skill, matters)."""
    fine = hadcm3_air_temperature().isel(time=slice(0, 12))
    coarse = coarsen(fine, 4).chunk(time=4)
    cfg = tiny_config(
        in_vars=["air_temperature"],
        out_vars=["air_temperature"],
        static_vars=[],
        img_size=(8, 8),
    )
    dsr = xorbit.Downscaler.from_config(
        cfg,
        mean={"air_temperature": 280.0},
        std={"air_temperature": 10.0},
        units={"air_temperature": "K"},
    )
    return coarse.orbit.downscale(dsr, device="cpu", tile=4, halo=2).persist()


def cf_failures(path):
    from compliance_checker.runner import CheckSuite

    suite = CheckSuite()
    suite.load_all_available_checkers()
    groups, errors = suite.run_all(suite.load_dataset(str(path)), ["cf:1.10"], skip_checks=[])[
        "cf:1.10"
    ]
    assert errors == {}
    by_priority = {3: [], 2: [], 1: []}
    for g in groups:
        if g.value[0] < g.value[1]:
            by_priority[g.weight].extend(g.msgs)
    return by_priority


def test_netcdf_of_downscaled_hadcm3_passes_the_cf_checker(downscaled, tmp_path):
    # the source file itself is not compliant (a _FillValue on coordinates, an
    # attribute name with a space): xorbit's output must be
    path = downscaled.orbit.to_netcdf(tmp_path / "out.nc")
    fails = cf_failures(path)
    assert fails[3] == [] and fails[2] == []  # high and medium priorities
    assert fails[1] == []  # low too, as of compliance-checker 6.1


def test_netcdf_round_trip_is_lossless(downscaled, tmp_path):
    path = to_netcdf(downscaled, tmp_path / "out.nc", title="t")
    back = xr.open_dataset(path, decode_times=TIMES)
    var = back["air_temperature"]
    np.testing.assert_array_equal(var.values, downscaled.values)
    np.testing.assert_array_equal(var.latitude.values, downscaled.latitude.values)
    assert list(var.time.values) == list(downscaled.time.values)
    assert var.attrs["Model_scenario"] == downscaled.attrs["Model scenario"]
    for key in ("standard_name", "units", "cell_methods", "grid_mapping", "history"):
        assert var.attrs[key] == downscaled.attrs[key]
    assert back.latitude.attrs["bounds"] == "latitude_bnds"
    assert back["latitude_bnds"].shape == (36, 2)
    assert back.attrs["Conventions"] == "CF-1.10" and back.attrs["title"] == "t"
    raw = xr.open_dataset(path, decode_cf=False)
    for name in ("latitude", "longitude", "time", "latitude_bnds", "latitude_longitude"):
        assert "_FillValue" not in raw[name].attrs, name
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("keepbits", [7, 12])
def test_keepbits_bounds_the_error_and_shrinks_the_file(downscaled, tmp_path, keepbits):
    lossless = to_netcdf(downscaled, tmp_path / "a.nc")
    rounded = to_netcdf(downscaled, tmp_path / "b.nc", keepbits=keepbits)
    back = xr.open_dataset(rounded, decode_times=TIMES)["air_temperature"]
    rel = np.abs(back.values - downscaled.values) / np.abs(downscaled.values)
    assert rel.max() <= 2.0 ** -(keepbits + 1)
    assert rel.max() > 0
    assert back.attrs["xorbit_keepbits"] == keepbits
    assert rounded.stat().st_size < lossless.stat().st_size


def test_bitround_by_hand():
    x = np.array([1.0 + 2**-10 + 2**-12, np.nan, np.inf, -3.0], np.float32)
    out = bitround(x, 10)
    assert out[0] == np.float32(1.0 + 2**-10)  # 2^-12 lies below half an ulp of 10 bits
    assert np.isnan(out[1]) and out[2] == np.inf and out[3] == -3.0
    with pytest.raises(ValueError, match="keepbits must be between 0 and 23"):
        bitround(x, 30)


def test_failed_netcdf_write_keeps_the_old_file(downscaled, tmp_path, monkeypatch):
    path = to_netcdf(downscaled.isel(time=[0]), tmp_path / "out.nc")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", boom)
    with pytest.raises(OSError, match="disk full"):
        to_netcdf(downscaled, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.nc"]


FAIL_ON = {"block": None}
COMPUTED = []


def flaky(block, block_info=None):
    t0 = block_info[0]["array-location"][0][0]
    if FAIL_ON["block"] == t0:
        raise RuntimeError(f"killed while computing time {t0}")
    COMPUTED.append(t0)
    return block


def crashed_write(downscaled, store, **kw):
    """A write of ``downscaled`` in 2-step time chunks, killed at time 6; the field."""
    data = downscaled.data.rechunk((2, 36, 48)).map_blocks(flaky, dtype=np.float32)
    field = downscaled.copy(data=data)
    COMPUTED.clear()
    FAIL_ON["block"] = 6
    with pytest.raises(RuntimeError, match="killed while computing time 6"):
        field.orbit.to_zarr(store, **kw)
    assert not store.exists() and store.with_name(store.name + ".partial").exists()
    assert sorted(COMPUTED) == [0, 2, 4]
    COMPUTED.clear()
    FAIL_ON["block"] = None
    return field


def test_zarr_round_trip_and_resume_after_a_crash(downscaled, tmp_path):
    store = tmp_path / "out.zarr"
    field = crashed_write(downscaled, store)
    field.orbit.to_zarr(store)
    assert sorted(COMPUTED) == [6, 8, 10]  # the finished regions were not recomputed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]  # no markers left
    back = xr.open_zarr(store, decode_times=TIMES, consolidated=False)
    np.testing.assert_array_equal(back["air_temperature"].values, downscaled.values)
    assert back.attrs["Conventions"] == "CF-1.10"
    with pytest.raises(FileExistsError, match="exists; remove it"):
        field.orbit.to_zarr(store)


def test_zarr_keepbits_is_recorded(downscaled, tmp_path):
    store = downscaled.orbit.to_zarr(tmp_path / "k.zarr", keepbits=9)
    back = xr.open_zarr(store, consolidated=False, decode_times=TIMES)["air_temperature"]
    assert back.attrs["xorbit_keepbits"] == 9
    rel = np.abs(back.values - downscaled.values) / np.abs(downscaled.values)
    assert 0 < rel.max() <= 2.0**-10
    assert isinstance(back.data, da.Array)


@pytest.mark.parametrize(
    ("first", "second", "changed"),
    [
        ({"keepbits": 4}, {}, "keepbits (4 -> None)"),
        ({"level": 1}, {"level": 9}, "level (1 -> 9)"),
    ],
)
def test_zarr_resume_with_other_encoding_starts_afresh(
    downscaled, tmp_path, first, second, changed
):
    store = tmp_path / "out.zarr"
    field = crashed_write(downscaled, store, **first)
    with pytest.warns(UserWarning, match="starting afresh") as record:
        field.orbit.to_zarr(store, **second)
    (message,) = [str(w.message) for w in record if "starting afresh" in str(w.message)]
    assert changed in message
    assert sorted(COMPUTED) == [0, 2, 4, 6, 8, 10]  # nothing kept from the other encoding
    back = xr.open_zarr(store, decode_times=TIMES, consolidated=False)["air_temperature"]
    np.testing.assert_array_equal(back.values, downscaled.values)  # lossless, every region
    assert "xorbit_keepbits" not in back.attrs
    meta = json.loads((store / "air_temperature" / "zarr.json").read_text())
    (blosc,) = [c for c in meta["codecs"] if c["name"] == "blosc"]
    assert blosc["configuration"]["clevel"] == second.get("level", 3)


def test_zarr_resume_signature_sees_coordinates_and_dtypes(downscaled, tmp_path):
    from xorbit.io import _resume_signature

    ds = xorbit.io.prepare(downscaled)
    base = _resume_signature(ds, level=3, keepbits=None)
    assert base == _resume_signature(ds.copy(deep=True), level=3, keepbits=None)
    shifted = ds.assign_coords(latitude=ds.latitude + 0.5)
    as64 = ds.assign(air_temperature=ds.air_temperature.astype(np.float64))
    # another computation of the same shape (e.g. another model's weights)
    other_model = ds.assign(air_temperature=ds.air_temperature + 0)
    for other in (shifted, as64, ds.chunk(time=3), ds.rename(air_temperature="tas"), other_model):
        assert _resume_signature(other, level=3, keepbits=None) != base


@pytest.fixture(scope="module")
def coarse_without_mapping():
    """HadCM3 as ``open_dataset(...)["air_temperature"]`` gives it: ``grid_mapping``
    names a variable that a DataArray does not carry along."""
    fine = hadcm3_air_temperature().isel(time=slice(0, 4)).drop_vars("latitude_longitude")
    coarse = coarsen(fine, 4)
    assert coarse.attrs["grid_mapping"] == "latitude_longitude"
    return coarse


def test_netcdf_writes_the_grid_mapping_a_variable_names(coarse_without_mapping, tmp_path):
    path = to_netcdf(coarse_without_mapping, tmp_path / "c.nc")
    fails = cf_failures(path)
    assert fails[3] == [] and fails[2] == []  # was: "grid mapping variable ... must exist"
    assert not [m for ms in fails.values() for m in ms if "grid mapping" in m]
    back = xr.open_dataset(path, decode_times=TIMES)
    assert back["air_temperature"].attrs["grid_mapping"] == "latitude_longitude"
    crs = back["latitude_longitude"]
    assert crs.ndim == 0 and np.issubdtype(crs.dtype, np.integer)
    assert crs.attrs["grid_mapping_name"] == "latitude_longitude"
    raw = xr.open_dataset(path, decode_cf=False)
    assert "_FillValue" not in raw["latitude_longitude"].attrs


def test_zarr_writes_the_grid_mapping_a_variable_names(coarse_without_mapping, tmp_path):
    store = to_zarr(coarse_without_mapping.chunk(time=2), tmp_path / "c.zarr")
    back = xr.open_zarr(store, decode_times=TIMES, consolidated=False)
    assert back["air_temperature"].attrs["grid_mapping"] == "latitude_longitude"
    assert back["latitude_longitude"].attrs["grid_mapping_name"] == "latitude_longitude"
    assert back["latitude_longitude"].ndim == 0


def test_a_missing_non_latlon_grid_mapping_is_dropped(coarse_without_mapping):
    from xorbit.io import prepare

    rotated = coarse_without_mapping.assign_attrs(grid_mapping="rotated_pole")
    rotated["latitude"].attrs["standard_name"] = "grid_latitude"
    rotated["longitude"].attrs["standard_name"] = "grid_longitude"
    with pytest.warns(UserWarning, match="'air_temperature' names grid_mapping 'rotated_pole'"):
        ds = prepare(rotated)
    assert "grid_mapping" not in ds["air_temperature"].attrs
    assert "rotated_pole" not in ds.variables
