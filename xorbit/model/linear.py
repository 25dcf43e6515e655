"""The linear path of a Reslim model: a per-cell ridge map, in torch, frozen.

A window's dynamic coarse inputs ``[B, n_in, ny, nx]`` (normalized) give fine
fields ``[B, n_out, ny k, nx k]``: each coarse cell's ``k x k`` fine pixels of
every output are a linear function of the standardized inputs in the cell's
window (`xorbit.ridge`: the whole window, or the cells around it).  The
coefficients are buffers, not parameters: `xorbit.training.linear` fits them
in closed form before the network trains, and the network learns only what
the linear map leaves.  It is `xorbit.ridge.RidgeFit.predict` on tensors, and
loads from one (`load_fit`).

The coefficients belong to positions in the window, so inputs must have the
window's size (smaller ones are padded by replication, as the rest of the
model pads).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..ridge import RidgeFit, windows

__all__ = ["LinearPath"]


class LinearPath(nn.Module):
    """Frozen per-cell ridge map from a ``window`` of coarse inputs to fine outputs."""

    # buffers (in the state dict, saved with the weights; not trained)
    windows: torch.Tensor
    coef: torch.Tensor
    x_mean: torch.Tensor
    x_std: torch.Tensor
    r_mean: torch.Tensor

    def __init__(
        self, window: tuple[int, int], n_in: int, n_out: int, factor: int, half: int | None
    ) -> None:
        super().__init__()
        ny, nx = (int(v) for v in window)
        self.window, self.n_in, self.n_out, self.factor = (ny, nx), n_in, n_out, int(factor)
        win = windows(ny, nx, half, periodic=False, n_in=n_in)
        self.whole = bool((win == win[0]).all())
        q = n_out * self.factor**2
        cells = ny * nx
        # the fitted map: zero until `load_fit`, so a fresh model has no linear path
        self.register_buffer("windows", torch.from_numpy(win[:1] if self.whole else win))
        self.register_buffer("coef", torch.zeros(cells, win.shape[1], q))
        self.register_buffer("x_mean", torch.zeros(n_in * cells))
        self.register_buffer("x_std", torch.ones(n_in * cells))
        self.register_buffer("r_mean", torch.zeros(cells, q))

    def load_fit(self, fit: RidgeFit) -> None:
        """Take the coefficients of a `fit_ridge` on stacked inputs of this window."""
        if fit.shape != self.window or (fit.n_in, fit.n_out) != (self.n_in, self.n_out):
            raise ValueError(
                f"linear path: a fit on {fit.n_in} inputs, {fit.n_out} outputs and a "
                f"{fit.shape} window does not suit this path ({self.n_in}, {self.n_out}, "
                f"{self.window})"
            )
        for name, value in (
            ("coef", fit.coef),
            ("x_mean", fit.x_mean),
            ("x_std", fit.x_std),
            ("r_mean", fit.r_mean),
        ):
            getattr(self, name).copy_(torch.from_numpy(np.asarray(value, np.float32)))

    def clear(self) -> None:
        """No linear path: the map adds zero (as before `load_fit`)."""
        self.coef.zero_()
        self.r_mean.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ny, nx = self.window
        h, w = x.shape[-2:]
        if h > ny or w > nx:
            raise ValueError(
                f"the linear path of this model maps {ny} x {nx} windows (its training "
                f"window); it was given {h} x {w}: downscale with the default tile and halo"
            )
        k = self.factor
        # a regression: in float32 (meta tensors, for memory plans, have no autocast)
        meta = x.device.type == "meta"
        with contextlib.nullcontext() if meta else torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if (h, w) != (ny, nx):
                x = F.pad(x, (0, nx - w, 0, ny - h), mode="replicate")
            b = x.shape[0]
            z = (x.reshape(b, -1) - self.x_mean) / self.x_std
            if self.whole:
                r = torch.einsum("bp,cpq->bcq", z, self.coef)
            else:
                r = torch.einsum("bcp,cpq->bcq", z[:, self.windows], self.coef)
            r = (r + self.r_mean).reshape(b, ny, nx, self.n_out, k, k)
            r = r.permute(0, 3, 1, 4, 2, 5).reshape(b, self.n_out, ny * k, nx * k)
        return r[..., : h * k, : w * k]
