"""Ridge regression from coarse windows to fine pixels, in closed form: numpy only.

The linear map a downscaling model has to contain.  Each coarse cell's
``factor x factor`` fine pixels (of every output variable) are regressed on the
standardized coarse values of every input variable in a window around the cell
(the whole grid when it is small), one set of coefficients per cell.  The
penalty is chosen among `ALPHAS` by blocked cross-validation over the samples'
order (contiguous folds: years are autocorrelated), the fit is an SVD per
window.

Two users: the ``"ridge"`` baseline (`xorbit.baselines`), fitted on a training
pair and applied to the data, and the linear path of a Reslim model
(`xorbit.model.linear`), fitted on the training windows before the network
learns what is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ALPHAS",
    "WHOLE_DOMAIN_BYTES",
    "WHOLE_DOMAIN_MAX",
    "RidgeFit",
    "censored_targets",
    "fit_ridge",
    "whole_affordable",
    "windows",
]

# A grid of at most this many coarse cells is one window (every cell a predictor).
WHOLE_DOMAIN_MAX = 400
# With ``window="cv"``, larger grids try the whole grid too while its
# coefficients take at most this many bytes (as doubles, while fitting).
WHOLE_DOMAIN_BYTES = 2**28
# Half-width of a cell's window on larger grids: 11 x 11 coarse cells.
LOCAL_HALF = 5
# Cells the cross-validation scores on a larger grid (the penalty is one for all).
CV_CELLS = 128
# Censored targets (`censored_targets`): at most this many EM iterations, and
# a target within this of its floor (normalized units) counts as at the floor.
CENSOR_ITERATIONS = 20
CENSOR_TOLERANCE = 1e-4
# The penalties the EM tries, times the uncensored fit's (the latent targets
# are rougher than the clamped ones; on the orographic case the out-of-fold
# score chose 2, and 2 scored best on the test samples too: 0.9387 mm/day
# against 0.9476 with 1).
CENSOR_ALPHAS = np.array([1.0, 2.0, 4.0, 8.0])
# Penalties tried by cross-validation, in units of the number of samples
# (predictors are standardized, so X^T X has about that on its diagonal).
ALPHAS = np.logspace(-3, 2, 16)


@dataclass
class RidgeFit:
    """A fitted per-cell ridge regression on a ``shape`` coarse grid.

    ``windows [n_cells, p]``: flat indices, into the ``n_in * ny * nx``
    predictors, of each coarse cell's (every row the same when the window is
    the whole grid); ``coef [n_cells, p, n_out * k * k]`` the coefficients of
    the cell's fine pixels, output variable by output variable; ``x_mean,
    x_std [n_in * ny * nx]`` the predictors' scaling; ``r_mean [n_cells,
    n_out * k * k]`` the mean target; ``alpha`` the penalty chosen among
    ``alphas`` by the blocked cross-validation RMSE ``cv_rmse``.  ``stacked``:
    fitted on ``[T, n_in, ny, nx]`` inputs (`predict` then takes and returns a
    variable axis), else on ``[T, ny, nx]``.  ``half``: the windows'
    half-width, None for the whole grid.
    """

    windows: np.ndarray
    coef: np.ndarray
    x_mean: np.ndarray
    x_std: np.ndarray
    r_mean: np.ndarray
    alpha: float
    alphas: np.ndarray
    cv_rmse: np.ndarray
    shape: tuple[int, int]
    factor: int
    n_in: int = 1
    n_out: int = 1
    stacked: bool = False
    half: int | None = None

    @property
    def whole_domain(self) -> bool:
        return bool((self.windows == self.windows[0]).all())

    def predict(self, coarse: np.ndarray) -> np.ndarray:
        """Fine fields for coarse inputs.

        ``[..., ny, nx]`` → ``[..., ny k, nx k]``, or, for a fit on stacked
        variables, ``[..., n_in, ny, nx]`` → ``[..., n_out, ny k, nx k]``.
        """
        ny, nx = self.shape
        k = self.factor
        lead = coarse.shape[:-3] if self.stacked else coarse.shape[:-2]
        p_all = self.n_in * ny * nx
        x = np.nan_to_num((coarse.reshape(-1, p_all) - self.x_mean) / self.x_std)
        if self.whole_domain:  # one design matrix for every cell: a plain product
            r = np.matmul(x[None], self.coef)
        else:
            r = np.matmul(x[:, self.windows].transpose(1, 0, 2), self.coef)
        r = (r.transpose(1, 0, 2) + self.r_mean).reshape(-1, ny, nx, self.n_out, k, k)
        r = r.transpose(0, 3, 1, 4, 2, 5).reshape(-1, self.n_out, ny * k, nx * k)
        out = (
            r.reshape(*lead, self.n_out, ny * k, nx * k)
            if self.stacked
            else r.reshape(*lead, ny * k, nx * k)
        )
        return out.astype(np.float32)


def windows(ny: int, nx: int, half: int | None, periodic: bool, n_in: int = 1) -> np.ndarray:
    """Flat predictor indices ``[n_cells, n_in * p]`` of each coarse cell's window.

    A window that would cross a non-periodic edge is shifted inward (as tiles
    are), so every window has the same size; a periodic longitude wraps.
    ``half=None`` (or a window as large as the grid): every cell.  With
    several input variables a cell's window holds each variable's cells in
    turn (variable ``v``'s cells are ``v * ny * nx + ...``).
    """
    if half is None or (2 * half + 1 >= ny and 2 * half + 1 >= nx):
        spatial = np.tile(np.arange(ny * nx), (ny * nx, 1))
    else:
        wy, wx = min(2 * half + 1, ny), min(2 * half + 1, nx)
        iy, ix = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        y0 = np.clip(iy - half, 0, ny - wy)
        x0 = ix - half if periodic else np.clip(ix - half, 0, nx - wx)
        dy, dx = np.meshgrid(np.arange(wy), np.arange(wx), indexing="ij")
        rows = y0.reshape(-1, 1) + dy.reshape(1, -1)
        cols = (x0.reshape(-1, 1) + dx.reshape(1, -1)) % nx
        spatial = rows * nx + cols
    return np.concatenate([spatial + v * ny * nx for v in range(n_in)], axis=1)


def _solve(u, s, vt, r, alpha):
    """Ridge coefficients ``V diag(s / (s² + α)) Uᵀ R`` (batched).

    Matrix products, not `numpy.einsum` (whose three-operand form loops
    without BLAS: 390 s instead of seconds for a whole-grid fit of 1980
    predictors).
    """
    ur = np.matmul(u.transpose(0, 2, 1), r)
    return np.matmul(vt.transpose(0, 2, 1) * (s / (s**2 + alpha))[:, None, :], ur)


def _is_whole(win: np.ndarray) -> bool:
    return bool((win == win[0]).all())


def whole_affordable(n_cells: int, n_in: int, q: int) -> bool:
    """Whether a whole-grid window's coefficients (``n_cells x n_in n_cells x q``
    doubles while fitting) fit in `WHOLE_DOMAIN_BYTES`."""
    return n_cells * n_in * n_cells * q * 8 <= WHOLE_DOMAIN_BYTES


def _groups(x_all, r_anom, win, chosen, batch):
    """(cells, design [g, T, p], targets [g, T, q]) in batches of ``chosen`` cells."""
    if _is_whole(win):  # one design for all cells: one solve, every fine pixel a target
        t = len(x_all)
        yield slice(None), x_all[None], r_anom.reshape(t, 1, -1).transpose(1, 0, 2)
        return
    for c0 in range(0, len(chosen), batch):
        cells = chosen[c0 : c0 + batch]
        yield cells, np.moveaxis(x_all[:, win[cells]], 1, 0), np.moveaxis(r_anom[:, cells], 1, 0)


def _cv_sse(x_all, r_anom, win, scored, edges, alphas, batch) -> tuple[np.ndarray, np.ndarray]:
    """Squared error of each penalty over the blocked folds: on the ``scored``
    cells' targets, and on the targets of every cell the fit scored (a whole-grid
    window: every cell, at no extra cost; else the same ``scored`` ones)."""
    t, n_cells, q = r_anom.shape
    sse, sse_all = np.zeros(len(alphas)), np.zeros(len(alphas))
    whole = _is_whole(win)
    for _, x, y in _groups(x_all, r_anom, win, scored, batch):
        for f in range(len(edges) - 1):
            test = np.zeros(t, bool)
            test[edges[f] : edges[f + 1]] = True
            u, s, vt = np.linalg.svd(x[:, ~test], full_matrices=False)
            # X_test V diag(s / (s² + α)) Uᵀ R: the products shared by every α first
            xv = np.matmul(x[:, test], vt.transpose(0, 2, 1))
            ur = np.matmul(u.transpose(0, 2, 1), y[:, ~test])
            for i, a in enumerate(alphas):
                err = (np.matmul(xv * (s / (s**2 + a))[:, None, :], ur) - y[:, test]) ** 2
                sse_all[i] += float(err.sum())
                if whole and len(scored) < n_cells:  # [1, t, cells * q]: the scored cells
                    err = err.reshape(-1, n_cells, q)[:, scored]
                sse[i] += float(err.sum())
    return sse, sse_all


def censored_targets(
    x: np.ndarray,
    y: np.ndarray,
    floor: np.ndarray,
    edges: np.ndarray,
    alpha: float | Sequence[float],
    max_iter: int = CENSOR_ITERATIONS,
) -> np.ndarray:
    """Latent targets for a ridge on censored data (a Tobit model, fitted by EM).

    ``x [T, p]`` standardized predictors, ``y [T, n]`` targets (NaN: missing),
    ``floor [T, n]`` each target's floor (NaN: none).  A target at its floor
    (``y <= floor + CENSOR_TOLERANCE``: a dry pixel of a field clamped at 0)
    says only that the latent value lies at or below it.  Each iteration
    replaces the censored targets by their expectation below the floor,
    ``μ - σ φ(z) / Φ(-z)`` with ``z = (μ - floor) / σ``, where ``μ`` is the
    out-of-fold prediction (the same blocked folds as the penalty's
    cross-validation: in-sample predictions of a p > n ridge are nearly the
    targets themselves) and ``σ`` the out-of-fold RMSE on the uncensored
    targets.  The iterate kept is the one whose out-of-fold predictions,
    clamped at their floors, score best against ``y``; the first is ``y``
    itself, so censoring is used only where the cross-validation finds it
    helps.  ``alpha``: the penalty, or several, each with its own EM; the
    one whose kept iterate scores best out of fold wins.  Returns the kept
    targets.
    """
    censored = np.isfinite(floor) & (y <= np.nan_to_num(floor, nan=-np.inf) + CENSOR_TOLERANCE)
    if not censored.any():
        return y
    svds = []
    for f in range(len(edges) - 1):
        test = np.zeros(len(x), bool)
        test[edges[f] : edges[f + 1]] = True
        svds.append((test, *np.linalg.svd(x[~test], full_matrices=False)))
    best, best_score = y, np.inf
    for a in np.atleast_1d(alpha):
        folds = [(test, x[test] @ (vt.T * (s / (s**2 + a))), u) for test, u, s, vt in svds]
        latent, score = _em(y, floor, censored, folds, max_iter)
        if score < best_score:
            best, best_score = latent, score
    return best


def _em(y, floor, censored, folds, max_iter) -> tuple[np.ndarray, float]:
    """`censored_targets` for one penalty: the kept targets and their score."""
    from scipy.special import log_ndtr

    known = np.isfinite(y)
    current, best, best_score, worse = y, y, np.inf, 0
    low = np.where(censored, floor, -np.inf)
    for _ in range(max_iter):
        mu = np.empty_like(y)
        for test, xw, u in folds:
            target = np.nan_to_num(current[~test])
            mean = target.mean(axis=0)
            mu[test] = xw @ (u.T @ (target - mean)) + mean
        score = float(np.nanmean((np.maximum(mu, low) - y) ** 2))
        if score < best_score:
            best, best_score, worse = current, score, 0
        else:
            worse += 1
            if worse >= 2:
                break
        sigma = float(np.sqrt(np.nanmean((mu - y)[known & ~censored] ** 2))) or 1.0
        z = (mu - np.nan_to_num(floor)) / sigma
        # φ(z) / Φ(-z) in logs: far above the floor Φ(-z) underflows
        ratio = np.exp(-0.5 * z**2 - 0.5 * np.log(2 * np.pi) - log_ndtr(-z))
        below = np.minimum(mu - sigma * ratio, np.nan_to_num(floor))
        current = np.where(censored, below, y)
    return best, best_score


def fit_ridge(
    coarse: np.ndarray,
    residual: np.ndarray,
    factor: int,
    *,
    window: int | str | None = None,
    periodic: bool = False,
    alphas: Sequence[float] | None = None,
    folds: int = 5,
    batch: int = 256,
    cv_cells: int = CV_CELLS,
    floor: np.ndarray | None = None,
) -> RidgeFit:
    """Fit a per-cell ridge from coarse windows to fine pixels.

    Parameters
    ----------
    coarse
        Predictors ``[T, ny, nx]``, or ``[T, n_in, ny, nx]`` for several input
        variables.
    residual
        Targets ``[T, ny k, nx k]``, or ``[T, n_out, ny k, nx k]`` with stacked
        inputs; NaN: missing, left out.
    factor
        ``k``.
    window
        Half-width of a cell's window in coarse cells; default the whole grid
        when it has at most `WHOLE_DOMAIN_MAX` cells, else `LOCAL_HALF`.
        ``"cv"``: on a grid of more than `WHOLE_DOMAIN_MAX` cells, the whole
        grid (where its coefficients fit in `WHOLE_DOMAIN_BYTES`) or
        `LOCAL_HALF`, whichever the blocked cross-validation scores better on
        the same cells (``RidgeFit.half`` says which: None for the whole grid).
    periodic
        Whether windows wrap around in x.
    alphas
        Penalties to try; default `ALPHAS` times ``T``.
    folds
        Contiguous blocks of samples for the cross-validation: one penalty for
        all windows, the one with the least squared error over the blocks,
        each predicted by a fit on the others.
    batch
        Cells solved at once (memory: ``batch x T x p`` doubles).
    cv_cells
        On a grid of more cells than this (with windows smaller than the
        grid), the cross-validation scores this many evenly spread cells, a
        fifth of the cost per cell of the final fit each.
    floor
        Censored targets (`censored_targets`), of ``residual``'s shape (NaN: no
        floor): a target at its floor is only known to lie at or below it, as
        the latent rain of a dry pixel lies at or below zero.  Used where the
        window is the whole grid; the local windows ignore it.
    """
    stacked = coarse.ndim == 4
    if not stacked:
        coarse, residual = coarse[:, None], residual[:, None]
    t, n_in, ny, nx = coarse.shape
    n_out = residual.shape[1]
    k = int(factor)
    if t < 4:
        raise ValueError(f"ridge needs at least 4 training samples, got {t}")
    if residual.shape != (t, n_out, ny * k, nx * k):
        raise ValueError(
            f"ridge: targets of shape {residual.shape} do not match inputs {coarse.shape} "
            f"times factor {k}"
        )
    folds = min(folds, t // 2)
    n_cells = ny * nx
    q = n_out * k * k
    if window == "cv":
        # the whole grid against each cell's neighbours, where the whole grid is affordable
        halves: list[int | None] = (
            [None, LOCAL_HALF]
            if n_cells > WHOLE_DOMAIN_MAX and whole_affordable(n_cells, n_in, q)
            else [None if n_cells <= WHOLE_DOMAIN_MAX else LOCAL_HALF]
        )
    elif isinstance(window, str):
        raise ValueError(f"ridge: window must be a half-width, None or 'cv', got {window!r}")
    else:
        halves = [window if window is not None or n_cells <= WHOLE_DOMAIN_MAX else LOCAL_HALF]
    x_all = coarse.reshape(t, n_in * ny * nx).astype(np.float64)
    x_mean = np.nanmean(x_all, axis=0)
    x_std = np.nanstd(x_all, axis=0)
    x_std = np.where(x_std > 0, x_std, 1.0)
    x_all = np.nan_to_num((x_all - x_mean) / x_std)
    r = residual.reshape(t, n_out, ny, k, nx, k).transpose(0, 2, 4, 1, 3, 5).reshape(t, ny * nx, q)
    r = r.astype(np.float64)
    valid = np.isfinite(r)
    r_mean = np.nan_to_num(np.nanmean(r, axis=0))
    r_anom = np.where(valid, r - r_mean, 0.0)
    grid_alphas = np.asarray(alphas if alphas is not None else ALPHAS * t, np.float64)
    every = np.arange(n_cells)
    wins = [windows(ny, nx, h, periodic, n_in) for h in halves]
    # the penalty is one for all cells: on a large grid, chosen on evenly spread
    # ones (a single whole-grid window scores every cell: one solve serves them all)
    scored = (
        every
        if n_cells <= cv_cells or (len(wins) == 1 and _is_whole(wins[0]))
        else np.unique(np.linspace(0, n_cells - 1, cv_cells).round().astype(int))
    )
    edges = np.linspace(0, t, folds + 1).round().astype(int)
    sses = [_cv_sse(x_all, r_anom, w, scored, edges, grid_alphas, batch) for w in wins]
    # the windows compared on the same cells; the penalty on all a window scored
    best = int(np.argmin([sse.min() for sse, _ in sses]))
    win, sse, half = wins[best], sses[best][1], halves[best]
    if _is_whole(win):
        scored = every
    alpha = float(grid_alphas[int(np.argmin(sse))])
    if floor is not None and _is_whole(win):
        low = floor.reshape(t, n_out, ny, k, nx, k).transpose(0, 2, 4, 1, 3, 5)
        low = low.reshape(t, ny * nx * q).astype(np.float64)
        latent = censored_targets(
            x_all,
            np.where(valid, r, np.nan).reshape(t, -1),
            low,
            edges,
            list(alpha * CENSOR_ALPHAS),
        )
        r = latent.reshape(t, ny * nx, q)
        r_mean = np.nan_to_num(np.nanmean(r, axis=0))
        r_anom = np.where(valid, r - r_mean, 0.0)
    coef = np.zeros((n_cells, win.shape[1], q))
    for cells, x, y in _groups(x_all, r_anom, win, every, batch):
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        b = _solve(u, s, vt, y, alpha)
        if _is_whole(win):  # [1, p, cells * q] -> [cells, p, q]
            b = b[0].reshape(-1, n_cells, q).transpose(1, 0, 2)
        coef[cells] = b
    return RidgeFit(
        windows=win,
        coef=coef.astype(np.float32),
        x_mean=x_mean,
        x_std=x_std,
        r_mean=r_mean.astype(np.float32),
        alpha=alpha,
        alphas=grid_alphas,
        cv_rmse=np.sqrt(sse / max(1, int(valid[:, scored].sum()))),
        shape=(ny, nx),
        factor=k,
        n_in=n_in,
        n_out=n_out,
        stacked=stacked,
        half=half if not _is_whole(win) else None,
    )
