"""`xorbit.engine`: downscale_array on numpy and Dask, one pass, devices, cache, precision, threads."""

import dask
import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr

import xorbit
import xorbit.engine as engine
from tests.datasets import powerlaw_field, tiny_config
from xorbit.engine import (
    SCATTERED_PREFIX,
    ClientClosedError,
    ModelHandle,
    clear_cache,
    downscale_array,
    run_model,
)
from xorbit.model.reslim import Reslim

K = 4


def three_outputs():
    """A model with three outputs and a static input, like the 9.5m preset's 23 → 3."""
    names = ["tas", "tasmin", "tasmax"]
    cfg = tiny_config(in_vars=[*names, "orog"], out_vars=names, static_vars=["orog"])
    stats = {v: 280.0 for v in names} | {"orog": 500.0}
    return xorbit.Downscaler.from_config(
        cfg, seed=2, mean=stats, std={v: 10.0 for v in stats}, units={v: "K" for v in names}
    )


def coarse(shape=(2, 4, 12, 16), seed=0):
    return (280 + 10 * powerlaw_field(shape, seed=seed)).astype(np.float32)


class ForwardSpy:
    """Counts model calls and the torch thread count seen inside them."""

    def __init__(self, monkeypatch):
        self.calls, self.threads = 0, []
        original = Reslim.forward

        def forward(model, *args, **kwargs):
            self.calls += 1
            self.threads.append(torch.get_num_threads())
            return original(model, *args, **kwargs)

        monkeypatch.setattr(Reslim, "forward", forward)


def test_numpy_and_dask_give_the_same_array():
    dsr = three_outputs()
    x = coarse()
    x[0, 1, 3, 4] = np.nan  # a missing tasmin value
    eager = downscale_array(x, dsr, tile=4, halo=2, device="cpu")
    assert isinstance(eager, np.ndarray) and eager.shape == (2, 3, 48, 64)
    lazy = downscale_array(da.from_array(x, chunks=(1, 4, 5, 7)), dsr, tile=4, halo=2)
    assert isinstance(lazy, da.Array) and lazy.shape == eager.shape
    np.testing.assert_allclose(lazy.compute(), eager, rtol=0, atol=1e-4)
    # NaN only below the missing coarse pixel of that variable
    nan = np.isnan(eager)
    assert nan.sum() == K * K and nan[0, 1, 12:16, 16:20].all()
    # periodic longitude: the wrap reaches across the edge, chunking does not matter
    p1 = downscale_array(x, dsr, tile=4, halo=2, periodic=True, device="cpu")
    p2 = downscale_array(da.from_array(x, chunks=(2, 4, 12, 4)), dsr, tile=4, halo=2, periodic=True)
    np.testing.assert_allclose(p2.compute(), p1, rtol=0, atol=1e-4)
    assert np.nanmax(abs(p1 - eager)[..., :4]) > 1e-3  # the edge did see the other side


def test_bad_shapes_and_options_are_named():
    dsr = three_outputs()
    with pytest.raises(ValueError, match=r"expected an array \(\.\.\., 4, ny, nx\) with channels"):
        downscale_array(np.zeros((3, 8, 8), np.float32), dsr)
    with pytest.raises(ValueError, match="precision must be one of"):
        downscale_array(coarse(), dsr, precision="fp8")


def test_eager_input_runs_the_model_once_for_all_outputs(monkeypatch):
    """Three outputs used to mean three passes over every tile (one per variable)."""
    dsr = three_outputs()
    x = coarse((1, 4, 12, 16))
    names = ["tas", "tasmin", "tasmax", "orog"]
    ds = xr.Dataset(
        {
            n: (("time", "lat", "lon"), x[:, i], {"units": "m" if n == "orog" else "K"})
            for i, n in enumerate(names)
        },
        coords={"lat": 20.0 + 5 * np.arange(12), "lon": 200.0 + 5 * np.arange(16)},
    )
    spy = ForwardSpy(monkeypatch)
    out = ds.orbit.downscale(dsr, tile=4, halo=2, batch_size=64, device="cpu")
    n_tiles = 3 * 4  # 12 x 16 coarse pixels in 4 x 4 cores, all in one batch
    assert spy.calls == 1, f"{spy.calls} forward calls for {n_tiles} tiles in one batch"
    assert set(out.data_vars) == {"tas", "tasmin", "tasmax"}
    assert all(isinstance(out[v].data, np.ndarray) for v in out.data_vars)
    ref = downscale_array(x, dsr, tile=4, halo=2, batch_size=64, device="cpu")
    np.testing.assert_allclose(out["tasmax"].values, ref[:, 2], rtol=0, atol=1e-5)


