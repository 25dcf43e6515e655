"""The memory plan against the measured peak memory of real training ranks.

What it measures
    For each preset (one input, one output, the preset's 32 x 64 coarse window,
    x 4), one epoch of training on 2 Dask workers (one thread each, one torch
    DDP or FSDP rank each) over 8 generated fields, global batch 2 (``--batch``); the peak
    resident memory of each worker process (``ru_maxrss``, read on the workers
    after training; each run has a fresh cluster) against
    ``xorbit.training.plan`` for the same run.  ``--limit`` gives the workers a
    Dask memory limit; a run the plan refuses is reported as refused (the
    refusal happens before any worker trains).  ``--process`` measures the
    resident memory of a bare worker that has imported xorbit
    (`xorbit.training.memory.PROCESS_BYTES`).

How to run
    .venv/bin/python benchmarks/bench_plan.py                          # tiny, 9.5m, 126m, both strategies
    .venv/bin/python benchmarks/bench_plan.py --presets 126m --limit 2.6e9
    .venv/bin/python benchmarks/bench_plan.py --process
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import numpy as np
import torch
import xarray as xr

import xorbit
from xorbit.training.memory import plan


def peak_rss() -> int:
    """This process's peak resident memory, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def warm_worker() -> int:
    """Import what a training rank imports, train nothing; then the peak."""
    import xorbit.training.distributed  # noqa: F401

    return peak_rss()


def fields(cfg: xorbit.ReslimConfig, nt: int = 8, seed: int = 0) -> tuple[xr.DataArray, ...]:
    h, w = cfg.img_size
    k = cfg.factor
    rng = np.random.default_rng(seed)
    fine = xr.DataArray(
        (280 + rng.standard_normal((nt, h * k, w * k))).astype("float32"),
        dims=("time", "lat", "lon"),
        coords={
            "time": np.arange(nt),
            "lat": ("lat", np.linspace(-30, 30, h * k), {"units": "degrees_north"}),
            "lon": ("lon", np.linspace(0, 120, w * k), {"units": "degrees_east"}),
        },
        name="tas",
        attrs={"units": "K"},
    )
    return xorbit.coarsen(fine, k), fine


def one_run(preset: str, strategy: str, limit: float | None, batch: int) -> dict:
    from distributed import Client, LocalCluster

    cfg = xorbit.ReslimConfig.preset(preset, in_vars=["tas"], out_vars=["tas"])
    coarse, fine = fields(cfg)
    memory_limit = int(limit) if limit else 0
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            memory_limit=memory_limit,
        ) as cluster,
        Client(cluster) as client,
    ):
        t0 = time.perf_counter()
        try:
            dsr = xorbit.train(
                coarse,
                fine,
                cfg,
                epochs=1,
                batch_size=batch,
                client=client,
                strategy=strategy,
                progress=False,
                linear_path=False,
                climatology=False,
            )
        except MemoryError as err:
            return {"preset": preset, "strategy": strategy, "refused": str(err)}
        seconds = time.perf_counter() - t0
        peaks = client.run(peak_rss)
    data = coarse.nbytes + fine.nbytes
    p = plan(
        dsr.config,
        batch_size=batch,
        workers=2,
        strategy=strategy,
        data_bytes=data,
        memory_limit=memory_limit or None,
    )
    return {
        "preset": preset,
        "strategy": strategy,
        "params": p.parameters,
        "plan": p.total,
        "peak": max(peaks.values()),
        "seconds": seconds,
        "detail": str(p),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "9.5m", "126m"])
    ap.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"])
    ap.add_argument("--limit", type=float, default=None, help="worker memory limit, bytes")
    ap.add_argument("--process", action="store_true", help="measure a bare worker")
    ap.add_argument("--batch", type=int, default=2, help="global batch (2 ranks)")
    args = ap.parse_args()
    print(
        f"# bench_plan: 2 workers x 1 thread, batch {args.batch}, 1 epoch; {platform.machine()}, "
        f"torch {torch.__version__}, xorbit {xorbit.__version__}"
    )
    if args.process:
        from distributed import Client, LocalCluster

        with (
            LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
            Client(cluster) as client,
        ):
            (peak,) = client.run(warm_worker).values()
        print(f"bare worker with xorbit imported: {peak / 2**20:.0f} MiB")
        return
    print(
        f"{'preset':<8}{'strategy':<10}{'M params':>10}{'plan MiB':>10}{'peak MiB':>10}"
        f"{'plan/peak':>11}{'train s':>9}"
    )
    for preset in args.presets:
        for strategy in args.strategies:
            r = one_run(preset, strategy, args.limit, args.batch)
            if "refused" in r:
                print(f"{preset:<8}{strategy:<10} refused by the plan:\n{r['refused']}")
                continue
            print(
                f"{preset:<8}{strategy:<10}{r['params'] / 1e6:>10.1f}{r['plan'] / 2**20:>10.0f}"
                f"{r['peak'] / 2**20:>10.0f}{r['plan'] / r['peak']:>11.3f}{r['seconds']:>9.0f}"
            )
            print(r["detail"])


if __name__ == "__main__":
    main()
