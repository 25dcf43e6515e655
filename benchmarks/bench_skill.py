"""Skill of the default training recipe against every statistical baseline, several seeds.

What it measures
    The demo split of the bundled HadCM3 A1B annual air temperature (36 x 48,
    cell-averaged x4 to 9 x 12; train 1860-2040, score 2041-2099, held out),
    or with ``--scenario E1`` every A1B year for training and every year of
    the E1 scenario (same model and region) held out.
    For each preset: ``xorbit.train(coarse, fine, ReslimConfig.preset(p, factor=4,
    in_vars=[v], out_vars=[v]), epochs=E, seed=s)`` with every other argument at
    its default, then ``.orbit.downscale(dsr)`` with default tiles; scored with
    ``xorbit.evaluate`` next to ``xorbit.baseline`` for bicubic, climatology,
    ridge and qdm (deterministic: one row each).  Rows give the mean and the
    standard deviation over seeds of RMSE, anomaly R², trend bias and p99 bias.

    ``--ablation`` instead trains the cumulative recipes of `ABLATION`, from
    the recipe of xorbit 0.1 (row A) to today's defaults (last row), each row
    adding one choice, for every preset and seed: the table of
    docs/training.md.

How to run
    .venv/bin/python benchmarks/bench_skill.py                       # tiny, 3 seeds, 40 epochs
    .venv/bin/python benchmarks/bench_skill.py --presets tiny 9.5m --seeds 0 1 2 --epochs 40
    .venv/bin/python benchmarks/bench_skill.py --ablation            # ~15 min on 2 cores
    .venv/bin/python benchmarks/bench_skill.py --scenario E1         # the held-out scenario
    .venv/bin/python benchmarks/bench_skill.py --workers 2           # DDP, 2 workers x 1 thread
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from _table import print_seed_table

import xorbit
from xorbit.baselines import TRAINED
from xorbit.datasets import hadcm3_air_temperature
from xorbit.grid import match_grid

VAR = "air_temperature"
SPLIT = 2040
BASELINES = ("bicubic", "climatology", "ridge", "qdm")
SCORES = ("rmse", "anomaly_r2", "trend_bias", "p99_bias")
OLD_TILES = dict(tile=(24, 48), halo=(4, 8))  # the 0.1 default windows of img_size 32 x 64

# The recipe of xorbit 0.1 as overrides of today's defaults: (config, train).
OLD = (
    dict(interp_skip="none", drop_rate=0.1, drop_path=0.1, learn_pos_embed=False),
    dict(
        climatology=False,
        augment="none",
        crops_per_time=1,
        lr=2e-3,
        batch_size=16,
        tv_lambda=0.02,
        val_fraction=0.2,
        **OLD_TILES,
    ),
)

# Cumulative ablation: each row drops more of the old overrides (so it adds one
# choice of today's default recipe to the row above); the last row is the default.
ABLATION = [
    ("A 0.1 defaults", ()),
    ("B +bicubic skip, zero-init", ("interp_skip",)),
    ("C +one window (small domain)", ("tile", "halo")),
    ("D +anomalies (climatology)", ("climatology",)),
    ("E +amplitude augmentation x4", ("augment", "crops_per_time")),
    (
        "F +learnt positions, no dropout, lr/batch/TV",
        ("learn_pos_embed", "drop_rate", "drop_path", "lr", "batch_size", "tv_lambda"),
    ),
    ("G +train on all years", ("val_fraction",)),
]


def recipes(ablation: bool):
    """(name, config overrides, train overrides) to run; cumulative for the ablation."""
    if not ablation:
        yield "defaults", {}, {}
        return
    dropped: set[str] = set()
    for name, keys in ABLATION:
        dropped |= set(keys)
        cfg = {k: v for k, v in OLD[0].items() if k not in dropped}
        train = {k: v for k, v in OLD[1].items() if k not in dropped}
        yield name, cfg, train


def split(scenario: str = "demo"):
    """(training pair, coarse test input, test truth): the demo split, or held-out E1."""
    fine = hadcm3_air_temperature().isel(latitude=slice(0, 36), longitude=slice(0, 48))
    coarse = xorbit.coarsen(fine, 4)
    if scenario == "E1":  # every A1B year trains, every E1 year is scored
        other = hadcm3_air_temperature(scenario="E1")
        return (coarse, fine), xorbit.coarsen(other, 4), other
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
    ap.add_argument("--ablation", action="store_true", help="the cumulative recipes of ABLATION")
    ap.add_argument(
        "--scenario",
        choices=("demo", "E1"),
        default="demo",
        help="demo: train 1860-2040, score 2041-2099; E1: train every A1B year, score every E1 year",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=0,
        help="train with DDP on a LocalCluster of this many workers x 1 thread (0: one process)",
    )
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    pair, test_coarse, truth = split(args.scenario)
    client = None
    if args.workers:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True)
        client = Client(cluster)
    predictions = {
        m: xorbit.baseline(test_coarse, m, train=pair if m in TRAINED else None, factor=4)
        for m in BASELINES
    }
    truth = match_grid(truth, predictions["bicubic"])
    rows: dict[str, list[dict[str, float]]] = {}
    seconds: dict[str, list[float]] = {}
    for preset in args.presets:
        for name, cfg_kw, train_kw in recipes(args.ablation):
            label = preset if not args.ablation else f"{preset} {name}"
            if args.workers:
                label += f" DDP x{args.workers}"
            for seed in args.seeds:
                cfg = xorbit.ReslimConfig.preset(
                    preset, factor=4, **{"in_vars": [VAR], "out_vars": [VAR], **cfg_kw}
                )
                t0 = time.perf_counter()
                dsr = xorbit.train(
                    *pair,
                    cfg,
                    epochs=args.epochs,
                    seed=seed,
                    progress=False,
                    client=client,
                    **train_kw,
                )
                seconds.setdefault(label, []).append(time.perf_counter() - t0)
                tiles = {k: train_kw[k] for k in ("tile", "halo") if k in train_kw}
                predictions[f"{label} (seed {seed})"] = test_coarse.orbit.downscale(dsr, **tiles)
    scores = xorbit.evaluate(predictions, truth).sel(variable=VAR).compute()
    for m in scores.method.values:
        label = str(m).split(" (seed")[0]
        rows.setdefault(label, []).append({k: float(scores[k].sel({"method": m})) for k in SCORES})

    where = (
        f"HadCM3 demo split, train 1860-{SPLIT}, score {SPLIT + 1}-2099"
        if args.scenario == "demo"
        else "HadCM3, train every A1B year, score every E1 year (held-out scenario)"
    )
    print(
        f"# bench_skill: {where}; "
        f"epochs {args.epochs}, seeds {args.seeds}, DDP workers {args.workers or 'none'}; "
        f"{os.cpu_count()} cores, torch "
        f"{torch.__version__}, xorbit {xorbit.__version__}"
    )
    width = max(14, *(len(str(m).split(" (seed")[0]) + 2 for m in scores.method.values))
    print_seed_table(rows, tuple(SCORES), seconds, width=width, column=22, time_column=10)


if __name__ == "__main__":
    main()