def test_device_is_chosen_where_the_task_runs(monkeypatch):
    dsr = three_outputs()
    calls = []
    monkeypatch.setattr(engine, "default_device", lambda: calls.append(1) or "cpu")
    lazy = downscale_array(da.from_array(coarse(), chunks=(1, 4, 12, 16)), dsr, tile=4, halo=2)
    assert calls == []  # nothing decided on the client while building the graph
    lazy.compute(scheduler="sync")
    assert len(calls) >= 1


def test_the_callers_model_keeps_its_mode_and_the_cache_clears():
    dsr = three_outputs()
    dsr.model.train()
    handle = ModelHandle(dsr.model)
    got = handle.get("cpu")
    assert dsr.model.training, "the caller's model was switched to eval mode"
    assert not got.training and got is not dsr.model
    assert handle.get("cpu") is got  # cached
    assert clear_cache() >= 1 and len(engine._CACHE) == 0
    dsr.model.eval()
    assert ModelHandle(dsr.model).get("cpu") is dsr.model  # eval already: no copy


def test_precision_can_be_chosen():
    dsr = three_outputs()
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    names = dsr.in_vars
    fp32 = run_model(dsr.model, x, names, precision="fp32")
    np.testing.assert_array_equal(run_model(dsr.model, x, names), fp32)  # auto on CPU
    bf16 = run_model(dsr.model, x, names, precision="bf16")
    assert 1e-4 < np.abs(bf16 - fp32).max() < 0.5  # rounded, still the same model
    with pytest.raises(ValueError, match="precision must be one of"):
        run_model(dsr.model, x, names, precision="half")


def test_torch_threads_are_the_tasks_share(monkeypatch):
    """Dask threads x torch threads must not exceed the cores."""
    dsr = three_outputs()
    monkeypatch.setattr(engine, "thread_share", lambda **kw: 1)
    before = torch.get_num_threads()
    spy = ForwardSpy(monkeypatch)
    lazy = downscale_array(da.from_array(coarse(), chunks=(1, 4, 12, 8)), dsr, tile=4, halo=2)
    with dask.config.set(scheduler="threads", num_workers=2):
        lazy.compute()
    assert spy.calls >= 4 and set(spy.threads) == {1}
    assert torch.get_num_threads() == before  # restored when the last task ended


