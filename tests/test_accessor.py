"""`.orbit.downscale`: chunk invariance, seams, laziness, wrap, NaN, errors."""

import pickle

import dask
import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr

import xorbit
from tests.datasets import (
    briefly_trained_downscaler,
    powerlaw_field,
    smooth_field,
    tiny_config,
)
from xorbit.engine import run_model
from xorbit.tiles import TilePlan, apply_tiled

K = 4


def make_downscaler(**overrides):
    cfg = tiny_config(
        in_vars=["tas"], out_vars=["tas"], static_vars=[], img_size=(8, 8), **overrides
    )
    return xorbit.Downscaler.from_config(
        cfg, seed=1, mean={"tas": 280.0}, std={"tas": 10.0}, units={"tas": "K"}
    )


def coarse_field(data, lon0=225.0, dlon=7.5, dlat=5.0, lat0=-45.0):
    nt, ny, nx = data.shape
    return xr.DataArray(
        data,
        dims=("time", "lat", "lon"),
        coords={
            "time": np.arange(nt),
            "lat": xr.DataArray(
                lat0 + dlat * np.arange(ny), dims="lat", attrs={"units": "degrees_north"}
            ),
            "lon": xr.DataArray(
                lon0 + dlon * np.arange(nx), dims="lon", attrs={"units": "degrees_east"}
            ),
        },
        name="tas",
        attrs={"units": "K", "standard_name": "air_temperature", "long_name": "Air temp"},
    )


@pytest.fixture(scope="module")
def dsr():
    return make_downscaler()


@pytest.fixture(scope="module")
def trained():
    return briefly_trained_downscaler()


@pytest.fixture(scope="module")
def field():
    return coarse_field(280 + 10 * powerlaw_field((3, 20, 28), seed=4))


def reference(field, dsr, tile, halo, periodic=False):
    """The in-memory path: numpy normalize → apply_tiled(model) → denormalize."""
    x = dsr.normalize(field.values[:, None], ["tas"])
    plan = TilePlan.build(field.shape[-2:], tile, halo, K, periodic=(False, periodic))
    y = apply_tiled(x, plan, lambda w: run_model(dsr.model, w, ["tas"]))
    return dsr.denormalize(y, ["tas"])[:, 0]


def test_matches_the_in_memory_reference(field, dsr):
    out = field.chunk(time=2, lat=9, lon=10).orbit.downscale(dsr, tile=4, halo=2, device="cpu")
    assert out.shape == (3, 80, 112) and out.dims == ("time", "lat", "lon")
    ref = reference(field, dsr, 4, 2)
    np.testing.assert_allclose(out.values, ref, rtol=0, atol=1e-4)


def test_chunk_invariance(field, dsr):
    std = float(field.std())
    results = []
    for chunks in (
        {"time": 1, "lat": 1, "lon": 1},  # chunks smaller than the halo
        {"time": 2, "lat": 7, "lon": 13},
        {"time": -1, "lat": -1, "lon": -1},  # one chunk for all
    ):
        out = field.chunk(chunks).orbit.downscale(dsr, tile=4, halo=2, device="cpu")
        results.append(out.values)
    for r in results[1:]:
        assert np.abs(r - results[0]).max() / std < 1e-5


