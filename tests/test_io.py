"""CF-compliant, compressed, atomic and resumable output."""

import json
import sys
import threading
import time
import warnings
from pathlib import Path

import dask
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


def bitround_reference(a: np.ndarray, keepbits: int) -> np.ndarray:
    """Round to nearest, ties to even, by arithmetic rather than bits: in float64,
    divide by the float32 quantum of ``keepbits`` bits, `np.round` (ties to even),
    multiply back (every step exact)."""
    x = a.astype(np.float64)
    _, exp = np.frexp(x)
    # the quantum of a normal float32 in [2^(e-1), 2^e); subnormals share 2^-126's
    quantum = np.ldexp(1.0, np.maximum(exp - 1, -126) - keepbits)
    with np.errstate(over="ignore"):
        return (np.round(x / quantum) * quantum).astype(np.float32)


def test_bitround_rounds_to_nearest_ties_to_even():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    # exact ties (only the bit below the kept ones set) of both parities, the
    # largest float32 (rounds up to inf), subnormals and zeros
    ties = np.array([0x3F800000 | (1 << 12), 0x3F800000 | (3 << 12)], np.uint32)
    edges = np.array([0x7F7FFFFF, 0x00000001, 0x007FFFFF, 0x00000000, 0x80000000], np.uint32)
    a = np.concatenate([bits, ties, edges]).view(np.float32)
    a = a[np.isfinite(a)]
    for keepbits in range(24):
        got = bitround(a, keepbits)
        want = bitround_reference(a, keepbits)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=keepbits)
    # 1 + 2^-11 lies exactly halfway between 10-bit neighbours: to the even one, 1
    halfway = np.array([1 + 2**-11, 1 + 3 * 2**-11], np.float32)
    np.testing.assert_array_equal(bitround(halfway, 10), [1.0, 1 + 4 * 2**-11])


def test_bitround_keeps_every_nan_and_inf():
    # numcodecs' BitRound alone turns these NaNs into inf, -0.0 or +0.0 at some
    # keepbits (it rounds the payload like a mantissa)
    patterns = [0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0xFFC00001, 0x7F800000, 0xFF800000]
    a = np.array(patterns, np.uint32).view(np.float32)
    for keepbits in (0, 1, 10, 22):
        np.testing.assert_array_equal(bitround(a, keepbits).view(np.uint32), patterns)


def smooth_noisy_field(chunks=None) -> xr.DataArray:
    """A smooth 280 K field plus 0.01 K noise on a 32 x 48 lat-lon grid, 6 times."""
    rng = np.random.default_rng(1)
    lat = np.linspace(-30.0, 30.0, 32)
    lon = np.linspace(0.0, 90.0, 48)
    smooth = 280 + 10 * np.sin(np.radians(3 * lat))[:, None] * np.cos(np.radians(4 * lon))
    values = smooth + rng.normal(0, 0.01, (6, 32, 48))
    field = xr.DataArray(
        values.astype(np.float32),
        dims=("time", "latitude", "longitude"),
        coords={
            "time": np.arange(6.0),
            "latitude": ("latitude", lat, {"units": "degrees_north"}),
            "longitude": ("longitude", lon, {"units": "degrees_east"}),
        },
        name="tas",
        attrs={"units": "K", "comment": "synthetic"},
    )
    return field.chunk(chunks) if chunks else field


def test_keepbits_auto_keeps_the_information_and_records_it(tmp_path):
    field = smooth_noisy_field()
    lossless = to_netcdf(field, tmp_path / "a.nc")
    path = field.orbit.to_netcdf(tmp_path / "auto.nc", keepbits="auto")
    back = xr.open_dataset(path)["tas"]
    k = back.attrs["xorbit_keepbits"]
    assert 1 <= k <= 22  # lossy, yet not everything dropped
    rel = np.abs(back.values - field.values) / np.abs(field.values)
    assert 0 < rel.max() <= 2.0 ** -(k + 1)
    assert back.attrs["comment"] == (
        f"synthetic; mantissa rounded to {k} bits (relative error <= 2**-{k + 1}), "
        "chosen by xbitinfo to keep 99% of the real information"
    )
    assert path.stat().st_size < lossless.stat().st_size
    # bounds are geometry: never rounded
    np.testing.assert_array_equal(
        xr.open_dataset(path).latitude_bnds, xr.open_dataset(lossless).latitude_bnds
    )


def test_keepbits_auto_measures_dask_data_on_the_first_time_chunk():
    from xorbit.io import prepare

    seen = []

    def record(block, block_info=None):
        seen.append(block_info[0]["array-location"][0][0])
        return block

    field = smooth_noisy_field(chunks={"time": 2})
    field = field.copy(data=field.data.map_blocks(record, dtype=np.float32))
    ds = prepare(field, keepbits="auto")
    assert seen == [0]  # the sample: the first chunk along time, nothing else
    assert isinstance(ds["tas"].data, da.Array)  # the rest stays lazy
    eager = prepare(smooth_noisy_field().isel(time=slice(0, 2)), keepbits="auto")
    assert ds["tas"].attrs["xorbit_keepbits"] == eager["tas"].attrs["xorbit_keepbits"]


