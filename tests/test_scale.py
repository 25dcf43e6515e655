"""Training from a store larger than the workers' memory (slow: writes ~1.3 GB)."""

import json
import subprocess
import sys
import textwrap

import dask.array as da
import numpy as np
import pytest
import xarray as xr

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

NT, NY, NX = 2400, 256, 512  # fine float32: 1.26 GB
WORKER_MEMORY = 2**30


def generated_store(path, nt=NT, ny=NY, nx=NX):
    """A smooth-plus-noise fine field and its coarse twin, written chunk by chunk
    (one time step per chunk) to ``path/fine.zarr`` and ``path/coarse.zarr``;
    returns their size in bytes."""
    lat = np.linspace(20.0, 60.0, ny)
    lon = np.linspace(200.0, 300.0, nx, endpoint=False)

    def block(block_info=None):
        (t0, t1), _, _ = block_info[None]["array-location"]
        t = np.arange(t0, t1)[:, None, None]
        y = np.deg2rad(lat)[None, :, None]
        x = np.deg2rad(lon)[None, None, :]
        rng = np.random.default_rng(t0)
        base = 280 + 10 * np.cos(y) * np.sin(3 * x + 0.01 * t) + 0.02 * t / 10
        return (base + rng.normal(0, 0.5, (t1 - t0, ny, nx))).astype(np.float32)

    steps = (8,) * (nt // 8) + ((nt % 8,) if nt % 8 else ())
    data = da.map_blocks(block, chunks=(steps, (ny,), (nx,)), dtype=np.float32)
    fine = xr.DataArray(
        data,
        dims=("time", "lat", "lon"),
        coords={"time": np.arange(nt), "lat": lat, "lon": lon},
        name="tas",
        attrs={"units": "K"},
    )
    fine.to_dataset().chunk(time=1).to_zarr(path / "fine.zarr")
    coarse = fine.coarsen(lat=4, lon=4).mean()
    coarse.to_dataset().chunk(time=1).to_zarr(path / "coarse.zarr")
    return fine.nbytes + coarse.nbytes


SCRIPT = """
import json, os, resource, sys
import distributed, xarray as xr
import xorbit

where = sys.argv[1]
coarse = xr.open_zarr(where + "/coarse.zarr")["tas"]
fine = xr.open_zarr(where + "/fine.zarr")["tas"]
with distributed.LocalCluster(
    n_workers=2, threads_per_worker=1, memory_limit={memory}, dashboard_address=None
) as cluster, distributed.Client(cluster) as client:
    pids = client.run(os.getpid)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cfg = xorbit.ReslimConfig.preset(
        "tiny", in_vars=["tas"], out_vars=["tas"], factor=4, img_size=(8, 8)
    )
    dsr = xorbit.train(
        coarse, fine, cfg, epochs=1, batch_size=8, samples_per_epoch=32,
        client=client, progress=False, device="cpu",
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    after = client.run(os.getpid)
    print(json.dumps({{
        "before": before, "peak": peak, "same_workers": pids == after,
        "loss": dsr.history[-1]["loss"], "clim": float(dsr.output_climatology["tas"].mean()),
    }}))
"""


def test_training_from_a_store_larger_than_the_workers_memory(tmp_path):
    size = generated_store(tmp_path)
    assert size > WORKER_MEMORY
    script = textwrap.dedent(SCRIPT.format(memory=WORKER_MEMORY))
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["same_workers"]  # no worker was restarted (killed for memory)
    assert np.isfinite(out["loss"])
    assert 280 < out["clim"] < 300  # the climatology over every time step
    # the calling process never held the data: far below the store's size
    assert out["peak"] - out["before"] < 0.15 * size, out
    assert out["peak"] < 0.75 * size, out