def seam_ratio(out, boundaries, k=K):
    """Mean steepness of columns near tile boundaries over that of columns far away.

    Steepness is |d/dx| averaged over rows and times.  "Near" is within k/2 fine
    pixels of a boundary (a seam shows up there, on either side); "far" is at least
    k pixels away.  A seamless field reads about 1.
    """
    d = np.abs(np.diff(out, axis=-1)).mean(axis=tuple(range(out.ndim - 1)))
    dist = np.min(np.abs(np.arange(d.size)[:, None] - np.asarray(boundaries)[None]), axis=1)
    return d[dist <= k // 2].mean() / d[dist >= k].mean()


def test_no_seams_at_tile_and_chunk_boundaries(trained):
    # smooth input; tile cores every 4 coarse = 16 fine pixels; chunks of 8 coarse
    smooth = coarse_field(280 + 10 * smooth_field(12, 32, nt=2))
    boundaries = [16 * i - 1 for i in range(1, 8)]  # diff index between columns 16i-1, 16i
    blended = smooth.chunk(lon=8).orbit.downscale(trained, tile=4, halo=2, device="cpu").values
    # the default for this 8 x 8 window: halo 1, core 6 (seam ratio 1.04 measured)
    thin = smooth.chunk(lon=8).orbit.downscale(trained, device="cpu").values
    assert trained.config.img_size == (8, 8)
    hard = smooth.chunk(lon=8).orbit.downscale(trained, tile=4, halo=0, device="cpu").values
    untiled = smooth.orbit.downscale(trained, tile=32, halo=0, device="cpu").values
    # The threshold: this briefly trained model's own column-to-column noise moves
    # the ratio by about +-10 % (the untiled model, which has no boundaries at all,
    # reads 0.94-1.03 at these columns), so "no larger than in the interior" is
    # <= 1.2.  Hard tiles without halo, the negative control, read about 1.9.
    assert 0.8 < seam_ratio(untiled, boundaries) < 1.2
    assert seam_ratio(blended, boundaries) <= 1.2
    starts = TilePlan.build((12, 32), (6, 6), (1, 1), K).x.starts[1:]
    assert seam_ratio(thin, [K * s - 1 for s in starts]) <= 1.2
    assert seam_ratio(hard, boundaries) > 1.5


CALLS = []


def counting_load(block):
    CALLS.append(block.shape)
    return block


def test_building_is_lazy_and_the_graph_holds_one_model(field, dsr):
    calls = CALLS
    calls.clear()
    load = counting_load

    lazy = field.copy(
        data=da.from_array(field.values, chunks=(1, 5, 7)).map_blocks(
            load, dtype=float, meta=np.array((), float)
        )
    )
    out = lazy.orbit.downscale(dsr, tile=4, halo=2, device="cpu")
    assert calls == [] and isinstance(out.data, da.Array)
    graph = dict(out.data.__dask_graph__())
    weight_bytes = sum(p.numel() * 4 for p in dsr.model.parameters())
    big = [k for k, v in graph.items() if len(pickle.dumps(v)) > weight_bytes / 2]
    assert len(big) == 1 and "xorbit-model" in str(big[0])
    assert len(graph) > 20  # many tasks share that one node
    out.compute()
    assert len(calls) > 0


def test_eager_input_gives_eager_output(field, dsr):
    out = field.orbit.downscale(dsr, tile=4, halo=2, device="cpu")
    assert isinstance(out.data, np.ndarray)
    np.testing.assert_allclose(out.values, reference(field, dsr, 4, 2), atol=1e-4)


def test_fine_grid_attrs_and_history(field, dsr):
    out = field.orbit.downscale(dsr, tile=4, halo=2, device="cpu")
    np.testing.assert_allclose(out.lat.values[:4], [-46.875, -45.625, -44.375, -43.125])
    np.testing.assert_allclose(np.diff(out.lon.values), 7.5 / 4)
    assert out.attrs["long_name"] == "Air temp" and out.attrs["units"] == "K"
    assert "downscaled x4 with xorbit" in out.attrs["history"]
    assert dsr.weights_sha256[:16] in out.attrs["history"]
    assert out.name == "tas"


def test_global_longitude_wraps(trained):
    data = 280 + 10 * smooth_field(12, 32, nt=1)
    glob = coarse_field(data, lon0=0.0, dlon=360 / 32)
    # make the smooth field periodic in longitude
    glob = glob.copy(
        data=280
        + 10
        * np.sin(2 * np.pi * glob.lon.values / 360)[None, None]
        * (np.cos(np.pi * np.arange(12) / 12)[None, :, None])
    )
    out = glob.chunk(lon=8).orbit.downscale(trained, tile=4, halo=2, device="cpu").values
    rolled = glob.roll(lon=8, roll_coords=False)
    out_rolled = rolled.chunk(lon=8).orbit.downscale(trained, tile=4, halo=2, device="cpu")
    np.testing.assert_allclose(out_rolled.values, np.roll(out, 8 * K, axis=-1), atol=1e-4)
    # no seam at the date line: append the first columns after the last one and
    # look at the steps there as at any other boundary
    wrapped = np.concatenate([out, out[..., :8]], axis=-1)
    boundaries = [16 * i - 1 for i in range(1, 9)]  # the last is the date line
    assert seam_ratio(wrapped, boundaries) <= 1.2
    # the same field treated as regional agrees away from the edges only
    regional = glob.orbit.downscale(trained, tile=4, halo=2, device="cpu", periodic=False)
    diff = np.abs(regional.values - out)
    assert diff[..., 40:88].max() < 1e-4
    assert diff[..., :4].max() > 1e-2


def test_nan_cells_stay_nan_and_do_not_spread(field, dsr):
    holed = field.copy()
    holed[:, 5, 6] = np.nan
    out = holed.chunk(lat=10).orbit.downscale(dsr, tile=4, halo=2, device="cpu").values
    assert np.isnan(out[:, 20:24, 24:28]).all()
    assert np.isfinite(out).sum() == out.size - 3 * 16


def test_dataset_with_static_field_matches_dataarray_path():
    cfg = tiny_config(img_size=(8, 8))  # tas + orog (static)
    dsr = xorbit.Downscaler.from_config(
        cfg, seed=2, mean={"tas": 280.0, "orog": 500.0}, std={"tas": 10.0, "orog": 300.0}
    )
    tas = coarse_field(280 + 10 * powerlaw_field((2, 12, 16), seed=1))
    orog = (500 + 300 * powerlaw_field((1, 12, 16), seed=2))[0]
    orog = xr.DataArray(orog, dims=("lat", "lon"), coords={"lat": tas.lat, "lon": tas.lon})
    static = xr.Dataset({"orog": orog})
    a = tas.orbit.downscale(dsr, static=static, tile=4, halo=2, device="cpu")
    ds = xr.Dataset({"tas": tas, "orog": orog})
    b = ds.chunk(lat=4).orbit.downscale(dsr, tile=4, halo=2, device="cpu")
    assert set(b.data_vars) == {"tas"} and "lat_bnds" in b.coords
    np.testing.assert_allclose(b["tas"].values, a.values, atol=1e-4)
    # orography matters to the answer
    static2 = static.assign(orog=static.orog * 0 + 500)
    c = tas.orbit.downscale(dsr, static=static2, tile=4, halo=2, device="cpu")
    assert np.abs(c.values - a.values).max() > 1e-3


def test_variables_found_by_standard_name(field):
    cfg = tiny_config(in_vars=["air_temperature"], out_vars=["air_temperature"], static_vars=[])
    model = xorbit.Downscaler.from_config(
        cfg, mean={"air_temperature": 280.0}, std={"air_temperature": 10.0}
    )
    renamed = field.rename("air_temp_2m").to_dataset()  # standard_name: air_temperature
    out = renamed.orbit.downscale(model, tile=4, halo=2, device="cpu")
    assert list(out.data_vars) == ["air_temperature"]
    assert out["air_temperature"].shape == (3, 80, 112)


def test_errors_name_the_problem(field, dsr):
    with pytest.raises(
        KeyError, match=r"input variables 'tas', 'orog' are not in .*holds \['pr'\]"
    ):
        xr.Dataset({"pr": field}).orbit.downscale(
            xorbit.Downscaler.from_config(tiny_config()), device="cpu"
        )
    with pytest.raises(ValueError, match="'tas' is in 'm', which cannot be converted"):
        field.assign_attrs(units="m").orbit.downscale(dsr, device="cpu")
    with pytest.raises(TypeError, match=r"expects an xorbit\.Downscaler"):
        field.orbit.downscale(dsr.model)
    with pytest.raises(ValueError, match="tile must be >= 1"):
        field.orbit.downscale(dsr, tile=0, device="cpu")


@pytest.mark.distributed
def test_local_cluster_with_two_processes_matches(field, dsr):
    distributed = pytest.importorskip("distributed")
    single = field.chunk(lat=10, lon=14).orbit.downscale(dsr, tile=4, halo=2, device="cpu")
    expected = single.values
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
    ):
        got = single.compute().values
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_threads_do_not_share_state(field, dsr):
    with dask.config.set(scheduler="threads", num_workers=4):
        a = field.chunk(lat=5).orbit.downscale(dsr, tile=4, halo=2, device="cpu").values
    b = reference(field, dsr, 4, 2)
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert torch.get_num_threads() >= 1


