"""Small synthetic fields and models shared by the tests (cf_xarray habit)."""

from __future__ import annotations

import numpy as np
import torch

from xorbit import Downscaler, ReslimConfig
from xorbit.model.loss import bayesian_tv_loss


def tiny_config(**overrides) -> ReslimConfig:
    """A two-input, one-output model small enough for millisecond forwards."""
    params = dict(
        in_vars=["tas", "orog"],
        out_vars=["tas"],
        static_vars=["orog"],
        factor=4,
        img_size=(8, 8),
        embed_dim=32,
        depth=2,
        decoder_depth=1,
        num_heads=4,
        drop_path=0.0,
        drop_rate=0.0,
        # without the skip the untrained network's output is not zero: tests of
        # the plumbing (tiles, chunks, devices) see every layer at work
        interp_skip="none",
    )
    params.update(overrides)
    return ReslimConfig(**params)


def powerlaw_field(shape, slope: float = 3.0, seed: int = 0) -> np.ndarray:
    """Random field with a power-law spectrum (|k|^-slope), zero mean, unit std."""
    rng = np.random.default_rng(seed)
    ny, nx = shape[-2:]
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.rfftfreq(nx)[None, :]
    k = np.hypot(ky, kx)
    k[0, 0] = np.inf
    amp = k ** (-slope / 2)
    noise = rng.standard_normal((*shape[:-2], ny, nx // 2 + 1)) + 1j * rng.standard_normal(
        (*shape[:-2], ny, nx // 2 + 1)
    )
    field = np.fft.irfft2(noise * amp, s=(ny, nx))
    field = field - field.mean(axis=(-2, -1), keepdims=True)
    return (field / field.std(axis=(-2, -1), keepdims=True)).astype(np.float32)


def smooth_field(ny: int, nx: int, nt: int = 1) -> np.ndarray:
    """A smooth analytic field ``[nt, ny, nx]`` (a few long waves)."""
    y = np.linspace(0, 1, ny)[:, None]
    x = np.linspace(0, 1, nx)[None, :]
    out = [
        np.sin(2 * np.pi * (x + 0.1 * t)) * np.cos(np.pi * y) + 0.5 * np.cos(3 * np.pi * x * y)
        for t in range(nt)
    ]
    return np.stack(out).astype(np.float32)


def briefly_trained_downscaler(steps: int = 150, seed: int = 1) -> Downscaler:
    """A one-variable x4 model fitted for a second to smooth power-law fields.

    Good enough that its output follows the input (so that tile seams would show
    as steps), far from a good downscaler.
    """
    cfg = tiny_config(in_vars=["tas"], out_vars=["tas"], static_vars=[], img_size=(8, 8))
    dsr = Downscaler.from_config(
        cfg, seed=seed, mean={"tas": 280.0}, std={"tas": 10.0}, units={"tas": "K"}
    )
    model = dsr.model.train()
    gen = torch.Generator().manual_seed(seed)
    fine = torch.from_numpy(powerlaw_field((256, 32, 32), slope=4, seed=seed))[:, None]
    coarse = torch.nn.functional.avg_pool2d(fine, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(steps):
            i = torch.randint(0, fine.shape[0], (16,), generator=gen)
            loss = bayesian_tv_loss(model(coarse[i], ["tas"]), fine[i], lam=0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return dsr
