"""Orographic precipitation over a real terrain: where the network must earn its keep.

What it measures
    `xorbit.datasets.orographic_precipitation`: rain from the linear theory of
    Smith and Barstow (2004) over matplotlib's ``topobathy.npz`` terrain (88 x
    120 at about 2.5 km), each sample with its own wind and moisture; inputs
    the coarse (x4, cell-averaged) rain and the winds ``u``, ``v``, the fine
    orography as a static field.  Train on the first ``--train`` samples,
    score on the rest (independent draws).

    - ``xorbit``: the library's precipitation recipe, ``xorbit.train(coarse,
      fine, ReslimConfig.preset("tiny", in_vars=["pr", "u", "v"],
      out_vars=["pr"]), static=orography, nonnegative=["pr"])``, then
      ``.orbit.downscale`` (multiplicative coarse-consistency constraint on);
    - ablations: the same model without the constraint (``constrain=False``),
      a model without the static orography, one trained in log space
      (``transforms={"pr": "log1p"}``), one without the linear path;
    - baselines: bicubic, and the local ridge per fine pixel on the coarse rain
      and winds around it (``xorbit.baseline("ridge", predictors=["pr", "u",
      "v"])``), and the same with its window chosen by cross-validation
      (``window="cv"``: the whole grid or 11 x 11 cells, as xorbit's linear
      path chooses);
    - the seam check: a model trained on 12 x 16 crops, downscaled in tiles of
      8 x 12 with halo 2: RMSE within two coarse pixels of a tile seam over
      the RMSE elsewhere.

    Scores: RMSE (mm/day), anomaly R², wet-day frequency (> 0.25 mm/day) and
    p99 over the truth's, domain-mean ratio, per seed.  The last line:
    ``xorbit/ridge RMSE R, xorbit/bicubic RMSE B`` (means over the seeds).

How to run
    .venv/bin/python benchmarks/bench_orographic.py                  # 3 seeds, 40 epochs (~45 min)
    .venv/bin/python benchmarks/bench_orographic.py --ablation-seeds 3   # every ablation, every seed
    .venv/bin/python benchmarks/bench_orographic.py --seeds 0 --epochs 10 --no-ablation
    .venv/bin/python benchmarks/bench_orographic.py --seeds 0 --no-ablation --augment none --epochs 300 [--no-gate] [--cross-fit 5]
    .venv/bin/python benchmarks/bench_orographic.py --seeds 0 --no-ablation --harmonics 2   # engineered inputs
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
from _table import print_seed_table

import xorbit
from xorbit.datasets import orographic_precipitation

WET = 0.25  # mm/day
SEAM_TILE, SEAM_HALO, SEAM_CROP = (8, 12), (2, 2), (12, 16)
#: models trained differently from the recipe (each its own training run)
ABLATIONS = {
    "  no static orography": {"static": None},
    "  log1p transform": {"transforms": {"pr": "log1p"}},
    "  no linear path": {"linear_path": False},
}


def scores(pred: xr.DataArray, truth: xr.DataArray) -> dict[str, float]:
    p, t = pred.values.astype(np.float64), truth.values.astype(np.float64)
    anom = lambda a: a - a.mean(axis=0)  # noqa: E731
    return {
        "rmse": float(np.sqrt(np.mean((p - t) ** 2))),
        "anomaly_r2": float(1 - np.sum((anom(p) - anom(t)) ** 2) / np.sum(anom(t) ** 2)),
        "wet": float((p > WET).mean() / (t > WET).mean()),
        "p99": float(np.percentile(p, 99) / np.percentile(t, 99)),
        "mean": float(p.mean() / t.mean()),
    }


def with_harmonics(coarse: xr.Dataset, n: int) -> tuple[xr.Dataset, list[str]]:
    """``coarse`` with ``pr cos(j θ)``, ``pr sin(j θ)`` (``j = 1 .. n``) of the wind
    direction ``θ`` added, and the names of xorbit's inputs (`probe_orographic.py`)."""
    theta = np.arctan2(coarse.v, coarse.u)
    extra = {}
    for j in range(1, n + 1):
        extra[f"pr_cos{j}"] = coarse.pr * np.cos(j * theta)
        extra[f"pr_sin{j}"] = coarse.pr * np.sin(j * theta)
    return coarse.assign(extra), ["pr", "u", "v", *extra]


