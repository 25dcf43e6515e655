"""MC-dropout ensembles on held-out years: CRPS, spread-skill, and one-parameter calibration.

What it measures
    The demo split of the bundled HadCM3 A1B annual air temperature (36 x 48,
    cell-averaged x4 to 9 x 12; train 1860-2040, score 2041-2099, held out).
    Two models with the demo recipe (``ReslimConfig.preset("tiny", ...)``,
    ``xorbit.train(..., epochs=E, seed=s)``, every other argument at its
    default): the demo model itself (no dropout), and the same recipe with
    ``drop_rate`` (and optionally ``drop_path``) switched on.  The dropout model
    downscales the held-out years deterministically and as an MC-dropout
    ensemble of ``N`` members (``.orbit.downscale(dsr, samples=N, seed=0)``).
    The spread scale ``alpha`` (`xorbit.metrics.spread_scale`) is fitted on the
    first half of the held-out years (2041-2070) and applied to the second half
    (2071-2099) with `xorbit.metrics.scale_spread`.

How to run
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_calibration.py
    .venv/bin/python benchmarks/bench_calibration.py --members 32 --drop-rate 0.1 --epochs 40

Trained models are kept in ``--cache`` (default ``$TMPDIR/xorbit-calibration``)
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

import torch

import xorbit
from xorbit.datasets import hadcm3_air_temperature
from xorbit.grid import match_grid

VAR = "air_temperature"
SPLIT = 2040
CALIBRATE_UNTIL = 2070  # alpha is fitted on 2041-2070, scored on 2071-2099


def trained(
    coarse, fine, epochs: int, seed: int, cache: Path, options=None, **overrides
) -> xorbit.Downscaler:
    """The demo recipe with config ``overrides`` and training ``options``, trained
    once and cached (also for `bench_ensemble.py`)."""
    options = options or {}
    tag = "_".join(f"{k}{v}" for k, v in sorted({**overrides, **options}.items())) or "demo"
    path = cache / f"tiny_{tag}_e{epochs}_s{seed}.xorbit"
    if path.exists():
        return xorbit.load(path)
    config = xorbit.ReslimConfig.preset(
        "tiny", factor=4, in_vars=[VAR], out_vars=[VAR], **overrides
    )
    is_train = fine.time.dt.year <= SPLIT
    t0 = time.perf_counter()
    dsr = xorbit.train(
        coarse.sel(time=is_train),
        fine.sel(time=is_train),
        config,
        epochs=epochs,
        seed=seed,
        device="cpu",
        progress=False,
        **options,
    )
    print(f"trained {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    dsr.save(path)
    return dsr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--mc-seed", type=int, default=0, help="seed of the dropout masks")
    ap.add_argument("--drop-rate", type=float, default=0.1)
    ap.add_argument("--drop-path", type=float, default=0.0)
    ap.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "xorbit-calibration"
    )
    ap.add_argument("--train-only", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", category=UserWarning)

    fine = hadcm3_air_temperature()
    coarse = xorbit.coarsen(fine, 4)
    overrides = {"drop_rate": args.drop_rate}
    if args.drop_path:
        overrides["drop_path"] = args.drop_path
    demo = trained(coarse, fine, args.epochs, args.seed, args.cache)
    drop = trained(coarse, fine, args.epochs, args.seed, args.cache, **overrides)
    if args.train_only:
        return
    report(coarse, fine, demo, drop, args)


def report(coarse, fine, demo, drop, args) -> None:
    from xorbit.metrics import crps, mae, rmse, scale_spread, spread_scale, spread_skill

    test = coarse.sel(time=coarse.time.dt.year > SPLIT)
    det_demo = test.orbit.downscale(demo, device="cpu")
    det_drop = test.orbit.downscale(drop, device="cpu")
    truth = match_grid(fine.sel(time=fine.time.dt.year > SPLIT), det_demo)
    t0 = time.perf_counter()
    members = test.orbit.downscale(drop, device="cpu", samples=args.members, seed=args.mc_seed)
    mc_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    test.orbit.downscale(drop, device="cpu")
    det_s = time.perf_counter() - t0

    first = truth.time.dt.year <= CALIBRATE_UNTIL
    cal = {"time": first.values}
    val = {"time": ~first.values}
    alpha = float(spread_scale(members.isel(cal), truth.isel(cal)))
    scaled = scale_spread(members, alpha)

    def row(name, sel):
        m, t = members.isel(sel), truth.isel(sel)
        s = scaled.isel(sel)
        return (
            name,
            float(rmse(det_demo.isel(sel), t)),
            float(rmse(det_drop.isel(sel), t)),
            float(rmse(m.mean("sample"), t)),
            float(mae(det_drop.isel(sel), t)),
            float(crps(m, t)),
            float(spread_skill(m, t)),
            float(crps(s, t)),
            float(spread_skill(s, t)),
        )

    rows = [
        row("2041-2099", {"time": slice(None)}),
        row(f"2041-{CALIBRATE_UNTIL} (fit)", cal),
        row(f"{CALIBRATE_UNTIL + 1}-2099", val),
    ]
    print(
        f"\nMC-dropout, {args.members} members (mask seed {args.mc_seed}); training seed "
        f"{args.seed}, {args.epochs} epochs, overrides drop_rate={args.drop_rate}"
        f"{f', drop_path={args.drop_path}' if args.drop_path else ''}; "
        f"alpha = {alpha:.3f} (fitted on 2041-{CALIBRATE_UNTIL})"
    )
    print(
        f"downscaling the {test.sizes['time']} held-out years: deterministic {det_s:.2f} s, "
        f"{args.members} members {mc_s:.2f} s ({mc_s / det_s:.1f} x)"
    )
    head = (
        "years",
        "RMSE demo",
        "RMSE drop",
        "RMSE ens.mean",
        "MAE drop",
        "CRPS raw",
        "SSR raw",
        "CRPS scaled",
        "SSR scaled",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r[0]} | " + " | ".join(f"{v:.4f}" for v in r[1:]) + " |")


if __name__ == "__main__":
    main()
