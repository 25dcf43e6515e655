"""Fine-tuning a pretrained model to a new region with few years, against training from scratch.

What it measures
    The bundled HadCM3 A1B annual air temperature (36 x 48 fine cells, x4 to
    9 x 12 coarse) split into a west half (longitudes 0-23 of the fine grid)
    and an east half (24-47).  ``9.5m`` is pretrained on every year of the
    west half.  On the east half, with only the ``N`` years before 2040 for
    training (``--years``, default 10, 30 and 60), it is fine-tuned
    (``xorbit.train(..., init=pretrained)``, library defaults) and compared
    with ``tiny`` and ``9.5m`` trained from scratch on the same years, and
    with ``xorbit.baseline("ridge")``; everything is scored on the east
    half's held-out years 2040-2099 (RMSE and anomaly R², `xorbit.evaluate`).
    The same again without the linear path (``linear_path=False`` in
    pretraining and after: the network learns the whole map, the
    foundation-model way), with ``pretrained_lr_scale=0.3`` and
    ``freeze="blocks"`` on 30 years.  One more row fine-tunes the pretrained
    one-input model to a set with one more input (``coord_latitude``) on 30
    years.  Each seed pretrains its own
    model (cached in ``--cache``, so a second run skips it).

    ``--ablation`` instead fine-tunes on 30 years with each ``freeze``,
    ``pretrained_lr_scale`` and ``gate`` of `CHOICES` (the measurement behind
    the defaults), and trains ``tiny`` and ``9.5m`` from scratch without the gate.

How to run
    .venv/bin/python benchmarks/bench_finetune.py                     # 3 seeds, ~25 min on 2 cores
    .venv/bin/python benchmarks/bench_finetune.py --seeds 0 --years 30
    .venv/bin/python benchmarks/bench_finetune.py --ablation --seeds 0
    .venv/bin/python benchmarks/bench_finetune.py --swap --seeds 0   # the other split
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from _table import print_seed_table

import xorbit
from xorbit.datasets import hadcm3_air_temperature
from xorbit.grid import match_grid

VAR = "air_temperature"
TEST_FROM = 2040
SCORES = ("rmse", "anomaly_r2")
HALF = 24  # fine longitudes of the west half
# (label, train overrides) of the ablation: freeze and the pretrained learning rate
CHOICES = [
    ("all train, lr x1", dict(freeze=None, pretrained_lr_scale=1.0)),
    ("all train, lr x0.3", dict(freeze=None, pretrained_lr_scale=0.3)),
    ("all train, lr x0.1", dict(freeze=None, pretrained_lr_scale=0.1)),
    ("blocks frozen", dict(freeze="blocks", pretrained_lr_scale=1.0)),
    ("encoder frozen", dict(freeze="encoder", pretrained_lr_scale=1.0)),
    ("gate off", dict(gate=False)),
    ("gate off, blocks frozen", dict(gate=False, freeze="blocks")),
]


def regions():
    """(west fine, east fine): the two halves of the bundled domain."""
    fine = hadcm3_air_temperature().isel(latitude=slice(0, 36), longitude=slice(0, 48))
    return fine.isel(longitude=slice(0, HALF)), fine.isel(longitude=slice(HALF, 2 * HALF))


def config(preset: str) -> xorbit.ReslimConfig:
    return xorbit.ReslimConfig.preset(preset, factor=4, in_vars=[VAR], out_vars=[VAR])


def pretrain(west, seed: int, epochs: int, cache: Path, linear_path: bool = True):
    """``9.5m`` on every year of the west half (read from ``cache`` when there);
    ``linear_path=False``: the network learns the whole map (no ridge path)."""
    kind = "" if linear_path else "_nolin"
    path = cache / f"pretrained_9.5m{kind}_seed{seed}_e{epochs}.xorbit"
    if path.exists():
        return xorbit.load(path)
    t0 = time.perf_counter()
    dsr = xorbit.train(
        xorbit.coarsen(west, 4),
        west,
        config("9.5m"),
        epochs=epochs,
        seed=seed,
        progress=False,
        linear_path=linear_path,
    )
    print(
        f"# pretrained 9.5m{kind} seed {seed} on the pretraining half in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    dsr.save(path)
    return dsr


def east_split(east, years: int):
    """(training pair, test coarse, test truth): the ``years`` before 2040, then 2040-2099."""
    year = east.time.dt.year
    train = east.sel(time=(year >= TEST_FROM - years) & (year < TEST_FROM))
    test = east.sel(time=year >= TEST_FROM)
    return (xorbit.coarsen(train, 4), train), xorbit.coarsen(test, 4), test


def runs(args, pre: xorbit.Downscaler, pre_nolin: xorbit.Downscaler | None):
    """(label, years, config or None, train keywords) of one seed."""
    if args.ablation:
        for label, kw in CHOICES:
            yield f"fine-tuned 9.5m, {label}", 30, None, dict(init=pre, **kw)
        for preset in ("tiny", "9.5m"):
            yield f"{preset} from scratch, gate off", 30, config(preset), dict(gate=False)
        return
    nolin = dict(linear_path=False)
    for n in args.years:
        yield f"fine-tuned 9.5m, {n} y", n, None, dict(init=pre)
        yield f"tiny from scratch, {n} y", n, config("tiny"), {}
        yield f"9.5m from scratch, {n} y", n, config("9.5m"), {}
        if pre_nolin is not None:
            # the foundation-model way: the network learns the whole map, no ridge path
            yield f"no path: fine-tuned 9.5m, {n} y", n, None, dict(init=pre_nolin, **nolin)
            yield f"no path: 9.5m from scratch, {n} y", n, config("9.5m"), nolin
            if n == 30:
                for label, kw in (
                    ("lr x0.3", dict(pretrained_lr_scale=0.3)),
                    ("blocks frozen", dict(freeze="blocks")),
                ):
                    yield (
                        f"no path: fine-tuned 9.5m, {label}, {n} y",
                        n,
                        None,
                        dict(init=pre_nolin, **nolin, **kw),
                    )
    more = xorbit.ReslimConfig.preset(
        "9.5m", factor=4, in_vars=[VAR, "coord_latitude"], out_vars=[VAR]
    )
    yield "fine-tuned 9.5m + coord_latitude input, 30 y", 30, more, dict(init=pre)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--years", nargs="+", type=int, default=[10, 30, 60])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--ablation", action="store_true", help="freeze / lr choices on 30 years")
    ap.add_argument(
        "--swap", action="store_true", help="pretrain on the east half, fine-tune on the west"
    )
    ap.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "xorbit_bench_finetune"
    )
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    args.cache.mkdir(parents=True, exist_ok=True)
    west, east = regions()
    if args.swap:  # the other way round: pretrain on the east half, fine-tune on the west
        west, east = east, west
        args.cache = args.cache / "swapped"
        args.cache.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict[str, float]]] = {}
    seconds: dict[str, list[float]] = {}
    for n in sorted({30, *([] if args.ablation else args.years)}):
        # deterministic: one row per training length
        pair, test_coarse, truth = east_split(east, n)
        rows[f"climatology, {n} y"] = [
            score(xorbit.baseline(test_coarse, "climatology", train=pair, factor=4), truth)
        ]
        rows[f"ridge, {n} y"] = [
            score(xorbit.baseline(test_coarse, "ridge", train=pair, factor=4), truth)
        ]
    for seed in args.seeds:
        pre = pretrain(west, seed, args.epochs, args.cache)
        pre_nolin = None if args.ablation else pretrain(west, seed, args.epochs, args.cache, False)
        for label, n, cfg, kw in runs(args, pre, pre_nolin):
            pair, test_coarse, truth = east_split(east, n)
            t0 = time.perf_counter()
            dsr = xorbit.train(*pair, cfg, epochs=args.epochs, seed=seed, progress=False, **kw)
            seconds.setdefault(label, []).append(time.perf_counter() - t0)
            got = score(test_coarse.orbit.downscale(dsr), truth)
            rows.setdefault(label, []).append(got)
            gate = dsr.history[-1].get("gate", float("nan"))
            ratio = next(
                (h["gate_rmse_ratio"] for h in dsr.history if "gate_rmse_ratio" in h), None
            )
            print(
                f"# seed {seed} {label}: RMSE {got['rmse']:.4f}, "
                f"anomaly R² {got['anomaly_r2']:.4f}, gate {gate} (held-out ratio {ratio})",
                flush=True,
            )
    pre_half, new_half = ("east", "west") if args.swap else ("west", "east")
    print(
        f"# bench_finetune: HadCM3 A1B, 9.5m pretrained on the {pre_half} half (every year), "
        f"scored on the {new_half} half {TEST_FROM}-2099; epochs {args.epochs}, seeds {args.seeds}; "
        f"{os.cpu_count()} cores, torch {torch.__version__}, xorbit {xorbit.__version__}"
    )
    print_seed_table(
        dict(sorted(rows.items(), key=lambda kv: _order(kv[0]))),
        SCORES,
        seconds,
        width=max(len(k) for k in rows) + 2,
        column=20,
        time_column=10,
    )


def score(prediction, truth) -> dict[str, float]:
    """RMSE and anomaly R² of one prediction (`xorbit.evaluate`)."""
    got = xorbit.evaluate({"m": prediction}, match_grid(truth, prediction)).sel(variable=VAR)
    return {k: float(got[k].sel(method="m")) for k in SCORES}


def _order(label: str) -> tuple[int, str]:
    """Rows grouped by the number of training years."""
    digits = [int(w) for w in label.replace(",", " ").split() if w.isdigit()]
    return (digits[-1] if digits else 0, label)


if __name__ == "__main__":
    main()
