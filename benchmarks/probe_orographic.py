"""Probes of the orographic benchmark: what a closed form and a plain CNN reach.

Not a benchmark of the library: two diagnostics of why `bench_orographic.py`'s
aim (xorbit at most 0.7 x the local ridge's RMSE) is out of reach, on the same
data (`xorbit.datasets.orographic_precipitation`, 350 samples, the first 250
train, the other 100 score; RMSE in mm/day).

``ridge``
    The library's local ridge (`xorbit.baseline("ridge")`) with more
    predictors: the coarse rain times harmonics of the wind's direction
    (``pr cos(n θ)``, ``pr sin(n θ)``, ``n = 1 .. --harmonics``) and, with
    ``--speed``, times the speed.  In linear theory the fine rain is
    ``background + C_w L_{u,v}[h]``: linear in the moisture, with a response
    to the terrain that depends on the wind's direction and speed, not
    linearly on ``u`` and ``v``.  The products let a per-pixel linear map
    follow that dependence.  Scored as fitted, clamped at zero, and with the
    multiplicative coarse constraint (`xorbit.model.constraints.apply`).
``cnn``
    A plain CNN on the fine grid (6 residual dilated 3 x 3 convolutions,
    width 32, each scaled and shifted by an MLP of the wind: FiLM), given the
    bicubic coarse rain, the terrain, its gradients and the upslope wind
    ``u h_x + v h_y``: the physics handed to it.  It predicts the fine rain
    less the bicubic one with the squared error (AdamW, one-cycle lr 2e-3,
    batches of 16), scored every 5 epochs, as predicted and with the
    multiplicative coarse constraint.  How fast can any network learn this
    map from 250 samples?

How to run
    .venv/bin/python benchmarks/probe_orographic.py ridge                    # window: whole grid
    .venv/bin/python benchmarks/probe_orographic.py ridge --window 2 --harmonics 2
    .venv/bin/python benchmarks/probe_orographic.py cnn --epochs 30 --seed 0  # ~7 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from bench_orographic import with_harmonics
from torch import nn

import xorbit
from xorbit.datasets import orographic_precipitation
from xorbit.model.constraints import apply

N_SAMPLES, N_TRAIN, K = 350, 250, 4


def rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - truth) ** 2)))


def kept(fine: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """The library's multiplicative coarse constraint (`xorbit.model.constraints.apply`)."""
    return apply(fine, coarse, K, "multiplicative")


def probe_ridge(args: argparse.Namespace) -> None:
    coarse, fine, _ = orographic_precipitation(N_SAMPLES, seed=0)
    truth = fine.pr.isel(time=slice(N_TRAIN, None)).values.astype(np.float64)
    ds, predictors = with_harmonics(coarse, args.harmonics)
    if args.speed:
        ds["pr_speed"] = coarse.pr * np.hypot(coarse.u, coarse.v) / 10.0
        predictors.append("pr_speed")
    t0 = time.perf_counter()
    pred = xorbit.baseline(
        ds.isel(time=slice(N_TRAIN, None)),
        "ridge",
        train=(ds.isel(time=slice(0, N_TRAIN)), fine.isel(time=slice(0, N_TRAIN))),
        predictors=predictors,
        window=args.window,
    ).pr.values
    print(f"predictors {predictors}, window {args.window}, {time.perf_counter() - t0:.0f} s")
    coarse_test = ds.pr.isel(time=slice(N_TRAIN, None)).values
    print(
        f"ridge RMSE {rmse(pred, truth):.4f}, clamped at 0 {rmse(np.maximum(pred, 0), truth):.4f}, "
        f"with the multiplicative constraint {rmse(kept(pred, coarse_test), truth):.4f}"
    )


class FiLMCNN(nn.Module):
    """Residual dilated convolutions, each scaled and shifted by an MLP of the wind."""

    def __init__(self, channels: int, width: int = 32, dilations=(1, 2, 4, 8, 1, 2)) -> None:
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 5, padding=2)
        self.convs = nn.ModuleList(
            nn.Conv2d(width, width, 3, padding=d, dilation=d) for d in dilations
        )
        self.film = nn.Sequential(
            nn.Linear(3, 64), nn.GELU(), nn.Linear(64, 2 * width * len(dilations))
        )
        self.out = nn.Conv2d(width, 1, 3, padding=1)
        self.shape = (len(dilations), 2, width, 1, 1)

    def forward(self, x: torch.Tensor, wind: torch.Tensor) -> torch.Tensor:
        z = F.gelu(self.inp(x))
        g = self.film(wind).view(-1, *self.shape)
        for i, conv in enumerate(self.convs):
            z = z + F.gelu(conv(z) * (1 + g[:, i, 0]) + g[:, i, 1])
        return self.out(z)


def probe_cnn(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    coarse, fine, orog = orographic_precipitation(N_SAMPLES, seed=0)
    pr_c = torch.tensor(coarse.pr.values)[:, None]
    u, v = (torch.tensor(coarse[n].values[:, 0, 0]) for n in ("u", "v"))
    y = torch.tensor(fine.pr.values)[:, None]
    h = torch.tensor(orog.values)[None, None] / 1000.0
    hy, hx = (3 * g[None, None] for g in torch.gradient(h[0, 0]))
    bicubic = F.interpolate(pr_c, scale_factor=K, mode="bicubic", align_corners=False)
    scale = float(y.std())
    wind = torch.stack([u / 10, v / 10, torch.hypot(u, v) / 10], 1)
    upslope = (u[:, None, None, None] * hx + v[:, None, None, None] * hy) / 10
    n = y.shape[0]
    statics = [a.expand(n, -1, -1, -1) for a in (h, hx, hy)]
    x = torch.cat([bicubic / scale, *statics, upslope, bicubic / scale * upslope], 1)
    model = FiLMCNN(x.shape[1])
    batches = -(-N_TRAIN // 16)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.epochs * batches)
    test = torch.arange(N_TRAIN, N_SAMPLES)
    truth = y[test].double().numpy()
    print(f"bicubic RMSE {rmse(bicubic[test].numpy(), truth):.4f}")
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        total = 0.0
        for b in torch.randperm(N_TRAIN).split(16):
            pred = bicubic[b] + scale * model(x[b], wind[b])
            loss = F.mse_loss(pred / scale, y[b] / scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        if epoch % 5 == 0 or epoch == args.epochs:
            model.eval()
            with torch.no_grad():
                pred = bicubic[test] + scale * torch.cat(
                    [model(x[b], wind[b]) for b in test.split(25)]
                )
            print(
                f"epoch {epoch}: train loss {total / N_TRAIN:.4f}, RMSE {rmse(pred.numpy(), truth):.4f}, "
                f"constrained {rmse(kept(pred.numpy(), pr_c[test].numpy()), truth):.4f}, "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="probe", required=True)
    r = sub.add_parser("ridge", help="the local ridge with direction-harmonic products")
    r.add_argument("--window", type=int, default=None, help="half-width in coarse cells")
    r.add_argument("--harmonics", type=int, default=2)
    r.add_argument("--speed", action="store_true", help="also pr times the wind speed")
    c = sub.add_parser("cnn", help="a wind-conditioned CNN given the physics")
    c.add_argument("--epochs", type=int, default=30)
    c.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    {"ridge": probe_ridge, "cnn": probe_cnn}[args.probe](args)


if __name__ == "__main__":
    main()
