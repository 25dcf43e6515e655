"""Peak RSS while streaming a lazily generated input, downscaled, to zarr.

What it measures
    A coarse ``float32`` temperature-like field is generated lazily with Dask
    (``da.map_blocks`` of an analytic function of time, latitude and longitude,
    chunks ``(1, 256, 512)``) on a regional, non-global grid of 256 x 512 coarse
    pixels per time step, with as many time steps as it takes for the x4 fine
    *output* to reach ``--gb`` GiB (1024 steps = 8 GiB at the default size).  It is
    downscaled with ``coarse.orbit.downscale(dsr)`` and written with
    ``out.to_dataset(name="tas").to_zarr(path, mode="w", compute=True)`` to a
    fresh directory under ``/tmp`` (removed afterwards), with xarray's default
    zarr encoding (zarr format 3, zstd).

    A background thread samples the process RSS every 0.2 s (psutil, else
    ``/proc/self/status`` VmRSS); the table reports the sampled peak, and the
    baseline (RSS after imports, model and the lazy input were built).  Each size
    runs in a fresh subprocess, so the peaks are independent.

    Memory, not skill, is measured: the model is the smallest useful Reslim
    (``embed_dim=8, depth=1, decoder_depth=0, num_heads=1, img_size=(32, 32)``,
    x4), so the run is dominated by the TILES engine, Dask and the zarr writer.
    Before the runs, a short slice (``--estimate-steps`` time steps) is timed to
    estimate the run time of every requested size.

    Goal: peak RSS <= 1.5 GB, flat in the output size.

How to run
    .venv/bin/python benchmarks/bench_stream_zarr.py                 # one 8 GiB run
    .venv/bin/python benchmarks/bench_stream_zarr.py --gb 0.5 2 8    # RSS vs size
    .venv/bin/python benchmarks/bench_stream_zarr.py --quick         # 2 tiny sizes, < 30 s

    Options: ``--torch-threads N`` (``torch.set_num_threads``), ``--dask-workers N``
    (threaded scheduler), both default to the CPU cores; ``--time-chunk N`` (time
    steps per input chunk, default 1); ``--tmp DIR`` (default /tmp).
    An 8 GiB run takes 5-10 minutes on 2 CPU cores: run it with nohup.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cpu import CpuShare

GOAL_MB = 1500.0  # 1.5 GB; MB and GB are 10**6 and 10**9 bytes here
VAR = "tas"
FACTOR = 4
NY, NX = 256, 512  # coarse pixels per time step
GIB = 2**30


def steps_for(gb: float) -> int:
    """Time steps for a fine output of ``gb`` GiB (float32)."""
    return max(1, math.ceil(gb * GIB / (NY * FACTOR * NX * FACTOR * 4)))


class RssSampler(threading.Thread):
    """Samples this process's resident set size every ``interval`` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self.trace: list[int] = []
        self._stop_event = threading.Event()
        try:
            import psutil

            proc = psutil.Process()
            self.source = "psutil"
            self._read = lambda: proc.memory_info().rss
        except ImportError:
            self.source = "/proc/self/status"
            self._read = self._read_proc

    @staticmethod
    def _read_proc() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def current(self) -> int:
        return self._read()

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss = self._read()
            self.peak = max(self.peak, rss)
            self.trace.append(rss)
            self.samples += 1
            self._stop_event.wait(self.interval)

    def quarters(self) -> list[float]:
        """Peak RSS (MB) within each quarter of the sampled run."""
        n = len(self.trace)
        cuts = [round(i * n / 4) for i in range(5)]
        return [max(self.trace[a:b], default=0) / 1e6 for a, b in itertools.pairwise(cuts)]

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, self._read())
        return self.peak


