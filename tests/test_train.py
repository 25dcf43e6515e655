"""Training: schedule, pairing, determinism, exact resume, DDP on a LocalCluster."""

import itertools

import numpy as np
import pytest
import torch
import xarray as xr

import xorbit
from tests.datasets import powerlaw_field
from xorbit import coarsen
from xorbit.grid import KM_PER_DEGREE
from xorbit.training import load_state, train
from xorbit.training.loop import lr_factor
from xorbit.training.samples import PairedCrops, compute_stats, pair_arrays, split_time


def fine_field(nt=16, n=32, seed=0):
    data = 280 + 10 * powerlaw_field((nt, n, n), seed=seed)
    return xr.DataArray(
        data,
        dims=("time", "lat", "lon"),
        coords={
            "time": np.arange(nt),
            "lat": ("lat", 10.0 + 0.5 * np.arange(n), {"units": "degrees_north"}),
            "lon": ("lon", 200.0 + 0.5 * np.arange(n), {"units": "degrees_east"}),
        },
        name="tas",
        attrs={"units": "K", "standard_name": "air_temperature"},
    )


def small_config(**kw):
    params = dict(
        in_vars=["tas"],
        out_vars=["tas"],
        factor=4,
        img_size=(8, 8),
        embed_dim=16,
        depth=1,
        decoder_depth=1,
        num_heads=2,
        drop_path=0.0,
        drop_rate=0.0,
    )
    params.update(kw)
    return xorbit.ReslimConfig(**params)


def weights(dsr):
    return {k: v.clone() for k, v in dsr.model.state_dict().items()}


def max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, 10, 110, 1e-3, 1e-7, 1e-8) * 1e-3 for s in range(111)]
    assert f[0] == pytest.approx(1e-7)
    assert f[5] == pytest.approx(1e-7 + (1e-3 - 1e-7) / 2)
    assert f[10] == pytest.approx(1e-3)
    assert f[60] == pytest.approx(1e-8 + (1e-3 - 1e-8) / 2)
    assert f[110] == pytest.approx(1e-8)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))


def test_stats_are_lazy_and_correct():
    fine = fine_field().chunk(time=4)
    mean, std = compute_stats({"tas": fine})
    assert mean["tas"] == pytest.approx(float(fine.values.mean()), rel=1e-6)
    assert std["tas"] == pytest.approx(float(fine.values.std()), rel=1e-5)
    const = fine * 0 + 3
    assert compute_stats({"c": const})[1]["c"] == 1.0
    with pytest.raises(ValueError, match="'nan' has no finite value"):
        compute_stats({"nan": fine * np.nan})


def test_split_is_along_time_with_the_end_held_out():
    tr, va = split_time(10, 0.2)
    assert list(tr) == list(range(8)) and list(va) == [8, 9]
    with pytest.raises(ValueError, match="nothing left to train on"):
        split_time(2, 0.9)


def test_crops_are_colocated_and_deterministic():
    fine = fine_field(nt=2, n=32)
    coarse = coarsen(fine, 4)
    data = pair_arrays(coarse, fine, ["tas"], ["tas"], 4, {"tas": 0.0}, {"tas": 1.0})
    crops = PairedCrops(data, (3, 5), 4, crops_per_time=3, seed=1)
    assert len(crops) == 6
    x, y, lat = crops[4]
    assert x.shape == (1, 3, 5) and y.shape == (1, 12, 20) and lat.shape == (12,)
    # co-located: the cell means of the fine crop are the coarse crop
    np.testing.assert_allclose(
        y.reshape(1, 3, 4, 5, 4).mean(axis=(2, 4)).numpy(), x.numpy(), rtol=1e-5
    )
    assert torch.equal(crops[4][0], x)
    crops.set_epoch(1)
    assert not torch.equal(crops[4][0], x)  # a new epoch draws other offsets


def test_pairing_errors_are_named():
    fine = fine_field(nt=2)
    coarse = coarsen(fine, 4)
    with pytest.raises(ValueError, match="fine grid is 31 x 32 but the coarse grid"):
        pair_arrays(coarse, fine.isel(lat=slice(1, None)), ["tas"], ["tas"], 4, {}, {})
    shifted = fine.assign_coords(lon=fine.lon + 0.25)
    with pytest.raises(ValueError, match="fine coordinate 'lon' is not the coarse 'lon' split"):
        pair_arrays(coarse, shifted, ["tas"], ["tas"], 4, {"tas": 0}, {"tas": 1})
    with pytest.raises(KeyError, match="input variable 'pr' is not in the coarse data"):
        pair_arrays(coarse, fine, ["tas", "pr"], ["tas"], 4, {"tas": 0}, {"tas": 1})


