"""Training samples read from stores: the same numbers as in memory, nothing loaded whole."""

import pickle
import threading

import numpy as np
import pytest
import xarray as xr

import xorbit
from tests.test_train import fine_field, max_diff, small_config, weights
from xorbit import coarsen
from xorbit.training import train
from xorbit.training.loop import _prefetched
from xorbit.training.samples import FieldStack, PairedCrops, pair_arrays


@pytest.fixture
def stored(tmp_path):
    """A fine field and its coarse twin in zarr stores, one chunk per time step."""
    fine = fine_field(nt=24, n=32).astype(np.float32)
    coarse = coarsen(fine, 4)
    fine.to_dataset().chunk(time=1).to_zarr(tmp_path / "fine.zarr")
    coarse.to_dataset().chunk(time=1).to_zarr(tmp_path / "coarse.zarr")
    return fine, coarse, tmp_path


def opened(path):
    return xr.open_zarr(path)["tas"]


def test_a_store_is_read_sample_by_sample_with_the_numbers_of_memory(stored, monkeypatch):
    fine, coarse, where = stored
    clim = {"tas": fine.mean("time").astype(np.float32)}
    kw = dict(mean={"tas": 1.5}, std={"tas": 2.0}, output_climatology=clim)
    args = (["tas"], ["tas"], 4)
    eager = pair_arrays(coarse, fine, *args, **kw, load=True)
    small = pair_arrays(opened(where / "coarse.zarr"), opened(where / "fine.zarr"), *args, **kw)
    assert isinstance(eager.fine, np.ndarray) and isinstance(small.fine, np.ndarray)
    # the default rule: a store larger than the threshold is read on demand
    monkeypatch.setattr("xorbit.training.samples.IN_MEMORY_BYTES", eager.fine.nbytes)
    lazy = pair_arrays(opened(where / "coarse.zarr"), opened(where / "fine.zarr"), *args, **kw)
    assert isinstance(lazy.fine, FieldStack) and lazy.fine.shape == eager.fine.shape
    np.testing.assert_array_equal(np.asarray(lazy.fine), eager.fine)
    np.testing.assert_array_equal(lazy.coarse[5, :, 2:6, 1:4], eager.coarse[5, :, 2:6, 1:4])
    part = lazy.select(np.array([3, 7, 20]))
    np.testing.assert_array_equal(np.asarray(part.fine), eager.fine[[3, 7, 20]])
    np.testing.assert_array_equal(part.fine[1, :, :8, :8], eager.fine[7, :, :8, :8])
    crops_e = PairedCrops(eager, (4, 4), 4, crops_per_time=2, seed=3)
    crops_l = PairedCrops(lazy, (4, 4), 4, crops_per_time=2, seed=3)
    for a, b in zip(crops_e.batch(range(9)), crops_l.batch(range(9)), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # what reaches a DDP rank: the store's address and the index, not the values
    assert len(pickle.dumps(lazy)) < eager.fine.nbytes / 4


def test_a_climatology_is_matched_by_label_as_in_memory(stored):
    """The lazy path subtracted a climatology by position: one with reversed
    latitudes, or (lon, lat) order, gave other numbers than in memory."""
    fine, coarse, where = stored
    clim = fine.mean("time").astype(np.float32)
    args = (["tas"], ["tas"], 4, {"tas": 0.0}, {"tas": 1.0})
    eager = pair_arrays(coarse, fine, *args, output_climatology={"tas": clim}, load=True)
    for odd in (clim.isel(lat=slice(None, None, -1)), clim.transpose("lon", "lat")):
        lazy = pair_arrays(
            coarse, opened(where / "fine.zarr"), *args, output_climatology={"tas": odd}, load=False
        )
        np.testing.assert_array_equal(np.asarray(lazy.fine), eager.fine)


@pytest.mark.distributed
def test_data_persisted_on_a_cluster_are_read_from_it(stored):
    distributed = pytest.importorskip("distributed")
    fine, coarse, _ = stored
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
    ):
        kept = fine.chunk(time=1).persist()
        lazy = pair_arrays(
            coarse, kept, ["tas"], ["tas"], 4, {"tas": 0.0}, {"tas": 1.0}, load=False
        )
        # the synchronous read of a rank cannot resolve the cluster's futures
        np.testing.assert_array_equal(lazy.fine[3, :, :4, :4][0], fine.values[3, :4, :4])


