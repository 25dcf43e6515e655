"""MC-dropout ensembles: `xorbit.model.mc`, ``downscale_array(samples=)``, the accessor, calibration."""

import threading
import time
import warnings

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

import xorbit
import xorbit.engine as engine
from tests.datasets import powerlaw_field, tiny_config
from tests.test_accessor import coarse_field
from xorbit.engine import ModelHandle, downscale_array, run_model
from xorbit.metrics import crps, mae, scale_spread, spread_scale, spread_skill
from xorbit.model.mc import mc_dropout
from xorbit.model.reslim import DropPath

K = 4
TILES = dict(tile=4, halo=2)  # 12 x 16 coarse: 3 x 4 tiles, several per block


def dropout_downscaler(nonnegative=(), mean=280.0, **overrides):
    """A model with dropout whose output depends on its transformer.

    With the bicubic skip the last layers start at zero (the model is the
    interpolation, and dropout could change nothing): randomise them, as
    training would move them away from zero.
    """
    params = dict(
        in_vars=["tas"],
        out_vars=["tas"],
        static_vars=[],
        img_size=(8, 8),
        drop_rate=0.1,
        drop_path=0.1,
        interp_skip="bicubic",
    )
    cfg = tiny_config(**(params | overrides))
    dsr = xorbit.Downscaler.from_config(
        cfg,
        seed=1,
        mean={"tas": mean},
        std={"tas": 10.0},
        units={"tas": "K"},
        nonnegative=list(nonnegative),
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for last in (dsr.model.conv_out, dsr.model.path2[-1]):
            last.weight.copy_(torch.randn(last.weight.shape, generator=gen))
    return dsr


@pytest.fixture(scope="module")
def dsr():
    return dropout_downscaler()


def coarse(shape=(3, 1, 12, 16), seed=0):
    return (280 + 10 * powerlaw_field(shape, seed=seed)).astype(np.float32)


def rms(a) -> float:
    return float(np.sqrt(np.nanmean(np.square(a))))


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------ the masks


def test_masks_drop_at_the_rate_and_rescale():
    """Dropout(p) in eval mode, sampled: a fraction p zeroed, the rest divided by 1 - p."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.25)).eval()
    x = torch.randn(3, 2000, 4)
    plain = model(x)
    with torch.no_grad(), mc_dropout(model, [1, 2, 3]):
        out = model(x)
    zero = out == 0
    assert abs(float(zero.float().mean()) - 0.25) < 0.01
    torch.testing.assert_close(out[~zero], plain[~zero] / 0.75)
    # DropPath drops a sample's whole branch or none of it
    path = nn.Sequential(DropPath(0.5)).eval()
    with torch.no_grad(), mc_dropout(path, range(64)):
        kept = path(torch.ones(64, 5, 3))
    per_sample = kept.reshape(64, -1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()
    assert 16 < int((per_sample == 0).all(1).sum()) < 48
    assert no_hooks(model) and no_hooks(path)


def test_a_samples_masks_do_not_depend_on_its_batch_mates():
    model = nn.Sequential(nn.Dropout(0.3), nn.Linear(8, 8), nn.Dropout(0.3)).eval()
    x = torch.randn(3, 10, 8)
    with torch.no_grad():
        with mc_dropout(model, [7, 8, 9]):
            batch = model(x)
        with mc_dropout(model, [8]):
            alone = model(x[1:2])
        with mc_dropout(model, [5, 8]):
            other = model(torch.stack([torch.randn(10, 8), x[1]]))
    torch.testing.assert_close(batch[1:2], alone)
    torch.testing.assert_close(other[1:2], alone)
    assert not torch.equal(batch[0] == 0, batch[2] == 0)


def test_hooks_are_removed_on_error_and_a_training_model_is_refused(dsr):
    model = dsr.model
    x = np.zeros((2, 1, 8, 8), np.float32)
    with pytest.raises(RuntimeError, match="batch of 2 samples but 3 seeds"):
        with torch.no_grad(), mc_dropout(model, [1, 2, 3]):
            model(torch.from_numpy(x))
    assert no_hooks(model)
    with pytest.raises(ValueError, match="2 seeds for 1 samples"):
        run_model(model, x[:1], ["tas"], seeds=[1, 2])
    assert no_hooks(model)
    with pytest.raises(ValueError, match="eval mode"):
        with mc_dropout(nn.Dropout(0.5).train(), [1]):
            pass
    with pytest.raises(ValueError, match="no dropout layer"):
        with mc_dropout(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0)).eval(), [1]):
            pass


def test_another_thread_runs_the_shared_model_deterministically(dsr):
    """The hooks act only in the sampling thread: tasks of a threaded scheduler
    share one model."""
    model = dsr.model
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 1, 8, 8), np.float32))
    with torch.no_grad():
        plain = model(x, ["tas"])
    inside, release = threading.Event(), threading.Event()
    sampled = {}

    def sample():
        with torch.no_grad(), mc_dropout(model, [1, 2]):
            inside.set()
            release.wait(10)
            sampled["out"] = model(x, ["tas"])

    thread = threading.Thread(target=sample)
    thread.start()
    inside.wait(10)
    with torch.no_grad():
        during = model(x, ["tas"])
    release.set()
    thread.join()
    torch.testing.assert_close(during, plain, rtol=0, atol=0)
    assert float((sampled["out"] - plain).abs().max()) > 1e-3
    assert no_hooks(model)


def test_a_thread_starting_to_sample_as_another_stops_drops_once(dsr, monkeypatch):
    """Regression: the last sampler removed its hooks after leaving the lock, so a
    thread that began sampling in between registered a second set and dropped
    every unit twice (seen as members that changed with the chunking)."""
    from torch.utils.hooks import RemovableHandle

    model = dsr.model
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 1, 8, 8), np.float32))
    with torch.no_grad(), mc_dropout(model, [3, 4]):
        want = model(x, ["tas"])
    removing, got = threading.Event(), {}
    original = RemovableHandle.remove

    def slow_remove(handle):
        if not removing.is_set():
            removing.set()  # the second thread starts sampling now ...
            time.sleep(0.3)  # ... while the first is still taking its hooks off
        original(handle)

    monkeypatch.setattr(RemovableHandle, "remove", slow_remove)

    def second():
        removing.wait(10)
        with torch.no_grad(), mc_dropout(model, [3, 4]):
            got["out"] = model(x, ["tas"])

    thread = threading.Thread(target=second)
    thread.start()
    with torch.no_grad(), mc_dropout(model, [9, 9]):
        model(x, ["tas"])
    thread.join()
    torch.testing.assert_close(got["out"], want, rtol=0, atol=0)
    assert no_hooks(model)


# ------------------------------------------------------------------ arrays


def test_members_differ_and_are_seeded(dsr):
    x = coarse()
    a = downscale_array(x, dsr, **TILES, samples=4, seed=0)
    assert isinstance(a, np.ndarray) and a.shape == (4, 3, 1, 12 * K, 16 * K)
    for i in range(4):
        for j in range(i):
            assert np.abs(a[i] - a[j]).max() > 1e-2
    np.testing.assert_array_equal(downscale_array(x, dsr, **TILES, samples=4, seed=0), a)
    b = downscale_array(x, dsr, **TILES, samples=4, seed=1)
    assert min(np.abs(a[i] - b[i]).max() for i in range(4)) > 1e-2
    # the first members of a larger ensemble are the smaller ensemble
    np.testing.assert_array_equal(downscale_array(x, dsr, **TILES, samples=2, seed=0), a[:2])


def test_members_do_not_depend_on_chunks_batches_or_laziness(dsr):
    x = coarse()
    x[1, 0, 5, 6] = np.nan
    eager = downscale_array(x, dsr, **TILES, samples=3, seed=5)
    for chunks, batch in (((1, 1, 5, 7), 16), ((2, 1, 12, 4), 3), ((3, 1, 12, 16), 1)):
        lazy = downscale_array(
            da.from_array(x, chunks=chunks), dsr, **TILES, samples=3, seed=5, batch_size=batch
        )
        assert isinstance(lazy, da.Array) and lazy.chunks[0] == (1, 1, 1)
        np.testing.assert_allclose(lazy.compute(), eager, rtol=0, atol=1e-4)
    # NaN below the missing coarse cell in every member, nowhere else
    nan = np.isnan(eager)
    assert nan[:, 1, 0, 20:24, 24:28].all() and nan.sum() == 3 * K * K
    # the same numbers on a periodic axis, where windows wrap around
    p1 = downscale_array(x, dsr, **TILES, periodic=True, samples=2, seed=5)
    p2 = downscale_array(
        da.from_array(x, chunks=(1, 1, 12, 4)), dsr, **TILES, periodic=True, samples=2, seed=5
    )
    np.testing.assert_allclose(p2.compute(), p1, rtol=0, atol=1e-4)


def test_members_share_the_cores_with_each_other(dsr, monkeypatch):
    """Members are tasks that run at once: one whole-field block per member must not
    each take every core."""
    seen = []
    real = engine.thread_share
    monkeypatch.setattr(engine, "thread_share", lambda **kw: seen.append(kw) or real(**kw))
    x = da.from_array(coarse(), chunks=(3, 1, 12, 16))
    downscale_array(x, dsr, **TILES, samples=3).compute()
    downscale_array(x, dsr, **TILES).compute()
    assert sorted({kw["tasks"] for kw in seen}) == [1, 3]


def test_the_ensemble_mean_is_near_the_deterministic_output(dsr):
    x = coarse((2, 1, 12, 16), seed=3)
    det = downscale_array(x, dsr, **TILES)
    members = downscale_array(x, dsr, **TILES, samples=48, seed=0)
    single = np.mean([rms(m - det) for m in members])
    mean = rms(members.mean(0) - det)
    assert single > 0.01  # dropout matters in this model (K)
    # unbiased dropout (kept units divided by 1 - p): the members scatter around the
    # deterministic output; independent noise alone would give single / 7
    assert mean < 0.4 * single, (mean, single)


def test_sampling_leaves_the_deterministic_output_unchanged(dsr):
    x = coarse()
    before = downscale_array(x, dsr, **TILES)
    lazy = downscale_array(da.from_array(x, chunks=(1, 1, 6, 8)), dsr, **TILES, samples=2)
    lazy.compute()
    downscale_array(x, dsr, **TILES, samples=2)
    np.testing.assert_array_equal(downscale_array(x, dsr, **TILES), before)
    assert no_hooks(dsr.model) and not dsr.model.training
    cached = ModelHandle(dsr.model).get("cpu")
    assert no_hooks(cached) and not cached.training


def test_a_model_without_dropout_is_refused():
    cfg = tiny_config(in_vars=["tas"], out_vars=["tas"], static_vars=[])
    plain = xorbit.Downscaler.from_config(cfg, mean={"tas": 280.0}, std={"tas": 10.0})
    with pytest.raises(ValueError, match=r"drop_rate=0\.0 and drop_path=0\.0"):
        downscale_array(coarse(), plain, **TILES, samples=4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="samples must be"):
            downscale_array(coarse(), dropout_downscaler(), **TILES, samples=bad)
    with pytest.raises(ValueError, match="seed must be"):
        downscale_array(coarse(), dropout_downscaler(), **TILES, samples=2, seed=-1)


# ------------------------------------------------------------------ xarray


@pytest.fixture(scope="module")
def field():
    return coarse_field(coarse()[:, 0])


def test_accessor_gives_a_lazy_sample_dimension(field, dsr):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", xorbit.accessor.GridWarning)
        out = field.chunk(time=1, lat=6).orbit.downscale(dsr, **TILES, samples=3, seed=2)
        eager = field.orbit.downscale(dsr, **TILES, samples=3, seed=2)
        ds = field.to_dataset().orbit.downscale(dsr, **TILES, samples=3, seed=2)
        det = field.orbit.downscale(dsr, **TILES)
    assert isinstance(out.data, da.Array)
    assert out.dims == ("sample", "time", "lat", "lon") and out.shape == (3, 3, 48, 64)
    np.testing.assert_array_equal(out.sample.values, [0, 1, 2])
    assert out.attrs["units"] == "K" and out.attrs["long_name"] == "Air temp"
    assert "3 MC-dropout samples" in out.attrs["history"] and "seed 2" in out.attrs["ensemble"]
    assert "MC-dropout" in ds.attrs["history"] and ds.tas.dims == out.dims
    np.testing.assert_allclose(out.values, eager.values, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(ds.tas.values, eager.values)
    np.testing.assert_array_equal(eager.lat.values, det.lat.values)
    x = field.values[:, None]
    np.testing.assert_array_equal(
        eager.values, downscale_array(x, dsr, **TILES, samples=3, seed=2)[:, :, 0]
    )
    assert "sample" not in det.dims


def test_nonnegative_members_are_clamped(field):
    dsr = dropout_downscaler(nonnegative=["tas"], mean=-5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", xorbit.accessor.GridWarning)
        low = (field * 0 - 5).assign_attrs(units="K")
        out = low.orbit.downscale(dsr, **TILES, samples=2).values
    assert out.min() == 0.0 and (out == 0).mean() > 0.2 and (out > 0).any()


def test_evaluate_scores_the_members(field, dsr):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", xorbit.accessor.GridWarning)
        members = field.orbit.downscale(dsr, **TILES, samples=4)
        det = field.orbit.downscale(dsr, **TILES)
    noise = np.random.default_rng(0).standard_normal(det.shape)
    truth = det + 0.05 * noise
    for pred, ref in ((members, truth), (members.to_dataset(), truth.to_dataset())):
        scores = xorbit.evaluate(pred, ref).sel(variable="tas").compute()
        assert 0 < float(scores.crps) < float(scores.mae)
        assert float(scores.spread_skill) == pytest.approx(
            float(spread_skill(members, truth)), rel=1e-6
        )
        assert scores.crps.attrs["units"] == "K"
    # lazy members (Dask) give the same scores
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", xorbit.accessor.GridWarning)
        lazy = field.chunk(time=1).orbit.downscale(dsr, **TILES, samples=4)
    assert float(crps(lazy, truth)) == pytest.approx(float(scores.crps), rel=1e-5)
    assert float(spread_skill(lazy, truth)) == pytest.approx(float(scores.spread_skill), rel=1e-5)
    # a one-member ensemble scores its absolute error
    one = crps(members.isel(sample=[0]), truth)
    assert float(one) == pytest.approx(float(mae(members.isel(sample=0), truth)), rel=1e-5)


# ------------------------------------------------------------------ calibration


def calibrating_factor(spread, n=16):
    """The exact ``alpha`` for `synthetic_ensemble`: scaled members whose ``(n+1)/n``
    times variance ``alpha² spread²`` equals the ensemble mean's squared error
    ``1 + spread² / n``."""
    return np.sqrt((1 + spread**2 / n) / ((n + 1) / n * spread**2))


def synthetic_ensemble(n=16, spread=0.5, seed=0):
    """Members and truth around the same centre; the truth scatters by 1, the members
    by ``spread``."""
    rng = np.random.default_rng(seed)
    dims = ("time", "lat", "lon")
    centre = rng.standard_normal((60, 10, 10))
    truth = xr.DataArray(centre + rng.standard_normal(centre.shape), dims=dims, name="tas")
    members = xr.DataArray(
        centre + spread * rng.standard_normal((n, *centre.shape)),
        dims=("sample", *dims),
        name="tas",
        attrs={"units": "K"},
    )
    return members, truth


def test_spread_scale_recovers_a_known_under_dispersion():
    members, truth = synthetic_ensemble(spread=0.5)
    assert float(spread_skill(members, truth)) == pytest.approx(0.51, abs=0.02)
    alpha = spread_scale(members, truth)
    assert float(alpha) == pytest.approx(calibrating_factor(0.5), rel=0.03)
    scaled = scale_spread(members, alpha)
    assert float(spread_skill(scaled, truth)) == pytest.approx(1.0, abs=1e-9)
    assert scaled.dims == members.dims and scaled.attrs == members.attrs
    xr.testing.assert_allclose(scaled.mean("sample"), members.mean("sample"))
    # fitted on one half, the factor calibrates the other
    a = spread_scale(members.isel(time=slice(0, 30)), truth.isel(time=slice(0, 30)))
    rest = scale_spread(members.isel(time=slice(30, None)), a)
    assert float(spread_skill(rest, truth.isel(time=slice(30, None)))) == pytest.approx(1, abs=0.05)
    # and lowers the CRPS there
    before = crps(members.isel(time=slice(30, None)), truth.isel(time=slice(30, None)))
    assert float(crps(rest, truth.isel(time=slice(30, None)))) < 0.95 * float(before)
    # an over-dispersed ensemble shrinks; per pixel with dims=
    wide, truth2 = synthetic_ensemble(spread=2.0, seed=1)
    assert float(spread_scale(wide, truth2)) == pytest.approx(calibrating_factor(2.0), rel=0.03)
    per_pixel = spread_scale(wide, truth2, dims=["time"])
    assert per_pixel.dims == ("lat", "lon")
    assert float(per_pixel.median()) == pytest.approx(calibrating_factor(2.0), rel=0.05)


def test_spread_scale_per_variable_of_a_dataset():
    tas, truth = synthetic_ensemble(spread=0.5)
    pr, truth_pr = synthetic_ensemble(spread=2.0, seed=2)
    members = xr.Dataset({"tas": tas, "pr": pr.rename("pr")})
    alpha = spread_scale(members, xr.Dataset({"tas": truth, "pr": truth_pr.rename("pr")}))
    assert float(alpha.tas) == pytest.approx(calibrating_factor(0.5), rel=0.03)
    assert float(alpha.pr) == pytest.approx(calibrating_factor(2.0), rel=0.03)
    scaled = scale_spread(members, alpha)
    assert float(spread_skill(scaled.pr, truth_pr)) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="needs dimension 'sample'"):
        scale_spread(truth, 2.0)