def test_training_is_deterministic_and_learns():
    fine = fine_field()
    coarse = coarsen(fine, 4)
    # the network alone: with the linear path (below) 3 epochs on noise have little to add
    kw = dict(epochs=3, batch_size=4, progress=False, seed=3, device="cpu", val_fraction=0.25)
    kw["linear_path"] = False
    a = train(coarse, fine, small_config(), **kw)
    b = train(coarse, fine, small_config(), **kw)
    assert max_diff(weights(a), weights(b)) == 0.0
    assert [h["epoch"] for h in a.history] == [1, 2, 3]
    assert a.history[-1]["loss"] < a.history[0]["loss"]
    assert set(a.history[-1]) >= {"rmse_tas", "rmse_bicubic_tas", "lr", "loss"}
    # anomalies from the per-pixel climatology of all 16 steps, stats from the 12 training ones
    anomaly = coarse - coarse.mean("time")
    assert a.mean["tas"] == 0.0
    assert a.std["tas"] == pytest.approx(float(anomaly.isel(time=slice(0, 12)).std()), rel=1e-4)
    assert a.units == {"tas": "K"} and a.attrs["tas"]["standard_name"] == "air_temperature"


def test_resume_after_a_kill_ends_with_the_same_weights(tmp_path):
    fine = fine_field()
    coarse = coarsen(fine, 4)
    kw = dict(epochs=3, batch_size=4, progress=False, seed=5, device="cpu", val_fraction=0.25)
    full = train(coarse, fine, small_config(), **kw)
    ckpt = tmp_path / "run"
    train(coarse, fine, small_config(), checkpoint_dir=ckpt, stop_after=1, **kw)
    assert load_state(ckpt)["epoch"] == 1
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.xorbit", "state.pt"]
    resumed = train(coarse, fine, small_config(), checkpoint_dir=ckpt, resume=True, **kw)
    assert max_diff(weights(full), weights(resumed)) == 0.0
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    # the model file written each epoch is the final model
    saved = xorbit.load(ckpt / "model.xorbit")
    assert max_diff(weights(saved), weights(full)) == 0.0
    with pytest.raises(
        ValueError, match=r"another model architecture \(differs in \['embed_dim'\]"
    ):
        train(coarse, fine, small_config(embed_dim=32), checkpoint_dir=ckpt, resume=True, **kw)
    # a changed learning rate is a training option: resuming with it is allowed
    ckpt2 = tmp_path / "run2"
    train(coarse, fine, small_config(), checkpoint_dir=ckpt2, stop_after=1, **kw)
    lower = train(coarse, fine, small_config(), checkpoint_dir=ckpt2, resume=True, lr=1e-4, **kw)
    assert lower.history[1]["lr"] < full.history[1]["lr"]
    assert max_diff(weights(lower), weights(full)) > 0
    with pytest.raises(FileNotFoundError, match="no training state"):
        train(coarse, fine, small_config(), resume=tmp_path / "none", **kw)


@pytest.mark.distributed
def test_two_rank_ddp_matches_one_process(client):
    fine = fine_field()
    coarse = coarsen(fine, 4)
    kw = dict(epochs=2, batch_size=4, progress=False, seed=7, device="cpu", val_fraction=0.25)
    init = weights(xorbit.Downscaler.from_config(small_config(), seed=7))
    single = train(coarse, fine, small_config(), **kw)
    ddp = train(coarse, fine, small_config(), client=client, **kw)
    moved = max_diff(init, weights(single))  # init has no linear path: its keys
    assert moved > 1e-3  # training moved the weights 100x beyond the tolerance below
    assert max_diff(weights(single), weights(ddp)) < 1e-5
    # validation split over the ranks and summed scores as one process does
    for one, two in zip(single.history, ddp.history, strict=True):
        # the loss is the mean over both ranks' shards (it was rank 0's shard alone)
        for key in ("loss", "rmse_tas", "rmse_bicubic_tas"):
            assert two[key] == pytest.approx(one[key], rel=1e-5), (one["epoch"], key)
        assert two["best_epoch"] == one["best_epoch"]


