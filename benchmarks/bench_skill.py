"""Skill of the default training recipe against every statistical baseline, several seeds.

What it measures
    The demo split of the bundled HadCM3 A1B annual air temperature (36 x 48,
    cell-averaged x4 to 9 x 12; train 1860-2040, score 2041-2099, held out).
    For each preset: ``xorbit.train(coarse, fine, ReslimConfig.preset(p, factor=4,
    in_vars=[v], out_vars=[v]), epochs=E, seed=s)`` with every other argument at
    its default, then ``.orbit.downscale(dsr)`` with default tiles; scored with
    ``xorbit.evaluate`` next to ``xorbit.baseline`` for bicubic, climatology,
    ridge and qdm (deterministic: one row each).  Rows give the mean and the
    standard deviation over seeds of RMSE, anomaly R², trend bias and p99 bias.

How to run
    .venv/bin/python benchmarks/bench_skill.py                       # tiny, 3 seeds, 40 epochs
    .venv/bin/python benchmarks/bench_skill.py --presets tiny 9.5m --seeds 0 1 2 --epochs 40
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

import xorbit
from xorbit.baselines import TRAINED
from xorbit.datasets import hadcm3_air_temperature
from xorbit.grid import match_grid

VAR = "air_temperature"
SPLIT = 2040
BASELINES = ("bicubic", "climatology", "ridge", "qdm")
SCORES = ("rmse", "anomaly_r2", "trend_bias", "p99_bias")


def split():
    fine = hadcm3_air_temperature().isel(latitude=slice(0, 36), longitude=slice(0, 48))
    coarse = xorbit.coarsen(fine, 4)
    train = fine.time.dt.year <= SPLIT
    return (
        (coarse.sel(time=train), fine.sel(time=train)),
        coarse.sel(time=~train),
        fine.sel(time=~train),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=40)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    pair, test_coarse, truth = split()
    predictions = {
        m: xorbit.baseline(test_coarse, m, train=pair if m in TRAINED else None, factor=4)
        for m in BASELINES
    }
    truth = match_grid(truth, predictions["bicubic"])
    rows: dict[str, list[dict[str, float]]] = {}
    seconds: dict[str, list[float]] = {}
    for preset in args.presets:
        for seed in args.seeds:
            cfg = xorbit.ReslimConfig.preset(preset, factor=4, in_vars=[VAR], out_vars=[VAR])
            t0 = time.perf_counter()
            dsr = xorbit.train(*pair, cfg, epochs=args.epochs, seed=seed, progress=False)
            seconds.setdefault(preset, []).append(time.perf_counter() - t0)
            pred = test_coarse.orbit.downscale(dsr)
            predictions[f"{preset} (seed {seed})"] = pred
    scores = xorbit.evaluate(predictions, truth).sel(variable=VAR).compute()
    for m in scores.method.values:
        label = str(m).split(" (seed")[0]
        rows.setdefault(label, []).append({k: float(scores[k].sel({"method": m})) for k in SCORES})

    print(
        f"# bench_skill: HadCM3 demo split, train 1860-{SPLIT}, score {SPLIT + 1}-2099; "
        f"epochs {args.epochs}, seeds {args.seeds}; {os.cpu_count()} cores, torch "
        f"{torch.__version__}, xorbit {xorbit.__version__}"
    )
    header = f"{'method':<14}" + "".join(f"{k:>22}" for k in SCORES) + f"{'train s':>10}"
    print(header)
    print("-" * len(header))
    for label, runs in rows.items():
        cells = []
        for k in SCORES:
            v = np.array([r[k] for r in runs])
            cells.append(f"{v.mean():.4f} ± {v.std():.4f}" if len(v) > 1 else f"{v[0]:.4f}")
        t = f"{np.mean(seconds[label]):.0f}" if label in seconds else "-"
        print(f"{label:<14}" + "".join(f"{c:>22}" for c in cells) + f"{t:>10}")


if __name__ == "__main__":
    main()
