"""The Bayesian total-variation loss of ORBIT-2, in plain torch.

Per pixel and variable::

    (pred - y)^2 + lam * (|dv| + |dh| + 0.7 |dd| + 0.7 |da|)

where ``dv, dh, dd, da`` are the forward differences of the *prediction* to the
pixel below, to the right, down-right and down-left.  Differences that would
reach outside the image count as zero (the difference map is zero padded), so the
border is not penalized for its value.  The squared error is a Gaussian
likelihood, the TV term a Laplace prior on the gradients: a MAP estimate.

Optional latitude weights (cos φ, normalized to mean one over the rows) and
per-variable weights multiply the per-pixel term; pixels whose target is NaN (or
whose ``mask`` is False) drop out of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["DIAGONAL_WEIGHT", "bayesian_tv_loss", "latitude_weights", "total_variation"]

DIAGONAL_WEIGHT = 0.7


def total_variation(pred: torch.Tensor, diagonal_weight: float = DIAGONAL_WEIGHT) -> torch.Tensor:
    """Per-pixel anisotropic TV of ``pred [..., H, W]``, same shape as ``pred``."""
    tv = torch.zeros_like(pred)
    tv[..., :-1, :] += (pred[..., 1:, :] - pred[..., :-1, :]).abs()  # vertical
    tv[..., :, :-1] += (pred[..., :, 1:] - pred[..., :, :-1]).abs()  # horizontal
    tv[..., :-1, :-1] += diagonal_weight * (pred[..., 1:, 1:] - pred[..., :-1, :-1]).abs()
    tv[..., :-1, 1:] += diagonal_weight * (pred[..., 1:, :-1] - pred[..., :-1, 1:]).abs()
    return tv


def latitude_weights(lat_deg: Sequence[float] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """cos(latitude) weights normalized to mean one, shape ``[H]``."""
    lat = torch.as_tensor(np.asarray(lat_deg, dtype=np.float64))
    w = torch.cos(torch.deg2rad(lat)).clamp(min=0)
    if not torch.isfinite(w).all() or w.sum() <= 0:
        raise ValueError("latitude weights: latitudes must be finite and not all at the poles")
    return (w / w.mean()).float()


def bayesian_tv_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    lam: float = 0.02,
    lat_weights: torch.Tensor | None = None,
    var_weights: torch.Tensor | Sequence[float] | None = None,
    mask: torch.Tensor | None = None,
    diagonal_weight: float = DIAGONAL_WEIGHT,
) -> torch.Tensor:
    """Mean Bayesian TV loss over valid pixels.

    Parameters
    ----------
    pred, target
        ``[B, V, H, W]``.  NaN in ``target`` marks a missing pixel.
    lam
        Weight of the TV prior (0.02 in ORBIT-2; 0.001 for its 7 km runs).
    lat_weights
        ``[H]`` weights per row, e.g. from `latitude_weights`, or ``[B, H]``
        when each sample covers other rows (random crops).
    var_weights
        ``[V]`` weights per variable (the reference: temperature 10, others 1).
    mask
        Boolean ``[B, V, H, W]`` (or broadcastable), True where the pixel counts.

    Returns
    -------
    torch.Tensor
        A scalar tensor: the sum of weighted per-pixel terms divided by the number of
        valid pixels.

    Raises
    ------
    ValueError
        If shapes disagree, or if no pixel is valid.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"loss: prediction shape {tuple(pred.shape)} differs from target {tuple(target.shape)}"
        )
    if pred.ndim != 4:
        raise ValueError(f"loss: expected [B, V, H, W] tensors, got shape {tuple(pred.shape)}")
    valid = torch.isfinite(target)
    if mask is not None:
        valid = valid & mask.to(torch.bool)
    n_valid = valid.sum()
    if n_valid == 0:
        raise ValueError("loss: no valid pixel (every target is NaN or masked out)")
    err = torch.where(valid, pred - torch.nan_to_num(target), torch.zeros_like(pred))
    term = err.square() + lam * total_variation(pred, diagonal_weight)
    if lat_weights is not None:
        lw = torch.as_tensor(lat_weights, dtype=pred.dtype, device=pred.device)
        if lw.shape == (pred.shape[-2],):
            term = term * lw[:, None]
        elif lw.shape == (pred.shape[0], pred.shape[-2]):  # per sample (crops)
            term = term * lw[:, None, :, None]
        else:
            raise ValueError(
                f"loss: lat_weights has shape {tuple(lw.shape)}, expected ({pred.shape[-2]},) "
                f"or ({pred.shape[0]}, {pred.shape[-2]})"
            )
    if var_weights is not None:
        vw = torch.as_tensor(var_weights, dtype=pred.dtype, device=pred.device)
        if vw.shape != (pred.shape[1],):
            raise ValueError(
                f"loss: var_weights has shape {tuple(vw.shape)}, expected ({pred.shape[1]},)"
            )
        term = term * vw[:, None, None]
    return torch.where(valid, term, torch.zeros_like(term)).sum() / n_valid