def test_keepbits_auto_keeps_a_constant_field_exact():
    from xorbit.io import prepare

    flat = xr.full_like(smooth_noisy_field(), 280.3)
    ds = prepare(flat, keepbits="auto")
    assert ds["tas"].attrs["xorbit_keepbits"] == 23
    np.testing.assert_array_equal(ds["tas"].values, flat.values)


def test_keepbits_auto_without_xbitinfo_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "xbitinfo", None)  # import xbitinfo -> ImportError
    with pytest.raises(ImportError, match=r"'tas'.*pip install 'xorbit\[bitinfo\]'"):
        to_netcdf(smooth_noisy_field(), tmp_path / "x.nc", keepbits="auto")
    with pytest.raises(ValueError, match="'best'"):
        to_netcdf(smooth_noisy_field(), tmp_path / "x.nc", keepbits="best")


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
    """A write of ``downscaled`` in 2-step time chunks, killed at time 6; the field.

    The crashed call writes one region per `dask.compute` (in order, as a
    sequential writer would), so exactly the regions before time 6 are done;
    the calls that resume write theirs concurrently.
    ``keepbits="auto"`` computes the first chunk once more (its sample)."""
    data = downscaled.data.rechunk((2, 36, 48)).map_blocks(flaky, dtype=np.float32)
    field = downscaled.copy(data=data)
    COMPUTED.clear()
    FAIL_ON["block"] = 6
    with pytest.raises(RuntimeError, match="killed while computing time 6"):
        field.orbit.to_zarr(store, regions_per_compute=1, **kw)
    assert not store.exists() and store.with_name(store.name + ".partial").exists()
    sampled = [0] if kw.get("keepbits") == "auto" else []
    assert sorted(COMPUTED) == sorted([*sampled, 0, 2, 4])
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


def block_start(block_info) -> int:
    return block_info[0]["array-location"][0][0]


def test_zarr_writes_regions_concurrently(tmp_path):
    # every region's only chunk waits at a barrier of two: it passes only if
    # two region writes are in flight at once (one at a time: BrokenBarrierError)
    barrier = threading.Barrier(2, timeout=20)
    met = []

    def meet(block, block_info=None):
        barrier.wait()
        met.append(block_start(block_info))
        return block

    field = smooth_noisy_field(chunks={"time": 1})
    field = field.copy(
        data=field.data.map_blocks(meet, dtype=np.float32, meta=np.array((), np.float32))
    )
    with dask.config.set(scheduler="threads", num_workers=2):
        store = to_zarr(field, tmp_path / "out.zarr")
    assert sorted(met) == [0, 1, 2, 3, 4, 5]
    back = xr.open_zarr(store, decode_times=TIMES, consolidated=False)["tas"]
    np.testing.assert_array_equal(back.values, smooth_noisy_field().values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]


def test_zarr_concurrent_crash_resumes_exactly_the_unfinished_regions(tmp_path):
    store = tmp_path / "out.zarr"
    done = tmp_path / "out.zarr.partial-done"
    fail_at = {"time": 3}
    computed = []

    def step(block, block_info=None):
        t0 = block_start(block_info)
        if t0 == fail_at["time"]:
            # let the five other regions finish and mark themselves first (the
            # other thread writes them meanwhile), then die
            deadline = time.monotonic() + 30
            while len(list(done.glob("run-*/region-*"))) < 5 and time.monotonic() < deadline:
                time.sleep(0.01)
            raise RuntimeError(f"killed while computing time {t0}")
        computed.append(t0)
        return block

    field = smooth_noisy_field(chunks={"time": 1})
    field = field.copy(
        data=field.data.map_blocks(step, dtype=np.float32, meta=np.array((), np.float32))
    )
    with dask.config.set(scheduler="threads", num_workers=2):
        with pytest.raises(RuntimeError, match="killed while computing time 3"):
            to_zarr(field, store)
        assert not store.exists()
        assert sorted(p.name for p in done.glob("run-*/region-*")) == [
            f"region-{i}" for i in (0, 1, 2, 4, 5)
        ]
        assert sorted(computed) == [0, 1, 2, 4, 5]
        computed.clear()
        fail_at["time"] = None
        to_zarr(field, store)
    assert computed == [3]  # only the region that had no marker
    back = xr.open_zarr(store, decode_times=TIMES, consolidated=False)["tas"]
    np.testing.assert_array_equal(back.values, smooth_noisy_field().values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]


