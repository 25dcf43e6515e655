"""End-to-end ``.orbit.downscale`` time over the untiled model forward, per tile/halo choice.

What it measures
    One time step of the 23 reference inputs (`xorbit.model.config.REFERENCE_IN_VARS`)
    on a global 1-degree-style lat/lon grid (longitude wraps, so the tile plan is
    periodic in x), downscaled x4 by the "9.5m" preset with its default
    ``img_size=(32, 64)``, patch 2 (``ReslimConfig.preset("9.5m", factor=4,
    in_vars=REFERENCE_IN_VARS, out_vars=REFERENCE_OUT_VARS)``; random weights,
    eval mode, mean 0 / std 1 normalization).  Grids: 90 x 180 and 180 x 360
    coarse pixels.

    * untiled: ``dsr.model(torch.from_numpy(x)[None], in_vars)`` under
      ``torch.inference_mode()`` with ``x`` the ``[23, ny, nx]`` float32 field: one
      global self-attention over ``ny/2 * nx/2`` tokens;
    * end to end: ``ds.orbit.downscale(dsr, tile=..., halo=..., batch_size=...)``
      (followed by ``.compute()``) on an ``xr.Dataset`` of 23 variables, either
      numpy-backed ("eager") or Dask-backed ("dask ..."; whole-field chunks unless
      the label says otherwise; Dask's default threaded scheduler unless it says
      "sync").  Configurations: the defaults (window = img_size, halo =
      img_size // 32, at least 1: ``(1, 2)``), the 0.1 default halo img_size // 8
      and other halos at the same 32 x 64 window, "balanced" tiles (the fewest
      32 x 64 windows with a halo of at least (2, 4), the core shrunk to split
      the axis evenly, the rest given to the halo), a 64 x 128 window (the model
      resizes its position table), and batch size 1 next to the default 16.

    Runs are interleaved in rounds (untiled, then every configuration, then the
    next round) so that all of them see the same background load; the table gives
    the best of the rounds and ``ratio`` = best end-to-end / best untiled.  Each
    size starts with one warm-up of the untiled forward (on the 90 x 180 field) and
    one of the default end-to-end run (eager and Dask).

    ``area overhead`` = window area x tiles / field area (the tokens the tiled run
    pushes through the model, over those of the untiled run).

    Goal (issue): ratio <= 0.35 at 180 x 360 and <= 1.0 at 90 x 180.

    ``--profile``: afterwards, cProfile of one default eager run at 180 x 360 (or
    the largest size run), top functions by own time and the share of the model
    forward.

How to run
    .venv/bin/python benchmarks/bench_speed_ratio.py             # both sizes, ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_speed_ratio.py --profile   # ... plus the profile, +30 s
    .venv/bin/python benchmarks/bench_speed_ratio.py --quick     # 90 x 180, 1 round, < 1 min

    Options: ``--only "eager, default;eager, halo (1, 2)"`` (labels as in the table),
    ``--rounds N`` (default 3 at 90 x 180, 2 at 180 x 360; quick 1),
    ``--sizes 90x180,180x360``, ``--torch-threads N`` (default: CPU cores).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import sys
import time
import warnings
from dataclasses import dataclass
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
from xorbit.engine import tile_defaults
from xorbit.model.config import REFERENCE_IN_VARS, REFERENCE_OUT_VARS
from xorbit.tiles import TilePlan

GOALS = {(90, 180): 1.0, (180, 360): 0.35}
IN_VARS = list(REFERENCE_IN_VARS)
OUT_VARS = list(REFERENCE_OUT_VARS)


@dataclass(frozen=True)
class Run:
    label: str
    tile: tuple[int, int] | None = None
    halo: tuple[int, int] | None = None
    batch: int = 16
    mode: str = "eager"  # eager | dask | dask-sync | dask-2x
    quick: bool = False  # part of --quick


def balanced(n: int, img: int, min_halo: int) -> tuple[int, int]:
    """(core, halo): the fewest windows of ``img`` with halo >= ``min_halo``, split evenly."""
    count = math.ceil(n / (img - 2 * min_halo))
    core = math.ceil(n / count)
    return core, (img - core) // 2


def runs_for(shape: tuple[int, int], img: tuple[int, int]) -> list[Run]:
    iy, ix = img
    by, hy = balanced(shape[0], iy, 2)
    bx, hx = balanced(shape[1], ix, 4)
    core = lambda h: (iy - 2 * h[0], ix - 2 * h[1])  # noqa: E731  window = img_size
    return [
        Run("eager, default", quick=True),
        Run("dask, default", mode="dask", quick=True),
        Run("dask-sync, default", mode="dask-sync"),
        Run("eager, default, batch 1", batch=1),
        Run("eager, halo img/8 (0.1 default)", core((4, 8)), (4, 8), quick=True),
        Run("dask, halo img/8 (0.1 default)", core((4, 8)), (4, 8), mode="dask"),
        Run("eager, halo img/16", core((2, 4)), (2, 4)),
        Run("eager, balanced >= img/16", (by, bx), (hy, hx)),
        Run("eager, halo (2, 2)", core((2, 2)), (2, 2)),
        Run("dask 2 lon chunks, default", mode="dask-2x"),
        Run("eager, window 2 img, halo (4, 8)", (2 * iy - 8, 2 * ix - 16), (4, 8)),
    ]


def build() -> xorbit.Downscaler:
    # the preset's own variables: the reference's 23 inputs (4 static), 3 outputs
    cfg = ReslimConfig.preset("9.5m", factor=4)
    assert cfg.in_vars == IN_VARS and cfg.out_vars == OUT_VARS
    return xorbit.Downscaler.from_config(
        cfg,
        seed=0,
        mean={v: 0.0 for v in IN_VARS},
        std={v: 1.0 for v in IN_VARS},
        units={v: "1" for v in IN_VARS},
    )


def coarse(ny: int, nx: int) -> xr.Dataset:
    """23 variables, one time step, on a global grid (lat -89.5.., lon 0..359 at 1 deg)."""
    d = 180.0 / ny
    lat = -90.0 + d / 2 + d * np.arange(ny)
    lon = d * np.arange(nx)
    rng = np.random.default_rng(0)
    smooth = np.cos(np.deg2rad(lat))[:, None] + 0.3 * np.sin(np.deg2rad(3 * lon))[None, :]
    data = {
        v: (
            ("time", "lat", "lon"),
            (smooth + 0.5 * rng.standard_normal((ny, nx))).astype(np.float32)[None],
            {"units": "1"},
        )
        for v in IN_VARS
    }
    return xr.Dataset(
        data,
        coords={
            "time": [0],
            "lat": ("lat", lat, {"units": "degrees_north", "standard_name": "latitude"}),
            "lon": ("lon", lon, {"units": "degrees_east", "standard_name": "longitude"}),
        },
    )


def plan_of(run: Run, dsr: xorbit.Downscaler, shape: tuple[int, int]) -> TilePlan:
    tile, halo = tile_defaults(dsr.config.img_size, run.tile, run.halo, shape, True)
    return TilePlan.build(shape, tile, halo, dsr.factor, periodic=(False, True))


def end_to_end(run: Run, ds: xr.Dataset, dsr: xorbit.Downscaler) -> float:
    ny, nx = ds.sizes["lat"], ds.sizes["lon"]
    if run.mode == "eager":
        obj = ds
    elif run.mode == "dask-2x":
        obj = ds.chunk({"time": 1, "lat": ny, "lon": nx // 2})
    else:
        obj = ds.chunk({"time": 1, "lat": ny, "lon": nx})
    sched = {"scheduler": "synchronous"} if run.mode == "dask-sync" else {}
    with dask.config.set(sched):
        t0 = time.perf_counter()
        out = obj.orbit.downscale(dsr, tile=run.tile, halo=run.halo, batch_size=run.batch)
        out = out.compute()
        dt = time.perf_counter() - t0
    assert out[OUT_VARS[0]].shape == (1, ny * dsr.factor, nx * dsr.factor)
    return dt


def untiled(x: torch.Tensor, dsr: xorbit.Downscaler) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        dsr.model(x, IN_VARS)
    return time.perf_counter() - t0


def measure(shape, rounds, quick, dsr, warm_x, only=None) -> dict:
    ds = coarse(*shape)
    x = torch.from_numpy(np.stack([ds[v].values[0] for v in IN_VARS]))[None]
    runs = [r for r in runs_for(shape, dsr.config.img_size) if r.quick or not quick]
    if only:
        runs = [r for r in runs if r.label in only]
    untiled(warm_x, dsr)  # warm-up (on the small field: the large one costs ~25 s)
    for mode in ("eager", "dask"):
        end_to_end(Run("warm-up", mode=mode), ds, dsr)
    cpu, load0 = CpuShare(), os.getloadavg()[0]
    times: dict[str, list[float]] = {"untiled": []} | {r.label: [] for r in runs}
    for _ in range(rounds):
        times["untiled"].append(untiled(x, dsr))
        for r in runs:
            times[r.label].append(end_to_end(r, ds, dsr))
    return dict(
        shape=shape,
        runs=runs,
        times=times,
        others=cpu.others(),
        load=(load0, os.getloadavg()[0]),
    )


def report(res: dict, dsr: xorbit.Downscaler) -> None:
    shape, runs, times = res["shape"], res["runs"], res["times"]
    ny, nx = shape
    base = min(times["untiled"])
    goal = GOALS.get(tuple(shape))
    print(
        f"\n## {ny} x {nx} coarse: untiled forward best {base:.2f} s "
        f"(runs: {', '.join(f'{t:.2f}' for t in times['untiled'])}); "
        f"{(ny // 2) * (nx // 2)} tokens; goal ratio <= {goal}"
    )
    print(
        f"# other processes used {res['others']:.0%} of the CPU during these runs; "
        f"load average {res['load'][0]:.2f} at start, {res['load'][1]:.2f} at end\n"
    )
    head = (
        "| configuration | tile | halo | window | tiles | area overhead | batch "
        "| best s | ratio | runs (s) |"
    )
    print(head)
    print("|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|")
    for r in runs:
        plan = plan_of(r, dsr, shape)
        tiles = len(plan)
        over = plan.window[0] * plan.window[1] * tiles / (ny * nx)
        best = min(times[r.label])
        ok = "" if goal is None else (" ✓" if best / base <= goal else "")
        tile = (plan.y.tile, plan.x.tile)
        print(
            f"| {r.label} | {tile[0]}x{tile[1]} | {plan.halo[0]},{plan.halo[1]} "
            f"| {plan.window[0]}x{plan.window[1]} | {tiles} | {over:.2f} | {r.batch} "
            f"| {best:.2f} | {best / base:.2f}{ok} | "
            + ", ".join(f"{t:.2f}" for t in times[r.label])
            + " |"
        )


def profile(shape, dsr) -> None:
    ds = coarse(*shape)
    run = Run("eager, default")
    end_to_end(run, ds, dsr)
    pr = cProfile.Profile()
    pr.enable()
    total = end_to_end(run, ds, dsr)
    pr.disable()
    stats = pstats.Stats(pr)
    cum = {f"{Path(k[0]).name}:{k[2]}": v[3] for k, v in stats.stats.items()}
    model = cum.get("engine.py:run_model", float("nan"))
    print(
        f"\n## profile: default eager run at {shape[0]} x {shape[1]}: {total:.2f} s, "
        f"model forward (run_model) {model:.2f} s ({model / total:.1%}), "
        f"everything else {total - model:.2f} s"
    )
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(20)
    print("```\n" + buf.getvalue().strip() + "\n```")
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats("xorbit", 30)
    print("```\n" + buf.getvalue().strip() + "\n```")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="90 x 180, 1 round, 3 configurations")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per size")
    ap.add_argument("--sizes", default=None, help="e.g. 90x180,180x360")
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count())
    ap.add_argument(
        "--only", default=None, help="run only these configurations (labels, ';'-separated)"
    )
    ap.add_argument("--profile", action="store_true", help="cProfile one default run at the end")
    args = ap.parse_args()
    sizes = args.sizes or ("90x180" if args.quick else "90x180,180x360")
    shapes = [tuple(int(v) for v in s.split("x")) for s in sizes.split(",")]

    warnings.simplefilter("ignore")  # grid-spacing warnings of the random-weight model
    torch.set_num_threads(args.torch_threads)
    dsr = build()
    print(f"# bench_speed_ratio{' (--quick)' if args.quick else ''}")
    print(
        f"# torch {torch.__version__}, torch.set_num_threads({args.torch_threads}); dask "
        f"{dask.__version__}, threaded scheduler num_workers = default ({os.cpu_count()}); "
        f"{os.cpu_count()} CPU cores; load average at start {os.getloadavg()[0]:.2f}"
    )
    print(
        f"# model: 9.5m preset, {len(IN_VARS)} inputs, {len(OUT_VARS)} outputs, img_size "
        f"{dsr.config.img_size}, patch {dsr.config.patch_size}, x{dsr.factor}, "
        f"{dsr.model.num_params() / 1e6:.2f} M parameters; global grid (periodic lon)"
    )
    warm = coarse(90, 180)
    warm_x = torch.from_numpy(np.stack([warm[v].values[0] for v in IN_VARS]))[None]
    for shape in shapes:
        rounds = args.rounds or (1 if args.quick else (3 if shape[0] * shape[1] < 30000 else 2))
        only = args.only.split(";") if args.only else None
        report(measure(shape, rounds, args.quick, dsr, warm_x, only), dsr)
        sys.stdout.flush()
    if args.profile:
        profile(max(shapes, key=lambda s: s[0] * s[1]), dsr)


if __name__ == "__main__":
    main()
