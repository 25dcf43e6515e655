"""``.orbit.downscale`` on eager (numpy-backed) input with several outputs, against the untiled forward.

What it measures
    The ``9.5m`` preset with the reference's 23 inputs and 3 outputs, randomly
    initialized, in eval mode, on one time step of a global 90 x 180 grid (2°),
    eager (numpy-backed) Dataset input, default tile and halo.  The table gives the
    best wall time of ``ds.orbit.downscale(dsr, device="cpu")`` (everything:
    lookup, units, tiling, model, fold, labelling), of one untiled forward of the
    same model over the whole ``[1, 23, 90, 180]`` field, and their ratio.

    xorbit 0.1 computed each output variable of an eager input separately, so the
    model ran once per output (3.9 x the untiled forward in the issue that
    reported it).  Run it from an old checkout to compare: the script uses only
    the public API.

How to run
    .venv/bin/python benchmarks/bench_eager_outputs.py [--repeats 3] [--size 90 180]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import xarray as xr

import xorbit
from xorbit import ReslimConfig


def build(ny: int, nx: int):
    cfg = ReslimConfig.preset("9.5m", factor=4, img_size=(32, 64))
    dsr = xorbit.Downscaler.from_config(cfg, seed=0)
    rng = np.random.default_rng(0)
    lat = -90 + (180 / ny) * (np.arange(ny) + 0.5)
    lon = (360 / nx) * np.arange(nx)
    ds = xr.Dataset(
        {
            v: (("time", "lat", "lon"), rng.standard_normal((1, ny, nx)).astype(np.float32))
            for v in cfg.in_vars
        },
        coords={
            "time": [0],
            "lat": ("lat", lat, {"units": "degrees_north"}),
            "lon": ("lon", lon, {"units": "degrees_east"}),
        },
    )
    return dsr, ds


def best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, nargs=2, default=(90, 180))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    ny, nx = args.size
    dsr, ds = build(ny, nx)
    x = torch.from_numpy(np.stack([ds[v].values for v in dsr.in_vars], axis=1))

    def untiled():
        with torch.inference_mode():
            dsr.model(x, dsr.in_vars)

    def tiled():
        out = ds.orbit.downscale(dsr, device="cpu")
        assert out["2m_temperature_max"].shape == (1, ny * 4, nx * 4)

    t_model = best(untiled, args.repeats)
    t_ds = best(tiled, args.repeats)
    print(
        f"xorbit {xorbit.__version__} ({Path(xorbit.__file__).parent}); {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'grid':>10} {'untiled forward s':>18} {'.orbit.downscale s':>19} {'ratio':>7}")
    print(f"{ny:>4} x {nx:<4} {t_model:>18.2f} {t_ds:>19.2f} {t_ds / t_model:>7.2f}")


if __name__ == "__main__":
    main()
