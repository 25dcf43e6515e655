"""Time and peak memory vs. area: TILES (``.orbit.downscale``) vs. one global attention.

What it measures
    One time step of one variable at 1x, 4x, 16x (and, in the full run, 64x) the
    area of a base coarse grid of 48 x 96 pixels, downscaled x4 by the tiny preset
    (``ReslimConfig.preset("tiny", img_size=(32, 32))``, 0.14 M parameters):

    * tiled: ``coarse.chunk(lat=48, lon=96).orbit.downscale(dsr, tile=24,
      halo=4).compute()`` with the default threaded Dask scheduler.  The base grid
      is a multiple of the tile, so the number of tiles (8, 32, 128, 512) and of
      Dask blocks grows exactly with the area;
    * untiled: the bare model on the whole normalized field at once,
      ``dsr.model(x, ["tas"])`` under ``torch.inference_mode()``: one global
      self-attention over all ``ny/2 * nx/2`` tokens, whose cost grows with the
      square of the token count.

    Each configuration runs in a fresh subprocess (this script with the hidden
    ``--one`` argument): one warm-up run, then up to ``--repeats`` timed runs
    (fewer when the runs exceed a 60 s budget; the ``runs`` column says how many),
    best time reported.  Peak memory is ``ru_maxrss`` at the end of that process
    minus ``ru_maxrss`` after imports, model and input were built (the baseline).

    An untiled size is skipped when its peak memory, extrapolated from the smaller
    sizes (power law in the token count, quadratic until two sizes are measured),
    would exceed ``--max-gb`` (8 GB), or its time would exceed ``--max-untiled-s``.

    Goal: tiled time within 1.1x of linear, ``time(16x) / (16 time(1x)) <= 1.1``.

How to run
    .venv/bin/python benchmarks/bench_tiles_scaling.py           # full, ~5 min
    .venv/bin/python benchmarks/bench_tiles_scaling.py --quick   # 1x and 4x only, < 30 s

    Options: ``--repeats N`` (default 5), ``--torch-threads N`` (default: CPU cores).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cpu import CpuShare

GOAL = 1.1
VAR = "tas"
TILE, HALO, FACTOR = 24, 4, 4
BASE = (48, 96)
BUDGET_S = 60.0  # stop repeating a configuration after this much timed work


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # KiB on Linux


# --------------------------------------------------------------------------- child
def run_one(mode: str, ny: int, nx: int, repeats: int, threads: int) -> dict:
    """Time one configuration in this (fresh) process; return the measurements."""
    import numpy as np
    import torch
    import xarray as xr

    import xorbit
    from xorbit import ReslimConfig
    from xorbit.tiles import TilePlan

    torch.set_num_threads(threads)
    cfg = ReslimConfig.preset(
        "tiny", in_vars=[VAR], out_vars=[VAR], img_size=(32, 32), factor=FACTOR
    )
    dsr = xorbit.Downscaler.from_config(cfg, seed=0, mean={VAR: 280.0}, std={VAR: 10.0})
    lat = 20.0 + 0.25 * np.arange(ny)
    lon = 230.0 + 0.25 * np.arange(nx)
    rng = np.random.default_rng(0)
    field = (
        280.0
        + 15.0 * np.cos(np.deg2rad(lat))[:, None]
        + 5.0 * np.sin(np.deg2rad(4 * lon))[None, :]
        + rng.standard_normal((ny, nx))
    ).astype(np.float32)[None]
    coarse = xr.DataArray(
        field,
        dims=("time", "lat", "lon"),
        coords={"time": [0], "lat": lat, "lon": lon},
        name=VAR,
        attrs={"units": "K"},
    )
    plan = TilePlan.build((ny, nx), TILE, HALO, FACTOR)

    if mode == "tiled":
        lazy = coarse.chunk({"time": 1, "lat": BASE[0], "lon": BASE[1]})

        def once(_warm: bool = False) -> None:
            lazy.orbit.downscale(dsr, tile=TILE, halo=HALO, device="cpu").compute()

    else:
        x = torch.from_numpy(dsr.normalize(field[:, None], [VAR]))  # [1, 1, ny, nx]
        small = x[..., : BASE[0], : BASE[1]].contiguous()

        def once(warm: bool = False) -> None:
            with torch.inference_mode():
                dsr.model(small if warm else x, [VAR])

    baseline = _maxrss_mb()
    once(True)  # warm-up; the untiled warm-up runs on the base size only
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) + times[-1] <= BUDGET_S):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return {
        "mode": mode,
        "ny": ny,
        "nx": nx,
        "tiles": len(plan),
        "window_tokens": math.prod(-(-w // cfg.patch_size) for w in plan.window),
        "global_tokens": -(-ny // cfg.patch_size) * -(-nx // cfg.patch_size),
        "best_s": min(times),
        "median_s": statistics.median(times),
        "runs": len(times),
        "baseline_mb": baseline,
        "peak_mb": _maxrss_mb() - baseline,
    }


def spawn(mode: str, ny: int, nx: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one",
        mode,
        str(ny),
        str(nx),
        "--repeats",
        str(args.repeats),
        "--torch-threads",
        str(args.torch_threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child {mode} {ny}x{nx} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def extrapolate(done: list[dict], key: str, tokens: int) -> float:
    """Power-law extrapolation in the token count (exponent 2 from a single point)."""
    if not done:
        return 0.0
    last = done[-1]
    exponent = 2.0
    if len(done) >= 2 and done[-2][key] > 0 and last[key] > 0:
        exponent = max(
            1.0,
            math.log(last[key] / done[-2][key])
            / math.log(last["global_tokens"] / done[-2]["global_tokens"]),
        )
    return max(last[key], 1.0) * (tokens / last["global_tokens"]) ** exponent


# --------------------------------------------------------------------------- parent
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="areas 1x and 4x, 3 repeats")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default 5, quick 3)")
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count())
    ap.add_argument("--max-gb", type=float, default=8.0, help="skip untiled sizes above this")
    ap.add_argument("--max-untiled-s", type=float, default=300.0, help="... or above this")
    ap.add_argument("--one", nargs=3, metavar=("MODE", "NY", "NX"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 5)

    if args.one:
        mode, ny, nx = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(run_one(mode, ny, nx, args.repeats, args.torch_threads)))
        return

    scales = (1, 2) if args.quick else (1, 2, 4, 8)
    import dask
    import torch

    print(f"# bench_tiles_scaling{' (--quick)' if args.quick else ''}")
    print(
        f"# torch {torch.__version__}, torch.set_num_threads({args.torch_threads}); dask "
        f"{dask.__version__} threaded scheduler, num_workers = {os.cpu_count()} (default); "
        f"{os.cpu_count()} CPU cores; load average at start {os.getloadavg()[0]:.2f}"
    )
    print(
        f"# tiny preset img_size (32, 32), x{FACTOR}; tile {TILE}, halo {HALO}; base "
        f"{BASE[0]} x {BASE[1]} coarse, one time step, tiled input chunked {BASE}; best of "
        f"up to {args.repeats} runs after a warm-up, each configuration in a fresh process"
    )
    cpu = CpuShare()
    rows = []
    untiled_done: list[dict] = []
    for s in scales:
        ny, nx = BASE[0] * s, BASE[1] * s
        tiled = spawn("tiled", ny, nx, args)
        tokens = tiled["global_tokens"]
        est_mb = extrapolate(untiled_done, "peak_mb", tokens) + tiled["baseline_mb"]
        est_s = extrapolate(untiled_done, "best_s", tokens)
        if est_mb > args.max_gb * 1024:
            untiled = {"skip": f"skipped: est. {est_mb / 1024:.0f} GB > {args.max_gb:g} GB"}
        elif est_s * 2 > args.max_untiled_s:  # a warm-up plus one timed run
            untiled = {"skip": f"skipped: est. {est_s:.0f} s per run"}
        else:
            untiled = spawn("untiled", ny, nx, args)
            untiled_done.append(untiled)
        rows.append((s * s, tiled, untiled))
        print(f"#   done {s * s}x: {ny} x {nx}", flush=True)

    header = (
        f"{'area':>5} {'coarse':>10} {'tiles':>6} {'tok/tile':>8} {'global tok':>10} "
        f"{'tiled s':>8} {'s/area':>7} {'untiled s':>10} {'tiled MB':>9} {'untiled MB':>10} "
        f"{'runs t/u':>8}"
    )
    print(header)
    print("-" * len(header))
    t1 = rows[0][1]["best_s"]
    for area, tiled, untiled in rows:
        skip = untiled.get("skip")
        print(
            f"{area:>4}x {tiled['ny']:>4} x{tiled['nx']:>4} {tiled['tiles']:>6} "
            f"{tiled['window_tokens']:>8} {tiled['global_tokens']:>10} {tiled['best_s']:>8.3f} "
            f"{tiled['best_s'] / area:>7.4f} "
            f"{'-' if skip else format(untiled['best_s'], '.3f'):>10} "
            f"{tiled['peak_mb']:>9.0f} {'-' if skip else format(untiled['peak_mb'], '.0f'):>10} "
            f"{tiled['runs']:>4}/{'-' if skip else untiled['runs']:<3}"
            + (f"  {skip}" if skip else "")
        )
    print(
        f"# MB: peak RSS above the process baseline after setup (baseline ~"
        f"{rows[0][1]['baseline_mb']:.0f} MB); s/area: tiled s per unit (1x) area"
    )
    for (a0, prev, _), (area, tiled, _) in itertools.pairwise(rows):
        print(
            f"# linearity {area}x: time({area}x) / ({area} time(1x)) = "
            f"{tiled['best_s'] / (area * t1):.2f}; marginal time({area}x) / "
            f"({area // a0} time({a0}x)) = {tiled['best_s'] / (area // a0 * prev['best_s']):.2f}"
        )
    if len(rows) >= 3:
        r = rows[2][1]["best_s"] / (16 * t1)
        print(
            f"# goal time(16x)/(16 time(1x)) <= {GOAL}: {r:.2f} -> {'met' if r <= GOAL else 'NOT met'}"
        )
    print(
        f"# other processes used {cpu.others():.0%} of the CPU during the runs; "
        f"load average at end {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