def test_fewer_blocks_than_dask_threads_leave_their_cores_to_the_model(monkeypatch):
    """One whole-field block under the threaded scheduler ran torch on one core
    of two (1.5x slower than eager input, bench_speed_ratio)."""
    from xorbit import _threads

    monkeypatch.setattr(_threads, "available_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert _threads.thread_share(2) == 2
    assert _threads.thread_share(2, tasks=1) == 4
    assert _threads.thread_share(2, tasks=7) == 2
    seen = []
    real = engine.thread_share
    monkeypatch.setattr(engine, "thread_share", lambda **kw: seen.append(kw) or real(**kw))
    dsr = three_outputs()
    downscale_array(da.from_array(coarse(), chunks=(2, 4, 12, 16)), dsr, tile=4, halo=2).compute()
    downscale_array(da.from_array(coarse(), chunks=(1, 4, 12, 8)), dsr, tile=4, halo=2).compute()
    assert {kw["tasks"] for kw in seen} == {1, 4}


def test_the_callers_model_is_used_whatever_the_device_is_called():
    """Validation named its device "cuda" while the model sat on "cuda:0": the
    handle cached a copy at the first epoch and validated that stale copy ever
    after.  Shown with "cpu:0" against "cpu"."""
    dsr = three_outputs()
    dsr.model.eval()
    handle = ModelHandle(dsr.model, "fixed-key")
    assert handle.get("cpu:0") is dsr.model
    assert handle.get("cpu") is dsr.model


@pytest.mark.distributed
def test_a_graph_under_a_client_is_named_as_without_one():
    """The stage-1 name took the scattered future's random key: each client gave
    other names, and zarr resume saw another graph."""
    distributed = pytest.importorskip("distributed")
    dsr = three_outputs()
    x = da.from_array(coarse(), chunks=(1, 4, 12, 16))
    names = []
    for _ in range(2):
        with (
            distributed.LocalCluster(
                n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
            ) as cluster,
            distributed.Client(cluster),
        ):
            names.append(downscale_array(x, dsr, tile=4, halo=2).name)
        clear_cache()
    names.append(downscale_array(x, dsr, tile=4, halo=2).name)
    assert len(set(names)) == 1


def test_two_downscales_in_one_graph_do_not_collide():
    """Stage-1 keys were a fixed name: two calls computed together shared blocks."""
    dsr = three_outputs()
    a = da.from_array(coarse(seed=1), chunks=(1, 4, 12, 16))
    b = da.from_array(coarse(seed=2), chunks=(1, 4, 12, 16))
    ya, yb = (downscale_array(v, dsr, tile=4, halo=2, device="cpu") for v in (a, b))
    both = dask.compute(ya, yb, scheduler="sync")
    alone = yb.compute(scheduler="sync")
    np.testing.assert_allclose(both[1], alone, rtol=0, atol=1e-6)
    assert np.abs(both[0] - both[1]).max() > 0.1


def test_the_same_call_builds_the_same_graph():
    """Resumable zarr writes compare Dask tokens: a repeated call must match, another model not."""
    dsr = three_outputs()
    x = da.from_array(coarse(), chunks=(1, 4, 12, 16))
    a = downscale_array(x, dsr, tile=4, halo=2)
    b = downscale_array(x, dsr, tile=4, halo=2)
    assert a.name == b.name
    other = three_outputs()
    with torch.no_grad():
        next(other.model.parameters()).add_(1.0)
    assert downscale_array(x, other, tile=4, halo=2).name != a.name


def test_each_output_chunk_costs_a_few_tasks():
    """Stage 1 gathers its halo itself and stage 2 denormalizes: no overlap,
    slicing or masking tasks (the overlap version made ~100 per chunk)."""
    dsr = three_outputs()
    x = da.from_array(coarse((6, 4, 24, 32)), chunks=(1, 4, 8, 8))
    out = downscale_array(x, dsr, tile=4, halo=2)
    n_chunks = int(np.prod(out.numblocks))
    (opt,) = dask.optimize(out)
    tasks = len(dict(opt.__dask_graph__()))
    # input (1 per block here) + stage 1 + stage 2, plus the model
    assert tasks <= 3 * n_chunks + 1, tasks / n_chunks
    eager = downscale_array(np.asarray(x), dsr, tile=4, halo=2, device="cpu")
    np.testing.assert_allclose(out.compute(), eager, rtol=0, atol=1e-4)


@pytest.mark.distributed
def test_a_model_reaches_the_workers_once_not_in_the_graph():
    import pickle
    import time

    distributed = pytest.importorskip("distributed")
    names = ["tas", "orog"]
    cfg = xorbit.ReslimConfig.preset(
        "126m", in_vars=names, out_vars=["tas"], static_vars=["orog"], img_size=(8, 8)
    )
    dsr = xorbit.Downscaler.from_config(
        cfg, seed=0, mean={"tas": 280.0, "orog": 500.0}, std={"tas": 10.0, "orog": 100.0}
    )
    weights_mb = sum(p.numel() * 4 for p in dsr.model.parameters()) / 2**20
    assert weights_mb > 400
    x = da.from_array(coarse((2, 2, 16, 16)), chunks=(1, 2, 8, 8))
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        out = downscale_array(x, dsr, tile=4, halo=2)
        graph_mb = len(pickle.dumps(dict(out.__dask_graph__()))) / 2**20
        assert graph_mb < 2, graph_mb
        again = downscale_array(x + 1, dsr, tile=4, halo=2)
        scattered = [k for k in client.who_has() if SCATTERED_PREFIX in str(k)]
        assert len(scattered) == 1  # both graphs point at one scattered model
        got, got2 = dask.compute(out, again)
        del out, again  # graphs hold the model's future: it lives as long as they do
        clear_cache()  # and then it is released (asynchronously)
        for _ in range(100):
            if not any(SCATTERED_PREFIX in str(k) for k in client.who_has()):
                break
            time.sleep(0.05)
        assert not any(SCATTERED_PREFIX in str(k) for k in client.who_has())
    eager = downscale_array(np.asarray(x), dsr, tile=4, halo=2, device="cpu")
    np.testing.assert_allclose(got, eager, rtol=0, atol=1e-4)
    assert np.abs(got2 - got).max() > 0


@pytest.mark.distributed
def test_a_lazy_result_computed_after_its_client_closed_says_so():
    """Before: "Missing dependency ModelHandle-..." and nothing more."""
    distributed = pytest.importorskip("distributed")
    dsr = three_outputs()
    x = da.from_array(coarse(), chunks=(1, 4, 12, 16))

    def cluster():
        return distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        )

    with cluster() as c, distributed.Client(c):
        out = downscale_array(x, dsr, tile=4, halo=2, device="cpu")
        expected = out.compute()
    with pytest.raises(ClientClosedError, match=r"built under a dask.distributed client.*closed"):
        out.compute(scheduler="sync")
    with pytest.raises(ClientClosedError, match=r"inside the client's `with` block"):
        out.compute(scheduler="threads")
    # under a new client, sending the same model again (any call) brings the result back
    with cluster() as c, distributed.Client(c):
        downscale_array(x[:1], dsr, tile=4, halo=2, device="cpu")
        np.testing.assert_allclose(out.compute(), expected, rtol=0, atol=0)
    clear_cache()
    # graphs without a client are not touched by the check
    np.testing.assert_allclose(
        downscale_array(x, dsr, tile=4, halo=2, device="cpu").compute(scheduler="sync"),
        expected,
        rtol=0,
        atol=1e-6,
    )
