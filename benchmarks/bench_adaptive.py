"""Adaptive (quadtree) tokens: skill at fewer tokens, and the forward speed-up on a large window.

Run: ``.venv/bin/python benchmarks/bench_adaptive.py [--only hadcm3,multiscale,speed]``

skill, HadCM3 (``--only hadcm3``)
    The demo's data and split (`xorbit.demo`: HadCM3 A1B air temperature,
    36 x 48 cell-averaged x4 to 9 x 12; train 1860-2040, held out 2041-2099)
    and its recipe (``ReslimConfig.preset("tiny", factor=4, ...)``,
    ``xorbit.train(..., epochs, seed, device="cpu")``, ``.orbit.downscale``),
    with ``--epochs`` (default 20, the demo has 40) to keep each run short.
    Uniform tokens against ``tokens="adaptive"`` with ``max_leaf=4`` (or 2:
    ``--hadcm3-leaf 2``) and ``max_tokens`` about a half and a quarter of the
    uniform model's tokens.  The 9 x 12 window is one window of the model:
    uniform 5 x 6 = 30 tokens (padded to 10 x 12 pixels); adaptive pads to
    16 x 16 pixels, 4 roots, with ``max_leaf=4`` (12 x 12, 9 roots with 2).

skill, generated multi-scale field (``--only multiscale``)
    A fine 256 x 512 field per time step: a smooth large-scale pattern (low
    wavenumbers, random phases), five sharp fronts (``tanh`` across a wavy
    line, width 1.5 fine pixels, ±4) and 24 small Gaussian blobs (radius 2.5
    fine pixels, up to ±5), coarsened x4 with `xorbit.coarsen` to 64 x 128.  ``tiny`` preset,
    32 x 64 windows (``img_size``, 512 uniform tokens), trained on random
    crops; held-out steps downscaled with the default tiles.  Adaptive:
    ``max_leaf=8``, ``max_tokens`` 256 and 128 (L/2, L/4).

speed (``--only speed``)
    The ``9.5m`` preset (23 inputs, 3 outputs, ``img_size=(128, 256)``,
    random weights, eval, ``torch.inference_mode``), one 128 x 256 coarse
    window (8192 uniform tokens): forward seconds of uniform against adaptive
    (same weights) at L/2 and L/4, median of ``--rounds`` interleaved runs, and
    the partition's seconds (edge map, counts, splits) on its own.

Every number is for this process's torch threads (``--threads``, default 1,
as the machine is shared); RMSE in the field's units over every held-out pixel.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
import xarray as xr
from _cpu import CpuShare

import xorbit
from xorbit.grid import match_grid
from xorbit.model.reslim import Reslim

K = 4


# --------------------------------------------------------------------------- skill
def rmse(pred: xr.DataArray, truth: xr.DataArray) -> float:
    truth = match_grid(truth, pred)
    return float(np.sqrt(((pred.values - truth.values) ** 2).mean()))


def skill_runs(name, coarse, fine, is_train, variants, seeds, epochs, **train_kw) -> None:
    """Train each variant per seed, print a table of held-out RMSE, tokens, train seconds."""
    c_tr, f_tr = coarse.sel(time=is_train), fine.sel(time=is_train)
    c_te, f_te = coarse.sel(time=~is_train), fine.sel(time=~is_train)
    bicubic = rmse(c_te.orbit.interpolate(factor=K, method="bicubic"), f_te)
    var = fine.name
    rows: dict[str, dict[str, list]] = {}
    cpu = CpuShare()
    for seed in seeds:
        for label, overrides in variants.items():
            cfg = xorbit.ReslimConfig.preset(
                "tiny", factor=K, in_vars=[var], out_vars=[var], **overrides
            )
            t0 = time.perf_counter()
            dsr = xorbit.train(
                c_tr, f_tr, cfg, epochs=epochs, seed=seed, device="cpu", progress=False, **train_kw
            )
            train_s = time.perf_counter() - t0
            pred = c_te.orbit.downscale(dsr, device="cpu")
            window = tuple(min(a, b) for a, b in zip(cfg.img_size, c_te.shape[-2:], strict=True))
            row = rows.setdefault(
                label, {"rmse": [], "s": [], "tokens": dsr.model.num_tokens(window)}
            )
            row["rmse"].append(rmse(pred, f_te))
            row["s"].append(train_s)
            print(
                f"# {name} seed {seed} {label}: RMSE {row['rmse'][-1]:.4f}, {train_s:.0f} s",
                flush=True,
            )
    base = np.mean(rows["uniform"]["rmse"]) if "uniform" in rows else float("nan")
    print(
        f"\n### {name}: {len(seeds)} seed(s) {list(seeds)}, {epochs} epochs; bicubic RMSE "
        f"{bicubic:.4f}; other processes took {cpu.others():.0%} of the CPU\n"
    )
    print("| tokens | per window | RMSE (mean ± sd) | per seed | vs uniform | train s (mean) |")
    print("|---|--:|--:|---|--:|--:|")
    for label, r in rows.items():
        a = np.array(r["rmse"])
        print(
            f"| {label} | {r['tokens']} | {a.mean():.4f} ± {a.std():.4f} | "
            + ", ".join(f"{v:.4f}" for v in a)
            + f" | {a.mean() / base - 1:+.1%} | {np.mean(r['s']):.0f} |"
        )
    print(flush=True)


def hadcm3(args) -> None:
    from xorbit.datasets import hadcm3_air_temperature
    from xorbit.demo import DEMO_SPLIT_YEAR

    fine = hadcm3_air_temperature()
    coarse = xorbit.coarsen(fine, K)
    is_train = fine.time.dt.year <= DEMO_SPLIT_YEAR
    # the window is the whole 9 x 12 field: 30 uniform tokens
    leaf = args.hadcm3_leaf
    # max_leaf 4 pads to 16 x 16 pixels (4 roots); 2 pads to 12 x 12 (9 roots)
    budgets = {4: (15, 7), 2: (15, 9)}[leaf]
    variants = {"uniform": {}} | {
        f"adaptive, max_leaf {leaf}, max_tokens {n} ({'L/2' if n == 15 else 'L/4'})": dict(
            tokens="adaptive", max_leaf=leaf, max_tokens=n
        )
        for n in budgets
    }
    if args.skip_uniform:
        del variants["uniform"]
    skill_runs("HadCM3 (demo split)", coarse, fine, is_train, variants, args.seeds, args.epochs)


def multiscale_fields(nt: int, seed: int, fy: int = 256, fx: int = 512) -> xr.DataArray:
    """Smooth large-scale pattern + five sharp fronts + 24 small blobs, per time step."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(
        np.arange(fy, dtype=np.float64), np.arange(fx, dtype=np.float64), indexing="ij"
    )
    out = np.empty((nt, fy, fx), np.float32)
    for t in range(nt):
        f = np.zeros((fy, fx))
        for ky, kx in ((1, 1), (1, 2), (2, 1), (2, 3)):
            ph = rng.uniform(0, 2 * np.pi, 2)
            f += (
                2.0
                * np.cos(2 * np.pi * ky * y / fy + ph[0])
                * np.cos(2 * np.pi * kx * x / fx + ph[1])
            )
        for _ in range(5):
            theta = rng.uniform(0, np.pi)
            c = rng.uniform(0.2, 0.8) * (fy * abs(np.sin(theta)) + fx * abs(np.cos(theta)))
            d = x * np.cos(theta) + y * np.sin(theta) - c
            d += 6.0 * np.sin(
                2 * np.pi * (x * np.sin(theta) - y * np.cos(theta)) / 97.0 + rng.uniform(0, 6)
            )
            f += rng.choice([-1, 1]) * 4.0 * np.tanh(d / 1.5)
        for _ in range(24):
            cy, cx = rng.uniform(0, fy), rng.uniform(0, fx)
            f += rng.uniform(-5, 5) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * 2.5**2))
        out[t] = 280.0 + f
    lat = 20.0 + 0.25 / K * np.arange(fy)
    lon = 200.0 + 0.25 / K * np.arange(fx)
    return xr.DataArray(
        out,
        dims=("time", "lat", "lon"),
        coords={"time": np.arange(nt), "lat": lat, "lon": lon},
        name="tas",
        attrs={"units": "K"},
    )


