"""Scale: DDP throughput from a store, memory per rank, tasks per chunk, graph size.

Run: ``.venv/bin/python benchmarks/bench_scale.py [--quick] [--only NAME ...]``

Four measurements, each printed as a markdown table:

``ddp``
    Training throughput of the ``9.5m`` preset (one variable, 16 x 32 coarse
    crops, x4, its default batch 32, ``--batch``) reading its samples from a zarr store
    (``in_memory=False``), on a ``LocalCluster`` of 1 worker x 1 thread and of
    2 workers x 1 thread, every rank held to 1 torch thread.  Throughput is
    ``(samples of 3 epochs - samples of 1 epoch) / (t3 - t1)``: process
    group, scatter and warm-up costs cancel.  Aim: 2 x 1 over 1 x 1 >= 1.7.
``memory``
    Training from a generated store of ~1.3 GB (the slow test's,
    `tests.test_scale.generated_store`) on 2 workers x 1 thread with a 1 GiB
    memory limit each: the peak RSS of the calling process and of each worker
    process (``ru_maxrss``, statistics tasks included) against the store size.
``tasks``
    Tasks per output chunk of ``.orbit.downscale`` on a zarr-backed input
    (one time step per chunk, 4 x 4 blocks per step), after ``dask.optimize``.
``graph``
    Pickled size of the downscale graph of a ``126m`` model under a
    distributed client, against the size of its weights.
"""

from __future__ import annotations

import argparse
import os
import pickle
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dask
import numpy as np
import xarray as xr

import xorbit


def _store(where: Path, nt: int, ny: int, nx: int) -> tuple[xr.DataArray, xr.DataArray]:
    """The slow test's generated field (fine ``ny x nx``, x4), opened from zarr."""
    from tests.test_scale import generated_store

    generated_store(where, nt, ny, nx)
    return (
        xr.open_zarr(where / "coarse.zarr")["tas"],
        xr.open_zarr(where / "fine.zarr")["tas"],
    )


