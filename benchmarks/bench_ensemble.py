"""Calibrated ensembles by construction: a stochastic Reslim trained on the fair CRPS.

What it measures
    The demo split of the bundled HadCM3 A1B annual air temperature (36 x 48,
    cell-averaged x4 to 9 x 12; train 1860-2040, score the held-out years).
    Per training seed, two models with the demo recipe
    (``ReslimConfig.preset("tiny", ...)``, ``xorbit.train(..., epochs=E,
    seed=s)``, every other argument at its default):

    - ``deterministic``: the demo model itself;
    - ``stochastic``: the same call with ``ensemble=M`` (noise channels, the
      fair CRPS over ``M`` members per sample), downscaled as ``N`` members
      (``.orbit.downscale(dsr, samples=N, seed=0)``), with no fitted factor.

    Scores on 2041-2099 and on 2071-2099 (the years the calibrated MC-dropout
    ensemble of `bench_calibration.py` is scored on: CRPS 0.123 K): RMSE of
    the deterministic model, of the member at zero noise and of the ensemble
    mean; MAE of the mean; CRPS; spread-skill; the rank histogram's flatness
    (Candille-Talagrand delta, about 1 when flat); the gradient energy of the
    members, the mean and the deterministic field over the truth's; RALSD of
    the members.  ``rmse_inf`` is the RMSE the mean of infinitely many members
    would have: the N-member mean's squared error less ``var / N`` (the
    sampling variance of a mean of N members; independent members only).
    Cost: members per second against deterministic downscales per second.
    Means and spreads over the seeds come last.

How to run
    .venv/bin/python benchmarks/bench_ensemble.py                      # 3 seeds, M 8, N 16, 40 epochs
    .venv/bin/python benchmarks/bench_ensemble.py --ensemble 4
    .venv/bin/python benchmarks/bench_ensemble.py --seeds 0 --epochs 10
    .venv/bin/python benchmarks/bench_ensemble.py --cross-fit 5        # out-of-fold residuals
    .venv/bin/python benchmarks/bench_ensemble.py --no-linear-path     # the network alone
    .venv/bin/python benchmarks/bench_ensemble.py --tv-lambda 0        # no TV prior on the members
    .venv/bin/python benchmarks/bench_ensemble.py --drop-rate 0.1      # dropout in training too
    .venv/bin/python benchmarks/bench_ensemble.py --noise-members mirrored
    .venv/bin/python benchmarks/bench_ensemble.py --draw antithetic     # the same models, z and -z
    .venv/bin/python benchmarks/bench_ensemble.py --noise-members mirrored --augment none

Trained models are kept in ``--cache`` (default ``$TMPDIR/xorbit-ensemble``)
and reused by later runs with the same settings.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from bench_calibration import SPLIT, trained

import xorbit
from xorbit.datasets import hadcm3_air_temperature
from xorbit.grid import match_grid
from xorbit.metrics import (
    crps,
    gradient_energy,
    mae,
    ralsd,
    rank_flatness,
    rmse,
    spread_skill,
)
from xorbit.model.config import NOISE_MEMBERS

LATE = 2070  # the MC-dropout benchmark scores its calibrated ensemble on 2071-2099
KEYS = (
    "rmse_det",
    "rmse_zero",
    "rmse_mean",
    "rmse_inf",
    "mae_mean",
    "crps",
    "crps/mae",
    "ssr",
    "rank_delta",
    "ge_member",
    "ge_mean",
    "ge_det",
    "ralsd",
)


def scores(members, det, truth, independent: bool = True) -> dict[str, float]:
    mean = members.mean("sample")
    g = float(gradient_energy(truth))
    n = members.sizes["sample"]
    # the mean of infinitely many members: the N-member mean's squared error
    # less the sampling variance of a mean of N independent members, var / N
    # (paired members are not independent: not estimated)
    inf = float(rmse(mean, truth)) ** 2 - float(members.var("sample", ddof=1).mean()) / n
    return {
        "rmse_det": float(rmse(det, truth)),
        "rmse_zero": float("nan"),  # filled by the caller
        "rmse_mean": float(rmse(mean, truth)),
        "rmse_inf": float(np.sqrt(inf)) if independent else float("nan"),
        "mae_mean": float(mae(mean, truth)),
        "crps": float(crps(members, truth)),
        "crps/mae": float(crps(members, truth)) / float(mae(mean, truth)),
        "ssr": float(spread_skill(members, truth)),
        "rank_delta": rank_flatness(members, truth),
        "ge_member": float(gradient_energy(members)) / g,
        "ge_mean": float(gradient_energy(mean)) / g,
        "ge_det": float(gradient_energy(det)) / g,
        "ralsd": float(ralsd(members, truth)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--ensemble", type=int, default=8, help="members per training sample (M)")
    ap.add_argument("--samples", type=int, default=16, help="members downscaled (N)")
    ap.add_argument("--cross-fit", type=int, default=None, help="TrainOptions.cross_fit")
    ap.add_argument("--no-linear-path", action="store_true", help="linear_path=False")
    ap.add_argument("--tv-lambda", type=float, default=None, help="TrainOptions.tv_lambda")
    ap.add_argument("--augment", default=None, help="TrainOptions.augment")
    ap.add_argument("--drop-rate", type=float, default=0.0, help="the stochastic model's dropout")
    ap.add_argument(
        "--noise-members",
        choices=NOISE_MEMBERS,
        default=None,
        help="ReslimConfig.noise_members (default: the config's)",
    )
    ap.add_argument(
        "--draw",
        choices=("independent", "antithetic"),
        default=None,
        help="draw the members so (Downscaler.drawn; default: as trained)",
    )
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "xorbit-ensemble")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)

    fine = hadcm3_air_temperature()
    coarse = xorbit.coarsen(fine, 4)
    test = coarse.sel(time=coarse.time.dt.year > SPLIT)
    options = {"ensemble": args.ensemble}
    if args.cross_fit:
        options["cross_fit"] = args.cross_fit
    if args.no_linear_path:
        options["linear_path"] = False
    if args.tv_lambda is not None:
        options["tv_lambda"] = args.tv_lambda
    if args.augment is not None:
        options["augment"] = args.augment
    periods = {"2041-2099": slice(None), f"{LATE + 1}-2099": slice(str(LATE + 1), None)}
    rows: dict[str, list[dict[str, float]]] = {p: [] for p in periods}
    cost = []
    for seed in args.seeds:
        demo = trained(coarse, fine, args.epochs, seed, args.cache)
        drop = {"drop_rate": args.drop_rate} if args.drop_rate else {}
        if args.noise_members:
            drop["noise_members"] = args.noise_members
        ens = trained(coarse, fine, args.epochs, seed, args.cache, options, **drop)
        if args.draw:
            ens = ens.drawn(args.draw)
        det = test.orbit.downscale(demo, device="cpu").compute()
        t0 = time.perf_counter()
        zero = test.orbit.downscale(ens, device="cpu").compute()
        det_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        members = test.orbit.downscale(ens, device="cpu", samples=args.samples, seed=0).compute()
        mem_s = time.perf_counter() - t0
        cost.append((args.samples / mem_s) / (1 / det_s))
        truth = match_grid(fine.sel(time=fine.time.dt.year > SPLIT), det)
        for name, sel in periods.items():
            r = scores(
                members.sel(time=sel),
                det.sel(time=sel),
                truth.sel(time=sel),
                independent=ens.config.noise_members == "independent",
            )
            r["rmse_zero"] = float(rmse(zero.sel(time=sel), truth.sel(time=sel)))
            rows[name].append(r)
            print(f"seed {seed} {name}: " + ", ".join(f"{k} {r[k]:.4f}" for k in KEYS), flush=True)
        print(
            f"seed {seed}: {args.samples} members in {mem_s:.2f} s, one deterministic "
            f"downscale in {det_s:.2f} s: members/s over downscales/s {cost[-1]:.2f}",
            flush=True,
        )
    print(
        f"\nstochastic tiny, ensemble={args.ensemble}, {args.samples} members, "
        f"{args.epochs} epochs, seeds {args.seeds}"
        f"{f', cross_fit={args.cross_fit}' if args.cross_fit else ''}"
        f"{', linear_path=False' if args.no_linear_path else ''}"
        f"{f', tv_lambda={args.tv_lambda}' if args.tv_lambda is not None else ''}"
        f"{f', augment={args.augment}' if args.augment is not None else ''}"
        f"{f', drop_rate={args.drop_rate}' if args.drop_rate else ''}"
        f"{f', noise_members={args.noise_members}' if args.noise_members else ''}"
        f"{f', drawn {args.draw}' if args.draw else ''}"
        "; mean ± std over seeds"
    )
    for name, runs in rows.items():
        print(f"\n{name}")
        for k in KEYS:
            v = np.array([r[k] for r in runs])
            print(
                f"  {k:<11} {v.mean():.4f} ± {v.std():.4f}   ({', '.join(f'{x:.4f}' for x in v)})"
            )
    print(f"\nmembers/s over deterministic downscales/s: {np.mean(cost):.2f}")


if __name__ == "__main__":
    main()