def test_nonnegative_outputs_are_clamped_after_denormalizing(field):
    cfg = tiny_config(in_vars=["pr"], out_vars=["pr"], static_vars=[], img_size=(8, 8))
    # a mean far below zero: the raw output would be negative almost everywhere
    kw = dict(seed=0, mean={"pr": -5.0}, std={"pr": 1.0})
    pr = field.rename("pr").assign_attrs(units=None) * 0 - 5
    free = xorbit.Downscaler.from_config(cfg, **kw)
    clamped = xorbit.Downscaler.from_config(cfg, nonnegative=["pr"], **kw)
    a = pr.orbit.downscale(free, tile=4, halo=2, device="cpu").values
    b = pr.orbit.downscale(clamped, tile=4, halo=2, device="cpu").values
    assert (a < 0).mean() > 0.9
    assert b.min() == 0.0
    np.testing.assert_array_equal(b, np.maximum(a, 0))


def oriented(dsr, field):
    """``dsr`` with the facts of ``field``'s grid recorded, as training records them."""
    from xorbit.downscaler import training_grid

    return xorbit.Downscaler(
        model=dsr.model,
        mean=dsr.mean,
        std=dsr.std,
        units=dsr.units,
        grid=training_grid(field.lat, field.lon),
    )


def test_latitude_order_of_the_input_does_not_change_the_answer(field, dsr):
    """ERA5 runs north to south: the same field upside down used to give another answer."""
    model = oriented(dsr, field)  # trained on ascending latitude
    up = field.orbit.downscale(model, tile=4, halo=2, device="cpu")
    flipped = field.isel(lat=slice(None, None, -1))
    down = flipped.chunk(lat=7).orbit.downscale(model, tile=4, halo=2, device="cpu")
    assert (np.diff(down.lat.values) < 0).all()  # the caller's order is kept
    np.testing.assert_allclose(down.sortby("lat").values, up.values, rtol=0, atol=1e-4)
    # a Dataset keeps its bounds in the caller's order too
    ds = flipped.to_dataset().orbit.downscale(model, tile=4, halo=2, device="cpu")
    assert (np.diff(ds.lat_bnds.values[:, 0]) < 0).all()
    np.testing.assert_allclose(ds.tas.sortby("lat").values, up.values, rtol=0, atol=1e-4)
    # a model that records no grid uses the input as given, and says so once
    xorbit.accessor._WARNED.clear()
    with pytest.warns(xorbit.accessor.GridWarning, match="records no training grid"):
        field.orbit.downscale(dsr, tile=4, halo=2, device="cpu")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        field.orbit.downscale(dsr, tile=4, halo=2, device="cpu")


