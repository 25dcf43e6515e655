"""Skill against halo: does a thinner halo (faster, fewer tiles) cost accuracy at the seams?

Run: ``.venv/bin/python benchmarks/bench_halo_skill.py [--quick]``

A ``tiny`` model with 32 x 64 windows (the presets' ``img_size``) is trained on
random 32 x 64 crops of generated fields (a power-law spectrum, slope 3, plus a
fixed large-scale pattern) on a 64 x 128 coarse domain, x4, with the default
recipe.  Held-out fields are downscaled with ``.orbit.downscale`` at several
halos (the window stays 32 x 64, the core shrinks as the halo grows) and
scored: RMSE over every pixel, and RMSE over the fine pixels within 2 coarse
pixels of a tile seam (a core boundary inside the domain), where a missing
context would show.  Seeds vary the training; the table gives mean and spread.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import xarray as xr

import xorbit
from tests.datasets import powerlaw_field
from xorbit.tiles import TilePlan

NY, NX, K = 64, 128, 4
HALOS = [(4, 8), (2, 4), (1, 2)]


def fields(nt: int, seed: int) -> xr.DataArray:
    fy, fx = NY * K, NX * K
    lat = 20.0 + 0.25 / K * np.arange(fy)
    lon = 200.0 + 0.25 / K * np.arange(fx)
    pattern = 5 * np.cos(np.deg2rad(8 * lat))[:, None] * np.sin(np.deg2rad(6 * lon))[None, :]
    data = 280 + pattern + 3 * powerlaw_field((nt, fy, fx), seed=seed)
    return xr.DataArray(
        data.astype(np.float32),
        dims=("time", "lat", "lon"),
        coords={"time": np.arange(nt), "lat": lat, "lon": lon},
        name="tas",
        attrs={"units": "K"},
    )


def seam_mask(tile: tuple[int, int], halo: tuple[int, int]) -> np.ndarray:
    """Fine pixels within 2 coarse pixels of an inner core boundary."""
    plan = TilePlan.build((NY, NX), tile, halo, K)
    mask = np.zeros((NY * K, NX * K), bool)
    for axis, ap in ((0, plan.y), (1, plan.x)):
        for s in ap.starts[1:]:
            lo, hi = max(0, (s - 2) * K), (s + 2) * K
            if axis == 0:
                mask[lo:hi] = True
            else:
                mask[:, lo:hi] = True
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    nt_train, nt_test = (16, 4) if args.quick else (48, 12)
    epochs = 2 if args.quick else args.epochs
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    fine = fields(nt_train + nt_test, seed=0)
    coarse = xorbit.coarsen(fine, K)
    train = slice(0, nt_train)
    test = slice(nt_train, None)
    truth = fine.isel(time=test).values
    rows: dict[tuple[int, int], list[tuple[float, float]]] = {h: [] for h in HALOS}
    bicubic = coarse.isel(time=test).orbit.interpolate(factor=K, method="bicubic").values
    for seed in range(args.seeds):
        cfg = xorbit.ReslimConfig.preset("tiny", in_vars=["tas"], out_vars=["tas"], factor=K)
        dsr = xorbit.train(
            coarse.isel(time=train), fine.isel(time=train), cfg,
            epochs=epochs, seed=seed, progress=False, device="cpu",
        )  # fmt: skip
        for halo in HALOS:
            tile = (32 - 2 * halo[0], 64 - 2 * halo[1])
            pred = coarse.isel(time=test).orbit.downscale(dsr, tile=tile, halo=halo).values
            err = (pred - truth) ** 2
            seam = seam_mask(tile, halo)
            rows[halo].append((float(np.sqrt(err.mean())), float(np.sqrt(err[..., seam].mean()))))
    print(f"\nbicubic RMSE {np.sqrt(((bicubic - truth) ** 2).mean()):.4f} K")
    print(f"\n| halo | tile | RMSE K (mean ± sd, {args.seeds} seeds) | seam-band RMSE K |")
    print("|---|---|--:|--:|")
    for halo, vals in rows.items():
        a = np.array(vals)
        tile = (32 - 2 * halo[0], 64 - 2 * halo[1])
        print(
            f"| {halo} | {tile} | {a[:, 0].mean():.4f} ± {a[:, 0].std():.4f} "
            f"| {a[:, 1].mean():.4f} ± {a[:, 1].std():.4f} |"
        )


if __name__ == "__main__":
    main()