def multiscale(args) -> None:
    nt_train, nt_test = 48, 12
    fine = multiscale_fields(nt_train + nt_test, seed=0)
    coarse = xorbit.coarsen(fine, K)
    is_train = xr.DataArray(np.arange(fine.sizes["time"]) < nt_train, dims="time")
    variants = {
        "uniform": {},
        "adaptive, max_tokens 256 (L/2)": dict(tokens="adaptive", max_leaf=8, max_tokens=256),
        "adaptive, max_tokens 128 (L/4)": dict(tokens="adaptive", max_leaf=8, max_tokens=128),
    }
    skill_runs(
        "generated multi-scale field",
        coarse,
        fine,
        is_train,
        variants,
        args.seeds,
        args.epochs,
        samples_per_epoch=args.samples,
    )


# --------------------------------------------------------------------------- speed
def speed(args) -> None:
    from xorbit.model.config import REFERENCE_OUT_VARS

    ny, nx = 128, 256
    cfg = xorbit.ReslimConfig.preset("9.5m", factor=K, img_size=(ny, nx))
    uniform = Reslim(cfg).eval()
    n_uniform = uniform.num_tokens((ny, nx))
    models = {"uniform": uniform}
    for frac in (2, 4):
        m = Reslim(cfg.replace(tokens="adaptive", max_tokens=n_uniform // frac)).eval()
        m.load_state_dict(uniform.state_dict(), strict=False)  # leaf_embed stays zero
        models[f"adaptive, max_tokens L/{frac}"] = m
    # output variables: the multi-scale field (fronts, blobs); other inputs smooth + noise
    rng = np.random.default_rng(0)
    fields = multiscale_fields(len(cfg.in_vars), seed=1, fy=ny, fx=nx).values
    x = torch.from_numpy((fields - 280.0) / 3.0).float()
    noisy = [i for i, v in enumerate(cfg.in_vars) if v not in REFERENCE_OUT_VARS]
    x[noisy] = x[noisy] + torch.from_numpy(0.3 * rng.standard_normal((len(noisy), ny, nx))).float()
    x = x[None]
    times: dict[str, list[float]] = {k: [] for k in models} | {"partition L/4": []}
    cpu = CpuShare()
    with torch.inference_mode():
        for m in models.values():  # warm-up
            m(x)
        for _ in range(args.rounds):
            for label, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[label].append(time.perf_counter() - t0)
            m = models["adaptive, max_tokens L/4"]
            t0 = time.perf_counter()
            m.partition(m._pad(x), cfg.in_vars)
            times["partition L/4"].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(
        f"\n### speed: 9.5m preset ({uniform.num_params() / 1e6:.2f} M parameters), one "
        f"{ny} x {nx} coarse window x{K}, 23 inputs, 3 outputs; torch threads "
        f"{torch.get_num_threads()}; median of {args.rounds} runs; other processes took "
        f"{cpu.others():.0%} of the CPU\n"
    )
    print("| model | tokens | forward s (median) | runs | speed-up | partition share |")
    print("|---|--:|--:|---|--:|--:|")
    for label, m in models.items():
        share = ""
        if label.endswith("L/4"):
            share = f"{med['partition L/4']:.3f} s ({med['partition L/4'] / med[label]:.1%})"
        print(
            f"| {label} | {m.num_tokens((ny, nx))} | {med[label]:.2f} | "
            + ", ".join(f"{t:.2f}" for t in times[label])
            + f" | {med['uniform'] / med[label]:.2f} | {share} |"
        )
    print(flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="hadcm3,multiscale,speed")
    ap.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--samples", type=int, default=96, help="multiscale: samples per epoch")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--hadcm3-leaf", type=int, default=4, choices=(2, 4), help="hadcm3: max_leaf")
    ap.add_argument("--skip-uniform", action="store_true", help="skill: adaptive variants only")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    print(
        f"# bench_adaptive: torch {torch.__version__}, {args.threads} thread(s), "
        f"{os.cpu_count()} CPU cores, load average at start {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    parts = {"hadcm3": hadcm3, "multiscale": multiscale, "speed": speed}
    for name in args.only.split(","):
        parts[name](args)


if __name__ == "__main__":
    main()