def test_a_far_grid_spacing_warns(field, dsr):
    model = oriented(dsr, field)  # 5 x 7.5 degrees
    fine_grid = field.assign_coords(lat=0.25 * np.arange(20), lon=0.25 * np.arange(28))
    with pytest.warns(xorbit.accessor.GridWarning, match=r"'lat' spacing is 0\.25.*spacing 5 "):
        fine_grid.orbit.downscale(model, tile=4, halo=2, device="cpu")
    model.grid["multi_resolution"] = True
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fine_grid.orbit.downscale(model, tile=4, halo=2, device="cpu")
        field.orbit.downscale(oriented(dsr, field), tile=4, halo=2, device="cpu")


def test_an_unnamed_array_is_never_taken_for_a_static_field(field):
    """Its first input used to be guessed, even when that was orography."""
    cfg = tiny_config(in_vars=["orog", "tas"], out_vars=["tas"], static_vars=["orog"])
    dsr = xorbit.Downscaler.from_config(cfg, mean={"tas": 280.0, "orog": 0.0})
    unnamed = field.rename(None).drop_attrs()
    orog = xr.Dataset({"orog": field.isel(time=0, drop=True) * 0 + 100.0})
    out = unnamed.orbit.downscale(dsr, static=orog, tile=4, halo=2, device="cpu")
    named = field.orbit.downscale(dsr, static=orog, tile=4, halo=2, device="cpu")
    np.testing.assert_allclose(out.values, named.values, rtol=0, atol=1e-5)
    two = tiny_config(in_vars=["tas", "pr"], out_vars=["tas", "pr"], static_vars=[])
    with pytest.raises(KeyError, match=r"cannot tell which model variable .*\['tas', 'pr'\]"):
        unnamed.orbit.downscale(xorbit.Downscaler.from_config(two), device="cpu")