def test_a_task_of_an_abandoned_store_cannot_mark_a_region_of_the_next(
    downscaled, tmp_path, monkeypatch
):
    """A crashed run's region task still running (a worker out of reach) used to
    drop its marker into the folder of the store that replaced it."""
    store = tmp_path / "out.zarr"
    markers = []
    mark_done = xorbit.io._mark_done
    monkeypatch.setattr(xorbit.io, "_mark_done", lambda w, m: markers.append(m) or mark_done(w, m))
    field = crashed_write(downscaled, store)  # regions 0, 1, 2 written and marked
    stale = Path(markers[0]).parent / "region-5"  # a region the crashed run still had going
    FAIL_ON["block"] = 0  # the next run (another encoding) starts afresh, dies at once
    with pytest.warns(UserWarning, match="starting afresh"), pytest.raises(RuntimeError):
        field.orbit.to_zarr(store, level=9, regions_per_compute=1)
    with pytest.raises(FileNotFoundError):  # the stale task's folder is gone
        mark_done(None, str(stale))
    FAIL_ON["block"] = None
    COMPUTED.clear()
    field.orbit.to_zarr(store, level=9)
    assert 10 in COMPUTED  # region 5 (times 10, 11) was written, not taken as done
    back = xr.open_zarr(store, decode_times=TIMES, consolidated=False)["air_temperature"]
    np.testing.assert_array_equal(back.values, downscaled.values)


def test_zarr_computes_regions_in_bounded_groups(tmp_path, monkeypatch):
    calls = []
    compute = dask.compute
    monkeypatch.setattr(dask, "compute", lambda *a, **kw: calls.append(len(a)) or compute(*a, **kw))
    markers = []
    mark_done = xorbit.io._mark_done
    monkeypatch.setattr(xorbit.io, "_mark_done", lambda w, m: markers.append(m) or mark_done(w, m))
    monkeypatch.chdir(tmp_path)  # a relative store: the markers still get absolute paths
    field = smooth_noisy_field(chunks={"time": 1}).isel(time=slice(0, 5))
    store = to_zarr(field, "out.zarr", regions_per_compute=2)
    assert calls == [2, 2, 1]
    assert len(markers) == 5 and all(Path(m).is_absolute() for m in markers)
    back = xr.open_zarr(store, decode_times=TIMES, consolidated=False)["tas"]
    np.testing.assert_array_equal(back.values, field.values)
    with pytest.raises(ValueError, match="at least 1"):
        to_zarr(field, "other.zarr", regions_per_compute=0)


def test_zarr_writes_eager_data_and_lazy_static_fields(tmp_path):
    eager = smooth_noisy_field()  # numpy: no region dimension, one write
    back = xr.open_zarr(to_zarr(eager, tmp_path / "e.zarr"), consolidated=False)
    np.testing.assert_array_equal(back["tas"].values, eager.values)
    # a lazy field without time: not written by any time region
    ds = smooth_noisy_field(chunks={"time": 2}).to_dataset()
    ds["orog"] = (eager.isel(time=0, drop=True) * 0 + 5).chunk().assign_attrs(units="m")
    back = xr.open_zarr(to_zarr(ds, tmp_path / "s.zarr"), consolidated=False)
    np.testing.assert_array_equal(back["orog"].values, np.full((32, 48), 5, np.float32))
    np.testing.assert_array_equal(back["tas"].values, eager.values)
    # in-memory data with a lazy coordinate: no region dimension at all, and the
    # coordinate was left out of the one write (read back as NaN)
    flat = eager.isel(time=0, drop=True).to_dataset()
    flat = flat.assign_coords(area=(("lat", "lon"), np.full((32, 48), 2.0)))
    flat["area"] = flat["area"].chunk()
    back = xr.open_zarr(to_zarr(flat, tmp_path / "c.zarr"), consolidated=False)
    np.testing.assert_array_equal(back["area"].values, np.full((32, 48), 2.0))


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


def test_zarr_resume_with_auto_keepbits(downscaled, tmp_path):
    store = tmp_path / "out.zarr"
    field = crashed_write(downscaled, store, keepbits="auto")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        field.orbit.to_zarr(store, keepbits="auto")
    assert not [w for w in record if "starting afresh" in str(w.message)]
    assert sorted(COMPUTED) == [0, 6, 8, 10]  # the sample, then only the unfinished regions
    back = xr.open_zarr(store, decode_times=TIMES, consolidated=False)["air_temperature"]
    k = back.attrs["xorbit_keepbits"]
    assert 1 <= k <= 23
    np.testing.assert_array_equal(back.values, bitround(downscaled.values, k))
    # "auto" is not keepbits=None: resuming that one starts afresh
    other = tmp_path / "other.zarr"
    crashed_write(downscaled, other, keepbits="auto")
    with pytest.warns(UserWarning, match=rf"keepbits \({k} -> None\).*starting afresh"):
        field.orbit.to_zarr(other)


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