def test_a_file_opened_without_chunks_is_not_loaded_whole(stored):
    fine, coarse, where = stored
    fine.to_netcdf(where / "fine.nc")
    with xr.open_dataset(where / "fine.nc") as ds:
        lazy = pair_arrays(
            coarse, ds["tas"], ["tas"], ["tas"], 4, {"tas": 0.0}, {"tas": 1.0}, load=False
        )
        assert isinstance(lazy.fine, FieldStack)
        assert not isinstance(lazy.fine.sources[0], np.ndarray)  # the file's variable
        np.testing.assert_array_equal(lazy.fine[4, :, :4, :4][0], fine.values[4, :4, :4])


def test_training_from_stores_matches_training_in_memory(stored):
    fine, coarse, where = stored
    kw = dict(epochs=2, batch_size=4, progress=False, seed=5, device="cpu", val_fraction=0.25)
    # the data path alone: a closed-form linear path would amplify the last bits
    # in which Dask's statistics differ from numpy's (tests/test_linear.py has it)
    kw["linear_path"] = False
    eager = train(coarse, fine, small_config(), in_memory=True, **kw)
    lazy = train(
        opened(where / "coarse.zarr"), opened(where / "fine.zarr"), small_config(),
        in_memory=False, prefetch=3, **kw,
    )  # fmt: skip
    # statistics summed chunk by chunk by Dask differ from numpy's in the last
    # bits; everything else is the same arithmetic
    assert lazy.mean["tas"] == pytest.approx(eager.mean["tas"], rel=1e-6, abs=1e-6)
    assert lazy.std["tas"] == pytest.approx(eager.std["tas"], rel=1e-6)
    init = weights(xorbit.Downscaler.from_config(small_config(), seed=5))
    assert max_diff(init, weights(eager)) > 1e-3
    assert max_diff(weights(eager), weights(lazy)) < 1e-5
    for a, b in zip(lazy.history, eager.history, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    for a, b in zip(
        lazy.output_climatology.values(), eager.output_climatology.values(), strict=True
    ):
        np.testing.assert_allclose(a.values, b.values, rtol=1e-6)


def test_samples_per_epoch_draws_that_many_random_samples(stored):
    fine, coarse, _ = stored
    data = pair_arrays(coarse, fine, ["tas"], ["tas"], 4, {"tas": 280.0}, {"tas": 10.0})
    crops = PairedCrops(data, (4, 4), 4, seed=1, samples=10)
    assert len(crops) == 10
    first = [t.numpy() for t in crops.batch(range(10))]
    again = [t.numpy() for t in PairedCrops(data, (4, 4), 4, seed=1, samples=10).batch(range(10))]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    crops.set_epoch(1)
    assert not np.array_equal(crops.batch(range(10))[0].numpy(), first[0])
    with pytest.raises(ValueError, match="samples_per_epoch must be a positive"):
        PairedCrops(data, (4, 4), 4, samples=0)
    dsr = train(
        coarse, fine, small_config(), epochs=2, batch_size=4, samples_per_epoch=9,
        progress=False, device="cpu",
    )  # fmt: skip
    # 9 samples of batch 4: two steps per epoch, the warm-up scheduled on them
    assert [h["epoch"] for h in dsr.history] == [1, 2]


def test_prefetching_yields_in_order_reads_ahead_and_passes_errors():
    started = []
    lock = threading.Lock()

    def load(i):
        with lock:
            started.append(i)
        return i * 10

    got = []
    for value in _prefetched(load, 6, depth=2):
        got.append(value)
        # never more than `depth` loads beyond the one handed out
        assert len(started) <= len(got) + 2
    assert got == [0, 10, 20, 30, 40, 50] and sorted(started) == list(range(6))

    def broken(i):
        if i == 3:
            raise OSError("store unreachable at 3")
        return i

    with pytest.raises(OSError, match="unreachable at 3"):
        list(_prefetched(broken, 6, depth=2))
    assert list(_prefetched(lambda i: i, 4, depth=0)) == [0, 1, 2, 3]


def test_val_steps_validates_on_a_fixed_subsample():
    fine = fine_field(nt=20)
    coarse = coarsen(fine, 4)
    kw = dict(epochs=1, batch_size=4, progress=False, device="cpu", val_fraction=0.5)
    every = train(coarse, fine, small_config(), **kw)
    some = train(coarse, fine, small_config(), val_steps=3, **kw)
    # the same training, validated on 3 of the 10 held-out years
    assert some.history[0]["loss"] == every.history[0]["loss"]
    assert some.history[0]["rmse_tas"] != every.history[0]["rmse_tas"]
    with pytest.raises(ValueError, match="val_steps must be a positive"):
        train(coarse, fine, small_config(), val_steps=0, **kw)