def ddp_pieces(nt=20, n_val=5, **config):
    """A Downscaler, training crops and ``n_val`` validation steps."""
    fine = fine_field(nt=nt)
    data = pair_arrays(coarsen(fine, 4), fine, ["tas"], ["tas"], 4, {"tas": 280.0}, {"tas": 10.0})
    dsr = xorbit.Downscaler.from_config(
        small_config(**config), seed=1, mean={"tas": 280.0}, std={"tas": 10.0}
    )
    crops = PairedCrops(data.select(np.arange(nt - n_val)), (8, 8), 4, crops_per_time=2)
    val = data.select(np.arange(nt - n_val, nt))
    return dsr, crops, val


@pytest.mark.distributed
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_ddp_resume_after_a_kill_matches_an_uninterrupted_run(client, tmp_path, dropout):
    fine = fine_field()
    coarse = coarsen(fine, 4)
    cfg = small_config(depth=2, drop_rate=dropout, drop_path=dropout)
    kw = dict(epochs=3, batch_size=4, progress=False, seed=11, device="cpu", val_fraction=0.25)
    full = train(coarse, fine, cfg, client=client, **kw)
    ckpt = tmp_path / "ddp"
    train(coarse, fine, cfg, client=client, checkpoint_dir=ckpt, stop_after=1, **kw)
    state = load_state(ckpt)
    assert state["epoch"] == 1 and [h["epoch"] for h in state["history"]] == [1]
    # one RNG state per rank, each rank its own stream
    assert len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["cpu"], state["rng"][1]["cpu"])
    resumed = train(coarse, fine, cfg, client=client, checkpoint_dir=ckpt, resume=True, **kw)
    assert max_diff(weights(full), weights(resumed)) == 0.0
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history == full.history  # losses and validation scores
    if dropout:
        # a state from before per-rank RNG (rank 0's CPU state only) still
        # resumes; rank 1 reseeds, so dropout draws differ: the RNG matters here
        old = {**state, "rng": state["rng"][0]["cpu"]}
        torch.save(old, ckpt / "state.pt")
        again = train(coarse, fine, cfg, client=client, checkpoint_dir=ckpt, resume=True, **kw)
        assert [h["epoch"] for h in again.history] == [1, 2, 3]
        assert max_diff(weights(full), weights(again)) > 1e-4


@pytest.mark.distributed
def test_every_rank_validates_its_share_and_gets_the_same_scores(client):
    from xorbit.training import validate
    from xorbit.training.distributed import fit_distributed
    from xorbit.training.loop import TrainOptions

    dsr, crops, val = ddp_pieces()
    opts = TrainOptions(epochs=2, batch_size=4, progress=False, device="cpu", keep_best=False)
    results = []
    _, state = fit_distributed(client, dsr, crops, val, opts, rank_results=results)
    assert [r["rank"] for r in results] == [0, 1]
    histories = [r["history"] for r in results]
    keys = ("rmse_tas", "rmse_bicubic_tas")
    # the sums are all-reduced: both ranks hold the very same scores
    assert [[h[k] for k in keys] for h in histories[0]] == [
        [h[k] for k in keys] for h in histories[1]
    ]
    # and they are those of the returned weights validated in one process
    dsr.model.load_state_dict(state)
    again = validate(dsr, val)
    for k in keys:
        assert histories[0][-1][k] == pytest.approx(again[k], rel=1e-5)