def bench_ddp(quick: bool, in_memory: bool = False, prefetch: int = 2, batch: int = 32) -> None:
    import distributed

    samples = 64 if quick else 192
    cfg = xorbit.ReslimConfig.preset(
        "9.5m", in_vars=["tas"], out_vars=["tas"], factor=4, img_size=(16, 32)
    )
    if quick:
        cfg = xorbit.ReslimConfig.preset(
            "tiny", in_vars=["tas"], out_vars=["tas"], factor=4, img_size=(16, 32)
        )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        coarse, fine = _store(Path(tmp), 96, 128, 256)
        for n in (1, 2):
            with (
                distributed.LocalCluster(
                    n_workers=n, threads_per_worker=1, dashboard_address=None
                ) as cluster,
                distributed.Client(cluster) as client,
            ):
                kw = dict(
                    batch_size=batch,
                    samples_per_epoch=samples,
                    client=client,
                    progress=False,
                    device="cpu",
                    in_memory=in_memory,
                    prefetch=prefetch,
                    threads=1,
                )
                times = {}
                for epochs in (1, 3):
                    t0 = time.perf_counter()
                    xorbit.train(coarse, fine, cfg, epochs=epochs, **kw)
                    times[epochs] = time.perf_counter() - t0
                rate = 2 * samples / (times[3] - times[1])
                rows.append((n, times[1], times[3], rate))
    where = "in memory" if in_memory else f"from a zarr store, prefetch {prefetch}"
    print(f"\n### DDP throughput ({cfg.preset_name()}, batch {batch}, samples {where})\n")
    print("| workers x threads | 1 epoch s | 3 epochs s | samples/s | vs 1 x 1 |")
    print("|---|--:|--:|--:|--:|")
    for n, t1, t3, rate in rows:
        print(f"| {n} x 1 | {t1:.1f} | {t3:.1f} | {rate:.2f} | {rate / rows[0][3]:.2f} |")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_memory(quick: bool) -> None:
    import distributed

    from tests import test_scale

    with tempfile.TemporaryDirectory() as tmp:
        size = test_scale.generated_store(Path(tmp), nt=240 if quick else test_scale.NT)
        coarse = xr.open_zarr(Path(tmp) / "coarse.zarr")["tas"]
        fine = xr.open_zarr(Path(tmp) / "fine.zarr")["tas"]
        with (
            distributed.LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                memory_limit=test_scale.WORKER_MEMORY,
                dashboard_address=None,
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            pids = client.run(os.getpid)
            before = _maxrss()
            cfg = xorbit.ReslimConfig.preset(
                "tiny", in_vars=["tas"], out_vars=["tas"], factor=4, img_size=(8, 8)
            )
            t0 = time.perf_counter()
            xorbit.train(
                coarse, fine, cfg, epochs=1, batch_size=8, samples_per_epoch=64,
                client=client, progress=False, device="cpu",
            )  # fmt: skip
            wall = time.perf_counter() - t0
            peak = _maxrss()
            workers = client.run(_maxrss)
            restarted = client.run(os.getpid) != pids
    gb = 1e9
    print(f"\n### Memory: training from a {size / gb:.2f} GB store, workers limited to 1 GiB\n")
    print("| process | peak RSS GB | peak / store |")
    print("|---|--:|--:|")
    print(f"| caller (before train: {before / gb:.2f} GB) | {peak / gb:.2f} | {peak / size:.2f} |")
    for i, (_, rss) in enumerate(sorted(workers.items())):
        print(f"| worker / rank {i} | {rss / gb:.2f} | {rss / size:.2f} |")
    print(f"\nwall {wall:.0f} s; workers restarted: {restarted}")


def bench_tasks(quick: bool) -> None:
    cfg = xorbit.ReslimConfig.preset("tiny", in_vars=["tas"], out_vars=["tas"], factor=4)
    dsr = xorbit.Downscaler.from_config(cfg, seed=0, mean={"tas": 280.0}, std={"tas": 10.0})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        nt = 4 if quick else 16
        coarse, _ = _store(Path(tmp), nt, 4 * 96, 4 * 192)
        for chunks in ({"time": 1}, {"time": 1, "lat": 48, "lon": 96}):
            x = coarse.chunk(chunks)
            out = x.orbit.downscale(dsr)
            n_out = int(np.prod(out.data.numblocks))
            raw = len(dict(out.data.__dask_graph__()))
            (opt,) = dask.optimize(out.data)
            tasks = len(dict(opt.__dask_graph__()))
            rows.append((x.data.numblocks, out.data.numblocks, n_out, raw, tasks))
    print("\n### Tasks per output chunk (`.orbit.downscale` of a zarr-backed input)\n")
    print("| input blocks | output blocks | output chunks | tasks | optimized | per chunk |")
    print("|---|---|--:|--:|--:|--:|")
    for ib, ob, n, raw, tasks in rows:
        print(f"| {ib} | {ob} | {n} | {raw} | {tasks} | {tasks / n:.1f} |")


def bench_graph(quick: bool) -> None:
    import distributed

    preset = "9.5m" if quick else "126m"
    cfg = xorbit.ReslimConfig.preset(preset, in_vars=["tas"], out_vars=["tas"], img_size=(8, 8))
    dsr = xorbit.Downscaler.from_config(cfg, seed=0, mean={"tas": 280.0}, std={"tas": 10.0})
    weights = sum(p.numel() * 4 for p in dsr.model.parameters())
    x = xr.DataArray(
        np.full((2, 32, 32), 280.0, np.float32),
        dims=("time", "lat", "lon"),
        coords={"lat": np.arange(32.0), "lon": np.arange(32.0) + 100},
        name="tas",
        attrs={"units": "K"},
    ).chunk({"time": 1, "lat": 16, "lon": 16})
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
    ):
        out = x.orbit.downscale(dsr)
        size = len(pickle.dumps(dict(out.data.__dask_graph__())))
    local = len(pickle.dumps(dict(x.orbit.downscale(dsr).data.__dask_graph__())))
    mb = 2**20
    print(f"\n### Graph size, {preset} ({weights / mb:.0f} MB of weights)\n")
    print("| scheduler | pickled graph MB |")
    print("|---|--:|")
    print(f"| distributed client (model scattered) | {size / mb:.3f} |")
    print(f"| local (model in the graph) | {local / mb:.1f} |")


BENCHES = {"ddp": bench_ddp, "memory": bench_memory, "tasks": bench_tasks, "graph": bench_graph}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHES), default=list(BENCHES))
    parser.add_argument("--in-memory", action="store_true", help="ddp: load the data whole")
    parser.add_argument("--prefetch", type=int, default=2, help="ddp: batches read ahead")
    parser.add_argument("--batch", type=int, default=32, help="ddp: global batch (9.5m: 32)")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f}, cores: {os.cpu_count()}")
    for name in args.only:
        if name == "ddp":
            bench_ddp(args.quick, args.in_memory, args.prefetch, args.batch)
        else:
            BENCHES[name](args.quick)


if __name__ == "__main__":
    main()
