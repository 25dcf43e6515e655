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
from typing import Any

import numpy as np
import torch

__all__ = [
    "DIAGONAL_WEIGHT",
    "bayesian_tv_loss",
    "fair_crps_loss",
    "latitude_weights",
    "mirror",
    "total_variation",
]

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
    valid = _valid(target, mask)
    err = torch.where(valid, pred - torch.nan_to_num(target), torch.zeros_like(pred))
    term = err.square() + lam * total_variation(pred, diagonal_weight)
    return _weighted_mean(term, valid, lat_weights, var_weights)


def fair_crps_loss(
    members: torch.Tensor,
    target: torch.Tensor,
    *,
    lam: float = 0.0,
    lat_weights: torch.Tensor | None = None,
    var_weights: torch.Tensor | Sequence[float] | None = None,
    mask: torch.Tensor | None = None,
    diagonal_weight: float = DIAGONAL_WEIGHT,
    paired: bool = False,
) -> torch.Tensor:
    """Mean fair (unbiased) CRPS of an ensemble over valid pixels, plus the TV prior.

    Per pixel and variable, for members ``x_1 .. x_M``::

        mean_i |x_i - y| - sum_ij |x_i - x_j| / (2 M (M - 1))
            + lam * mean_i TV(x_i)

    The fair CRPS (Ferro 2014) is the expected CRPS of the ensemble's
    distribution, unbiased for any ``M``: its minimum in expectation is at
    members drawn from the predictive distribution itself, so a model trained
    on it learns spread as well as location.  The pair sum is taken over the
    sorted members, ``2 sum_i (2 i - M - 1) x_(i)``, in ``O(M log M)``.
    Weights and the mask as in `bayesian_tv_loss`.

    ``paired=True``: members come in pairs ``(2 p, 2 p + 1)`` drawn together,
    independent of the other pairs: mirrored about a centre (``x_{2p+1} = 2 c
    - x_{2p}``) or antithetic (the noise ``z`` and ``-z``;
    `ReslimConfig.noise_members`).  The two of a pair are not independent
    draws, so the pair sum leaves them out: over the ``M (M - 2)`` ordered
    pairs of different pairs, still unbiased for the CRPS of the distribution
    each member is drawn from.

    Parameters
    ----------
    members
        ``[B, M, V, H, W]``, ``M >= 2`` (paired: even, ``M >= 4``).
    target
        ``[B, V, H, W]``.

    Raises
    ------
    ValueError
        If shapes disagree, ``M < 2`` (paired: ``M`` odd or ``< 4``), or no
        pixel is valid.
    """
    if members.ndim != 5 or members.shape[:1] + members.shape[2:] != target.shape:
        raise ValueError(
            f"fair_crps_loss: members {tuple(members.shape)} must be [B, M, V, H, W] over a "
            f"target [B, V, H, W], got target {tuple(target.shape)}"
        )
    m = members.shape[1]
    if m < 2:
        raise ValueError(f"fair_crps_loss needs at least 2 members, got {m}")
    if paired and (m % 2 or m < 4):
        raise ValueError(
            f"fair_crps_loss: paired members come in pairs, at least 2 of them; got M={m}"
        )
    valid = _valid(target, mask)
    y = torch.nan_to_num(target).unsqueeze(1)
    skill = (members - y).abs().mean(dim=1)
    rank = torch.arange(1, m + 1, dtype=members.dtype, device=members.device)
    coef = (2 * rank - m - 1).reshape(1, m, 1, 1, 1)
    pairs = 2 * (coef * members.sort(dim=1).values).sum(dim=1)
    if paired:
        # less each pair's two (ordered) differences with its own partner
        own = (members[:, 0::2] - members[:, 1::2]).abs().sum(dim=1)
        term = skill - (pairs - 2 * own) / (2 * m * (m - 2))
    else:
        term = skill - pairs / (2 * m * (m - 1))
    if lam:
        tv = total_variation(members.flatten(0, 1), diagonal_weight)
        term = term + lam * tv.reshape(members.shape).mean(dim=1)
    return _weighted_mean(term, valid, lat_weights, var_weights)


def mirror(draws: Any, centre: Any) -> Any:
    """Mirrored members: each draw ``x`` and ``2 centre - x``, interleaved.

    ``draws`` ``[B, P, ...]`` (torch or numpy), ``centre`` ``[B, 1, ...]``
    (the member at zero noise) → ``[B, 2 P, ...]``: members ``2 p`` and
    ``2 p + 1`` are a pair (`fair_crps_loss` with ``paired=True``).
    """
    if isinstance(draws, torch.Tensor):
        return torch.stack([draws, 2 * centre - draws], dim=2).flatten(1, 2)
    both = np.stack([draws, 2 * centre - draws], axis=2)
    return both.reshape(both.shape[0], -1, *both.shape[3:])


def _valid(target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Pixels that count: a finite target, and ``mask`` where given (at least one)."""
    valid = torch.isfinite(target)
    if mask is not None:
        valid = valid & mask.to(torch.bool)
    if valid.sum() == 0:
        raise ValueError("loss: no valid pixel (every target is NaN or masked out)")
    return valid


def _weighted_mean(
    term: torch.Tensor,
    valid: torch.Tensor,
    lat_weights: torch.Tensor | None,
    var_weights: torch.Tensor | Sequence[float] | None,
) -> torch.Tensor:
    """The per-pixel ``term [B, V, H, W]`` weighted by row and variable, summed over
    the valid pixels and divided by their number."""
    if lat_weights is not None:
        lw = torch.as_tensor(lat_weights, dtype=term.dtype, device=term.device)
        if lw.shape == (term.shape[-2],):
            term = term * lw[:, None]
        elif lw.shape == (term.shape[0], term.shape[-2]):  # per sample (crops)
            term = term * lw[:, None, :, None]
        else:
            raise ValueError(
                f"loss: lat_weights has shape {tuple(lw.shape)}, expected ({term.shape[-2]},) "
                f"or ({term.shape[0]}, {term.shape[-2]})"
            )
    if var_weights is not None:
        vw = torch.as_tensor(var_weights, dtype=term.dtype, device=term.device)
        if vw.shape != (term.shape[1],):
            raise ValueError(
                f"loss: var_weights has shape {tuple(vw.shape)}, expected ({term.shape[1]},)"
            )
        term = term * vw[:, None, None]
    return torch.where(valid, term, torch.zeros_like(term)).sum() / valid.sum()