@pytest.mark.distributed
def test_each_rank_limits_torch_threads_to_its_workers_share(client):
    from xorbit._threads import available_cores
    from xorbit.training.distributed import fit_distributed
    from xorbit.training.loop import TrainOptions

    dsr, crops, _ = ddp_pieces(nt=8, n_val=0)
    opts = TrainOptions(epochs=1, batch_size=4, progress=False, device="cpu")
    cores = max(client.run(available_cores).values())
    before = client.run(torch.get_num_threads)
    # as on a cluster whose workers let torch take every core of the host
    client.run(torch.set_num_threads, cores)
    try:
        results = []
        fit_distributed(client, dsr, crops, None, opts, rank_results=results)
        # two one-thread workers on one host: half its cores each
        assert [r["threads"] for r in results] == [max(1, cores // 2)] * 2
        # the worker's own setting is back once the rank is done
        assert set(client.run(torch.get_num_threads).values()) == {cores}
        # an explicit count replaces the share
        fit_distributed(client, dsr, crops, None, opts.replace(threads=1), rank_results=results)
        assert [r["threads"] for r in results] == [1, 1]
        # a worker the nanny started at one thread (OMP_NUM_THREADS=1) does not
        # hold its rank to one: the count is set, not capped (it was capped)
        client.run(torch.set_num_threads, 1)
        fit_distributed(client, dsr, crops, None, opts.replace(threads=2), rank_results=results)
        assert [r["threads"] for r in results] == [2, 2]
    finally:
        for worker, n in before.items():
            client.run(torch.set_num_threads, n, workers=[worker])


@pytest.mark.distributed
def test_the_rendezvous_host_is_rank_zeros_worker_host(client):
    from xorbit.training.distributed import _worker_host

    first = sorted(client.scheduler_info(n_workers=-1)["workers"])[0]
    assert client.submit(_worker_host, workers=[first], pure=False).result() == "127.0.0.1"


class FailingOnRankOne(PairedCrops):
    def __getitem__(self, i):
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() == 1:
            raise RuntimeError("rank 1 cannot read its data")
        return super().__getitem__(i)


@pytest.mark.distributed
def test_a_failing_rank_fails_the_call(client):
    from xorbit.training.distributed import fit_distributed
    from xorbit.training.loop import TrainOptions

    fine = fine_field(nt=8)
    coarse = coarsen(fine, 4)
    data = pair_arrays(coarse, fine, ["tas"], ["tas"], 4, {"tas": 280.0}, {"tas": 10.0})
    dsr = xorbit.Downscaler.from_config(small_config(), mean={"tas": 280.0}, std={"tas": 10.0})
    crops = FailingOnRankOne(data, (8, 8), 4)
    opts = TrainOptions(epochs=1, batch_size=4, progress=False, device="cpu")
    with pytest.raises(RuntimeError, match="rank 1 cannot read its data"):
        fit_distributed(client, dsr, crops, None, opts, timeout_s=30)


def test_a_static_input_missing_from_a_dataarray_is_named():
    fine = fine_field(nt=4)
    cfg = small_config(in_vars=["tas", "orog"], static_vars=["orog"])
    with pytest.raises(KeyError, match="input variable 'orog' is not in the coarse data"):
        train(coarsen(fine, 4), fine, cfg, epochs=1, batch_size=2, progress=False)


def test_the_best_validation_epoch_is_kept():
    from xorbit.training import validate

    fine = fine_field()
    coarse = coarsen(fine, 4)
    kw = dict(epochs=4, batch_size=4, progress=False, seed=2, device="cpu", val_fraction=0.25)
    dsr = train(coarse, fine, small_config(), lr=2e-2, **kw)
    scores = [h["rmse_tas"] / h["rmse_bicubic_tas"] for h in dsr.history]
    best = int(np.argmin(scores)) + 1
    assert dsr.history[-1]["best_epoch"] == best
    # the returned model validates exactly as that epoch did
    data = pair_arrays(
        coarse,
        fine,
        ["tas"],
        ["tas"],
        4,
        dsr.mean,
        dsr.std,
        input_climatology=dsr.input_climatology,
        output_climatology=dsr.output_climatology,
    )
    again = validate(dsr, data.select(np.arange(12, 16)))
    assert again["rmse_tas"] == pytest.approx(dsr.history[best - 1]["rmse_tas"], rel=1e-6)
    last = train(coarse, fine, small_config(), lr=2e-2, keep_best=False, **kw)
    again = validate(last, data.select(np.arange(12, 16)))
    assert again["rmse_tas"] == pytest.approx(last.history[-1]["rmse_tas"], rel=1e-6)


def test_validation_sums_over_time_shards_add_up_to_the_whole():
    from xorbit.training import validate
    from xorbit.training.loop import rmse_scores, validation_sums

    dsr, _, val = ddp_pieces(n_val=5)
    val.fine[1, 0, :3] = np.nan  # missing targets count nowhere
    whole = validation_sums(dsr, val)
    assert whole.shape == (1, 3)
    assert whole[0, 2] == np.isfinite(val.fine).sum() == 5 * 32 * 32 - 3 * 32
    shards = [validation_sums(dsr, val.select(slice(r, None, 3))) for r in range(3)]
    np.testing.assert_allclose(sum(shards), whole, rtol=1e-6)  # float32 predictions
    # validate is the RMSE of those sums, in physical units
    scores = validate(dsr, val)
    assert scores == rmse_scores(dsr, whole)
    assert scores["rmse_tas"] == pytest.approx(10 * np.sqrt(whole[0, 0] / whole[0, 2]))
    assert scores["rmse_bicubic_tas"] == pytest.approx(10 * np.sqrt(whole[0, 1] / whole[0, 2]))
    # a rank whose shard is empty adds nothing
    assert not validation_sums(dsr, val.select(slice(5, None))).any()


def test_validation_scores_what_downscale_and_interpolate_give():
    """Validation runs the model as .orbit.downscale does, also on a periodic global grid,
    and its bicubic reference is .orbit.interpolate's."""
    from xorbit.downscaler import training_grid
    from xorbit.training import validate

    n = 16
    fine = fine_field(nt=3, n=4 * n).isel(lat=slice(0, 2 * n))  # 32 x 64 fine
    cells = 5.625 * (np.arange(4 * n) + 0.5)  # a global grid: 64 cells of 5.625 degrees
    fine = fine.assign_coords(lat=cells[: 2 * n] - 90, lon=cells)
    coarse = coarsen(fine, 4)
    dsr = xorbit.Downscaler.from_config(
        small_config(), seed=3, mean={"tas": 280.0}, std={"tas": 10.0}, units={"tas": "K"}
    )
    dsr.grid = training_grid(coarse.lat, coarse.lon)
    data = pair_arrays(coarse, fine, ["tas"], ["tas"], 4, dsr.mean, dsr.std)
    assert data.periodic
    scores = validate(dsr, data, tile=(4, 4), halo=(2, 2))
    pred = coarse.orbit.downscale(dsr, tile=4, halo=2, device="cpu")
    bicubic = coarse.orbit.interpolate(4, "bicubic")
    truth = fine.assign_coords(lat=pred.lat, lon=pred.lon)
    want = float(np.sqrt(((pred - truth) ** 2).mean()))
    want_bicubic = float(np.sqrt(((bicubic - truth) ** 2).mean()))
    assert scores["rmse_tas"] == pytest.approx(want, rel=1e-5)
    assert scores["rmse_bicubic_tas"] == pytest.approx(want_bicubic, rel=1e-5)
    # and the tiling is periodic: without the wrap, the edge columns differ
    flat = coarse.orbit.downscale(dsr, tile=4, halo=2, device="cpu", periodic=False)
    assert float(np.sqrt(((flat - truth) ** 2).mean())) != pytest.approx(want, rel=1e-5)


def test_train_records_the_training_grid():
    fine = fine_field(nt=8).isel(lat=slice(None, None, -1))  # north to south, like ERA5
    dsr = train(coarsen(fine, 4), fine, small_config(), epochs=1, batch_size=4, progress=False)
    assert dsr.grid == {
        "multi_resolution": False,
        "y_ascending": False,
        "dy": 2.0,
        "x_ascending": True,
        "dx": 2.0,
        "res_km": pytest.approx(2.0 * KM_PER_DEGREE),  # the resolution embedding's input
        "window": [8, 8],  # the 8 x 8 coarse grid is one training crop
        "cell_average": {"tas": True},  # coarse made by coarsen: constraints are right
    }


@pytest.mark.distributed
def test_ddp_ranks_read_their_samples_from_a_store(client, tmp_path):
    fine = fine_field().astype(np.float32)
    coarse = coarsen(fine, 4)
    fine.to_dataset().chunk(time=1).to_zarr(tmp_path / "fine.zarr")
    coarse.to_dataset().chunk(time=1).to_zarr(tmp_path / "coarse.zarr")
    kw = dict(epochs=2, batch_size=4, progress=False, seed=7, device="cpu", val_fraction=0.25)
    kw["linear_path"] = False  # the data path alone (see test_samples)
    single = train(coarse, fine, small_config(), in_memory=True, **kw)
    ddp = train(
        xr.open_zarr(tmp_path / "coarse.zarr")["tas"],
        xr.open_zarr(tmp_path / "fine.zarr")["tas"],
        small_config(),
        client=client,
        in_memory=False,
        **kw,
    )
    assert max_diff(weights(single), weights(ddp)) < 1e-5
    for one, two in zip(single.history, ddp.history, strict=True):
        assert two["rmse_tas"] == pytest.approx(one["rmse_tas"], rel=1e-5)
