"""Coarse-consistency constraints: each coarse cell's mean of the output equals the input.

The constraint layers of Harder et al. ("Hard-constrained deep learning for
climate downscaling", 2023) applied to finished fields in physical units:
the fine output ``[..., Y k, X k]`` of a variable and its coarse input
``[..., Y, X]``, on the same cells.

- ``"additive"`` (temperature-like variables): each ``k x k`` block is shifted
  by the coarse value minus its mean.
- ``"multiplicative"`` (precipitation, any non-negative variable): negative
  values are set to zero and each block is scaled by the coarse value over
  its mean; a block that is dry everywhere while the coarse cell is not gets
  the coarse value in every pixel.  Positive, and mass-preserving.

A block depends only on its own coarse cell, so the constraint commutes with
tiles and chunks.  It is right only where the coarse field is the cell
average of the fine grid's cells (a conservative coarse grid).  NumPy only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["KINDS", "apply", "block_mean"]

KINDS = ("additive", "multiplicative")


def block_mean(fine: np.ndarray, k: int) -> np.ndarray:
    """The mean of every ``k x k`` block of the last two axes: ``[..., Y k, X k]`` → ``[..., Y, X]``."""
    *lead, ny, nx = fine.shape
    return fine.reshape(*lead, ny // k, k, nx // k, k).mean(axis=(-3, -1))


def _up(coarse: np.ndarray, k: int) -> np.ndarray:
    return np.repeat(np.repeat(coarse, k, axis=-2), k, axis=-1)


def apply(fine: np.ndarray, coarse: np.ndarray, k: int, kind: str) -> np.ndarray:
    """``fine`` whose every ``k x k`` block averages to ``coarse`` (broadcast over lead axes).

    NaN in ``coarse`` gives NaN in its block; NaN in ``fine`` stays NaN (and
    the block's other pixels carry its share).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown coarse-consistency constraint {kind!r}; choose one of {KINDS}")
    fine = np.asarray(fine)
    dtype = fine.dtype if np.issubdtype(fine.dtype, np.floating) else np.float64
    f = fine.astype(np.float64)
    c = np.asarray(coarse, np.float64)
    valid = np.isfinite(f)
    count = block_mean(valid.astype(np.float64), k) * k * k  # valid pixels per block
    if kind == "additive":
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = block_mean(np.where(valid, f, 0.0), k) * k * k / count
        out = f + _up(c - mean, k)
    else:
        f = np.where(valid, np.maximum(f, 0.0), np.nan)
        c = np.maximum(c, 0.0)
        total = block_mean(np.where(valid, f, 0.0), k) * k * k  # the block's sum
        want = c * count  # the sum its valid pixels must have
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.where(total > 0, want / total, 0.0)
        flat = np.where(total > 0, 0.0, c)  # a dry block under a wet cell: uniform
        out = f * _up(scale, k) + _up(flat, k) * valid
    return np.where(valid & np.isfinite(_up(c, k)), out, np.nan).astype(dtype)
