"""Overhead of ``.orbit.downscale`` over the bare model forward on the very same tiles.

What it measures
    End-to-end wall time of ``coarse.orbit.downscale(dsr, tile=24, halo=4).compute()``
    (graph construction, normalization, rechunk, halo overlap, tile split, model,
    blend/merge, fold, denormalization and NaN masking) divided by the time of the
    bare model forward, ``xorbit.engine.run_model``, over a pre-stacked numpy batch
    holding exactly the same tiles: the same number of tiles (``len(TilePlan) x time
    steps``), the same window shape and the same batch size.  The windows of the
    baseline are cut with ``xorbit.tiles.split`` from the normalized, halo-padded
    input, so the two runs push identical tensors through the model.

    The ratio is measured with Dask's default threaded scheduler and with the
    single-threaded ``synchronous`` scheduler.  Timings are interleaved (model,
    threaded, synchronous, model, ...) after one warm-up run of each, repeated
    ``--repeats`` times; the table gives the best and the median.

    Model: ``ReslimConfig.preset("tiny", in_vars=["tas"], out_vars=["tas"],
    img_size=(32, 32), factor=4)`` (0.14 M parameters), randomly initialized, in
    eval mode.  Input: 8 times x 128 x 256 coarse pixels, chunked (2, 64, 128).

How to run
    .venv/bin/python benchmarks/bench_downscale_overhead.py           # full, ~30 s
    .venv/bin/python benchmarks/bench_downscale_overhead.py --quick   # smoke, < 30 s

    Options: ``--repeats N``, ``--torch-threads N`` (``torch.set_num_threads``),
    ``--dask-workers N`` (threads of the threaded scheduler); both default to the
    number of CPU cores.  Goal: ratio <= 1.15.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dask
import numpy as np
import torch
import xarray as xr
from _cpu import CpuShare

import xorbit
from xorbit import ReslimConfig
from xorbit.engine import run_model
from xorbit.tiles import TilePlan, split

GOAL = 1.15
VAR = "tas"


def build_downscaler() -> xorbit.Downscaler:
    cfg = ReslimConfig.preset(
        "tiny",
        in_vars=[VAR],
        out_vars=[VAR],
        img_size=(32, 32),
        factor=4,
        drop_path=0.0,
        drop_rate=0.0,
    )
    return xorbit.Downscaler.from_config(
        cfg, seed=0, mean={VAR: 280.0}, std={VAR: 10.0}, units={VAR: "K"}
    )


def coarse_input(nt: int, ny: int, nx: int) -> xr.DataArray:
    """A smooth regional temperature-like field plus some noise (float32, in memory)."""
    rng = np.random.default_rng(0)
    lat = 20.0 + 0.25 * np.arange(ny)
    lon = 230.0 + 0.25 * np.arange(nx)
    t = np.arange(nt)[:, None, None]
    field = (
        280.0
        + 15.0 * np.cos(np.deg2rad(lat))[None, :, None]
        + 5.0 * np.sin(np.deg2rad(4 * lon)[None, None, :] + 0.3 * t)
        + rng.standard_normal((nt, ny, nx))
    ).astype(np.float32)
    return xr.DataArray(
        field,
        dims=("time", "lat", "lon"),
        coords={
            "time": np.arange(nt),
            "lat": ("lat", lat, {"units": "degrees_north", "standard_name": "latitude"}),
            "lon": ("lon", lon, {"units": "degrees_east", "standard_name": "longitude"}),
        },
        name=VAR,
        attrs={"units": "K", "standard_name": "air_temperature"},
    )


def same_tiles(coarse: xr.DataArray, dsr: xorbit.Downscaler, plan: TilePlan) -> np.ndarray:
    """The model inputs of the tiled run, pre-stacked as ``[tiles * times, 1, wy, wx]``."""
    x = dsr.normalize(coarse.values[:, None], [VAR])  # [T, C, ny, nx]
    hy, hx = plan.halo
    ext = np.pad(x, ((0, 0), (0, 0), (hy, hy), (hx, hx)), mode="edge")
    ny, nx = x.shape[-2:]
    tiles = plan.owned(0, ny, 0, nx)
    windows = np.stack(list(split(ext, plan, (0, 0), tiles)))  # [tiles, T, C, wy, wx]
    return np.ascontiguousarray(windows.reshape(-1, *windows.shape[2:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small input, 3 repeats (< 30 s)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default 7, quick 3)")
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count())
    ap.add_argument("--dask-workers", type=int, default=os.cpu_count())
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    if args.quick:
        nt, ny, nx, chunks = 2, 64, 128, {"time": 1, "lat": 32, "lon": 64}
    else:
        nt, ny, nx, chunks = 8, 128, 256, {"time": 2, "lat": 64, "lon": 128}
    repeats = args.repeats or (3 if args.quick else 7)
    tile, halo = 24, 4
    torch.set_num_threads(args.torch_threads)

    dsr = build_downscaler()
    coarse = coarse_input(nt, ny, nx)
    lazy = coarse.chunk(chunks)
    plan = TilePlan.build((ny, nx), tile, halo, dsr.factor, periodic=(False, False))
    windows = same_tiles(coarse, dsr, plan)
    n_tiles = len(plan) * nt
    assert windows.shape[0] == n_tiles, (windows.shape, n_tiles)

    def model_only() -> float:
        t0 = time.perf_counter()
        run_model(dsr.model, windows, [VAR], batch_size=args.batch_size, device="cpu")
        return time.perf_counter() - t0

    def end_to_end(scheduler: str) -> float:
        cfg = {"scheduler": scheduler}
        if scheduler == "threads":
            cfg["num_workers"] = args.dask_workers
        with dask.config.set(cfg):
            t0 = time.perf_counter()
            out = lazy.orbit.downscale(
                dsr, tile=tile, halo=halo, batch_size=args.batch_size, device="cpu"
            ).compute()
            dt = time.perf_counter() - t0
        assert out.shape == (nt, ny * dsr.factor, nx * dsr.factor)
        return dt

    print(f"# bench_downscale_overhead{' (--quick)' if args.quick else ''}")
    print(
        f"# torch {torch.__version__}, torch.set_num_threads({args.torch_threads}), "
        f"interop threads {torch.get_num_interop_threads()}; dask threaded scheduler "
        f"num_workers={args.dask_workers}; {os.cpu_count()} CPU cores; "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )
    print(
        f"# input {nt} x {ny} x {nx} coarse, chunks {tuple(chunks.values())}; tile {tile}, "
        f"halo {halo}, window {plan.window}, factor {dsr.factor}; batch {args.batch_size}; "
        f"{len(plan)} tiles per time step; model {dsr.model.num_params() / 1e6:.2f} M params"
    )

    # warm-up (first-call costs of torch and dask are not what we measure)
    model_only()
    for sched in ("threads", "synchronous"):
        end_to_end(sched)

    cpu = CpuShare()
    times: dict[str, list[float]] = {"model": [], "threads": [], "synchronous": []}
    for _ in range(repeats):
        times["model"].append(model_only())
        times["threads"].append(end_to_end("threads"))
        times["synchronous"].append(end_to_end("synchronous"))

    best_m = min(times["model"])
    header = (
        f"{'scheduler':<22} {'tiles':>6} {'model-only s':>13} {'end-to-end s':>13} "
        f"{'ratio':>6} {'paired median':>14} {'goal':>7} {'met':>4}"
    )
    print(
        f"# best of {repeats} interleaved runs; ratio = best end-to-end / best model-only; "
        "paired median = median over the runs of end-to-end / the model-only run just before"
    )
    print(header)
    print("-" * len(header))
    for sched, label in (
        ("threads", f"threads ({args.dask_workers} workers)"),
        ("synchronous", "synchronous"),
    ):
        best = min(times[sched])
        ratio = best / best_m
        paired = statistics.median(e / m for e, m in zip(times[sched], times["model"], strict=True))
        print(
            f"{label:<22} {n_tiles:>6} {best_m:>13.3f} {best:>13.3f} {ratio:>6.2f} "
            f"{paired:>14.2f} {'<=' + str(GOAL):>7} {'yes' if ratio <= GOAL else 'no':>4}"
        )
    print(
        "# all runs (s): "
        + "; ".join(f"{k}: " + ", ".join(f"{t:.3f}" for t in v) for k, v in times.items())
    )
    print(
        f"# other processes used {cpu.others():.0%} of the CPU during the timed runs; "
        f"load average at end {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