def _analytic(block, block_info=None):
    """Coarse temperature of one block: a function of its global (t, y, x) indices."""
    import numpy as np

    (t0, t1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
    t = np.arange(t0, t1, dtype=np.float32)[:, None, None]
    y = np.arange(y0, y1, dtype=np.float32)[None, :, None]
    x = np.arange(x0, x1, dtype=np.float32)[None, None, :]
    lat = np.deg2rad(20.0 + 0.25 * y)
    return (
        280.0
        + 15.0 * np.cos(lat)
        + 5.0 * np.sin(0.07 * x + 0.3 * t) * np.cos(0.05 * y - 0.1 * t)
        + 2.0 * np.sin(0.9 * x + 1.3 * y + t)
    ).astype(np.float32)


# --------------------------------------------------------------------------- child
def run_one(steps: int, args: argparse.Namespace) -> dict:
    sampler = RssSampler(0.2)
    import dask
    import dask.array as da
    import numpy as np
    import torch
    import xarray as xr

    import xorbit
    from xorbit import ReslimConfig

    torch.set_num_threads(args.torch_threads)
    cfg = ReslimConfig(
        in_vars=[VAR],
        out_vars=[VAR],
        embed_dim=8,
        depth=1,
        decoder_depth=0,
        num_heads=1,
        img_size=(32, 32),
        factor=FACTOR,
        drop_path=0.0,
        drop_rate=0.0,
    )
    dsr = xorbit.Downscaler.from_config(
        cfg, seed=0, mean={VAR: 280.0}, std={VAR: 10.0}, units={VAR: "K"}
    )
    template = da.empty((steps, NY, NX), chunks=(args.time_chunk, NY, NX), dtype=np.float32)
    data = da.map_blocks(_analytic, template, dtype=np.float32, meta=np.array((), np.float32))
    coarse = xr.DataArray(
        data,
        dims=("time", "lat", "lon"),
        coords={
            "time": np.arange(steps),
            "lat": ("lat", 20.0 + 0.25 * np.arange(NY), {"units": "degrees_north"}),
            "lon": ("lon", 230.0 + 0.25 * np.arange(NX), {"units": "degrees_east"}),
        },
        name=VAR,
        attrs={"units": "K", "standard_name": "air_temperature"},
    )
    baseline = sampler.current()
    sampler.start()
    store = Path(tempfile.mkdtemp(prefix="xorbit-bench-", dir=args.tmp)) / "out.zarr"
    try:
        t0 = time.perf_counter()
        out = coarse.orbit.downscale(dsr, device="cpu")
        with dask.config.set(scheduler="threads", num_workers=args.dask_workers):
            out.to_dataset(name=VAR).to_zarr(store, mode="w", compute=True)
        wall = time.perf_counter() - t0
        peak = sampler.stop()
        disk = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        n_tasks = len(out.data.__dask_graph__())
    finally:
        shutil.rmtree(store.parent, ignore_errors=True)
    return {
        "steps": steps,
        "out_bytes": int(out.nbytes),
        "disk_bytes": int(disk),
        "wall_s": wall,
        "baseline_mb": baseline / 1e6,
        "peak_mb": peak / 1e6,
        "samples": sampler.samples,
        "quarters_mb": sampler.quarters(),
        "source": sampler.source,
        "tasks": n_tasks,
        "chunks": [c[0] for c in out.chunks],
    }


def spawn(steps: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one",
        str(steps),
        "--torch-threads",
        str(args.torch_threads),
        "--dask-workers",
        str(args.dask_workers),
        "--time-chunk",
        str(args.time_chunk),
        "--tmp",
        args.tmp,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child with {steps} steps failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- parent
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="sizes 0.02 and 0.06 GiB (< 30 s)")
    ap.add_argument("--gb", type=float, nargs="+", default=None, help="output GiB (default 8)")
    ap.add_argument("--estimate-steps", type=int, default=None, help="steps of the timing slice")
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count())
    ap.add_argument("--dask-workers", type=int, default=os.cpu_count())
    ap.add_argument("--time-chunk", type=int, default=1, help="time steps per input chunk")
    ap.add_argument("--tmp", default="/tmp", help="parent directory of the zarr store")
    ap.add_argument("--one", type=int, metavar="STEPS", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return

    sizes = args.gb or ([0.02, 0.06] if args.quick else [8.0])
    est_steps = args.estimate_steps or (2 if args.quick else 16)
    import dask
    import torch
    import zarr

    print(f"# bench_stream_zarr{' (--quick)' if args.quick else ''}")
    print(
        f"# torch {torch.__version__}, torch.set_num_threads({args.torch_threads}); dask "
        f"{dask.__version__} threaded scheduler num_workers={args.dask_workers}; zarr "
        f"{zarr.__version__}; {os.cpu_count()} CPU cores; load average at start "
        f"{os.getloadavg()[0]:.2f}"
    )
    print(
        f"# coarse {NY} x {NX} per step, chunks ({args.time_chunk}, {NY}, {NX}), lazy map_blocks; "
        f"x{FACTOR}; "
        f"fine output {NY * FACTOR * NX * FACTOR * 4 / 2**20:.0f} MiB per step; model "
        f"embed_dim 8, depth 1, tiles 24 + halo 4 (defaults)"
    )
    cpu = CpuShare()
    est = spawn(est_steps, args)
    per_step = est["wall_s"] / est_steps
    print(
        f"# estimate: {est_steps} steps in {est['wall_s']:.1f} s -> {per_step:.2f} s per step; "
        + ", ".join(f"{g:g} GiB ~ {steps_for(g) * per_step / 60:.1f} min" for g in sizes),
        flush=True,
    )

    rows = []
    for g in sizes:
        rows.append((g, spawn(steps_for(g), args)))
        print(f"#   done {g:g} GiB", flush=True)

    header = (
        f"{'target':>7} {'steps':>6} {'output GB':>10} {'on disk GB':>10} {'wall s':>8} "
        f"{'MB/s':>6} {'base RSS MB':>11} {'peak RSS MB':>11} {'peak/out':>9} {'goal':>8} "
        f"{'met':>4}"
    )
    print(header)
    print("-" * len(header))
    for g, r in rows:
        print(
            f"{g:>4g}GiB {r['steps']:>6} {r['out_bytes'] / 1e9:>10.2f} "
            f"{r['disk_bytes'] / 1e9:>10.2f} {r['wall_s']:>8.1f} "
            f"{r['out_bytes'] / 1e6 / r['wall_s']:>6.0f} {r['baseline_mb']:>11.0f} "
            f"{r['peak_mb']:>11.0f} {r['peak_mb'] * 1e6 / r['out_bytes']:>9.3f} "
            f"{'<=' + format(GOAL_MB, '.0f'):>8} {'yes' if r['peak_mb'] <= GOAL_MB else 'no':>4}"
        )
    for g, r in rows:
        q = ", ".join(f"{v:.0f}" for v in r["quarters_mb"])
        print(f"# {g:g} GiB: peak RSS (MB) in each quarter of the run: {q}")
    r = rows[-1][1]
    print(
        f"# RSS sampled every 0.2 s with {r['source']} ({r['samples']} samples in the last "
        f"run); output chunks {r['chunks']}; {r['tasks']} tasks in the last graph "
        f"({r['tasks'] / -(-r['steps'] // args.time_chunk):.0f} per output chunk)"
    )
    print(
        f"# other processes used {cpu.others():.0%} of the CPU during the runs; "
        f"load average at end {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