def seam_ratio(pred: xr.DataArray, truth: xr.DataArray, tile: tuple[int, int], k: int) -> float:
    """RMSE within two coarse pixels of a tile seam over the RMSE elsewhere."""
    err = (pred.values - truth.values) ** 2
    ny, nx = err.shape[-2:]
    near = np.zeros((ny, nx), bool)
    for axis, (n, t) in enumerate(zip((ny, nx), tile, strict=True)):
        for seam in range(t * k, n, t * k):
            sl = slice(max(0, seam - 2 * k), seam + 2 * k)
            if axis == 0:
                near[sl, :] = True
            else:
                near[:, sl] = True
    return float(np.sqrt(err[..., near].mean()) / np.sqrt(err[..., ~near].mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--samples", type=int, default=350)
    ap.add_argument("--train", type=int, default=250)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--augment", default=None, help="TrainOptions.augment (library default: auto)")
    ap.add_argument("--crops-per-time", type=int, default=None)
    ap.add_argument("--no-gate", action="store_true", help="keep the correction (gate=False)")
    ap.add_argument("--cross-fit", type=int, default=None, help="TrainOptions.cross_fit")
    ap.add_argument(
        "--harmonics",
        type=int,
        default=0,
        help="give xorbit pr cos(n θ), pr sin(n θ) of the wind direction θ, n = 1..N, as inputs",
    )
    ap.add_argument(
        "--ablation-seeds",
        type=int,
        default=1,
        help="train the ablation models (no orography, log1p, no linear path) for the first N seeds",
    )
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    coarse, fine, orog = orographic_precipitation(args.samples, seed=0)
    coarse, inputs = with_harmonics(coarse, args.harmonics)
    train = {"time": slice(0, args.train)}
    test = {"time": slice(args.train, None)}
    ct, ft = coarse.isel(train), fine.isel(train)
    cs, truth = coarse.isel(test), fine.isel(test).pr
    static = xr.Dataset({"orog": orog})
    rows: dict[str, list[dict[str, float]]] = {}
    bicubic = xorbit.baseline(cs[["pr"]], "bicubic", factor=4).pr
    ridge = xorbit.baseline(cs, "ridge", train=(ct, ft), predictors=["pr", "u", "v"]).pr
    rows["bicubic"] = [scores(bicubic, truth)]
    rows["ridge (pr, u, v)"] = [scores(ridge, truth)]
    # the same ridge with its window chosen by cross-validation, as xorbit's path is
    ridge_cv = xorbit.baseline(
        cs, "ridge", train=(ct, ft), predictors=["pr", "u", "v"], window="cv"
    ).pr
    rows["ridge, window by cv"] = [scores(ridge_cv, truth)]
    seconds: dict[str, list[float]] = {}

    def run(label, seed, pred_kw=None, **train_kw):
        cfg = xorbit.ReslimConfig.preset(args.preset, factor=4, in_vars=inputs, out_vars=["pr"])
        options = dict(
            static=static,
            nonnegative=["pr"],
            augment=args.augment,
            crops_per_time=args.crops_per_time,
            gate=False if args.no_gate else None,
            cross_fit=args.cross_fit,
        )
        options |= train_kw
        options = {k: v for k, v in options.items() if v is not None}
        t0 = time.perf_counter()
        dsr = xorbit.train(ct, ft, cfg, epochs=args.epochs, seed=seed, progress=False, **options)
        seconds.setdefault(label, []).append(time.perf_counter() - t0)
        return dsr

    seams = []
    for seed in args.seeds:
        dsr = run("xorbit", seed)
        rows.setdefault("xorbit", []).append(scores(cs.orbit.downscale(dsr).pr, truth))
        if args.no_ablation:
            continue
        rows.setdefault("  no constraint", []).append(
            scores(cs.orbit.downscale(dsr, constrain=False).pr, truth)
        )
        tiled = run("  12 x 16 crops, tiled", seed, crop=SEAM_CROP)
        out = cs.orbit.downscale(tiled, tile=SEAM_TILE, halo=SEAM_HALO).pr
        rows.setdefault("  12 x 16 crops, tiled", []).append(scores(out, truth))
        seams.append(seam_ratio(out, truth, SEAM_TILE, 4))
        if seed not in args.seeds[: args.ablation_seeds]:
            continue
        for label, kw in ABLATIONS.items():
            model = run(label, seed, **kw)
            rows.setdefault(label, []).append(scores(cs.orbit.downscale(model).pr, truth))

    print(
        f"# bench_orographic: {args.train} training and {args.samples - args.train} test samples, "
        f"preset {args.preset}, epochs {args.epochs}, seeds {args.seeds}; {os.cpu_count()} cores, "
        f"torch {torch.__version__}, xorbit {xorbit.__version__}"
    )
    keys = ("rmse", "anomaly_r2", "wet", "p99", "mean")
    print_seed_table(rows, keys, seconds, width=26, column=18, time_column=9)
    if seams:
        print(
            f"seam RMSE ratio (tiles {SEAM_TILE}, halo {SEAM_HALO}): "
            + ", ".join(f"{s:.3f}" for s in seams)
        )
    mean = lambda label: np.mean([r["rmse"] for r in rows[label]])  # noqa: E731
    print(f"xorbit/ridge with window by cv RMSE {mean('xorbit') / mean('ridge, window by cv'):.3f}")
    r = mean("xorbit") / mean("ridge (pr, u, v)")
    b = mean("xorbit") / mean("bicubic")
    print(f"xorbit/ridge RMSE {r:.3f}, xorbit/bicubic RMSE {b:.3f}")


if __name__ == "__main__":
    main()
