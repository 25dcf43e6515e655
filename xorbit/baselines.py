"""Statistical baselines a downscaling scientist compares a model with.

`baseline(coarse, method, train=...)` puts coarse fields on exactly the fine grid
that ``.orbit.downscale`` gives, by one of:

- ``"nearest"``, ``"bilinear"``, ``"bicubic"``, ``"conservative"``: interpolation
  (`xorbit.regrid`), nothing learnt;
- ``"climatology"`` (the delta method): bicubic plus the per-pixel mean of
  ``fine - bicubic`` over the training pair;
- ``"ridge"``: climatology plus a ridge regression, per fine pixel, of the
  anomaly of ``fine - bicubic`` on the standardized coarse anomalies in a window
  around the pixel (the whole domain when it is small).  The penalty is chosen
  by blocked cross-validation over the training years (contiguous folds: years
  are autocorrelated) and the fit is closed form (an SVD per window);
- ``"qdm"``: bicubic, then quantile delta mapping per fine pixel trained on the
  pair (xsdba's `QuantileDeltaMapping`, additive), which keeps the model's
  change signal and maps its quantiles onto the observed ones.

Trained methods are fitted once on the training pair (loaded into memory: it
is a training set, not the data to downscale) and applied lazily, per time
block, to Dask input.  xarray and numpy only: no torch here.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from . import grid
from .regrid import interpolate

__all__ = ["INTERPOLATIONS", "METHODS", "TRAINED", "RidgeFit", "baseline", "fit_ridge"]

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "conservative")
TRAINED = ("climatology", "ridge", "qdm")
METHODS = INTERPOLATIONS + TRAINED

# A domain of at most this many coarse pixels is one ridge window.
WHOLE_DOMAIN_MAX = 400
# Penalties tried by cross-validation, in units of the number of training years
# (predictors are standardized, so X^T X has about that on its diagonal).
ALPHAS = np.logspace(-3, 2, 16)


def baseline(
    coarse: xr.DataArray | xr.Dataset,
    method: str,
    *,
    train: tuple[xr.DataArray | xr.Dataset, xr.DataArray | xr.Dataset] | None = None,
    factor: int | None = None,
    periodic: bool | None = None,
    time_dim: Hashable = "time",
    window: int | None = None,
    nquantiles: int = 50,
) -> xr.DataArray | xr.Dataset:
    """A statistical baseline on the fine grid of ``.orbit.downscale``; lazy on Dask input.

    Parameters
    ----------
    coarse
        The coarse fields to downscale (a DataArray, or every spatial variable
        of a Dataset).
    method
        One of `METHODS` (see the module docstring).
    train
        ``(coarse_train, fine_train)``: the same cells at both resolutions over
        the training period, needed by the `TRAINED` methods.  The fine grid
        must be the coarse grid split ``factor`` times.  Both are matched to
        ``coarse``'s cells by coordinate value (longitudes modulo 360, either
        orientation; a larger training domain is cut to ``coarse``'s).
    factor
        Refinement factor; inferred from ``train`` when given.
    periodic
        Whether longitude wraps around; detected from the grid by default.
    window
        Ridge only: half-width, in coarse pixels, of the predictor window around
        each fine pixel's coarse cell.  Default: the whole domain when it has at
        most `WHOLE_DOMAIN_MAX` coarse pixels, else 5 (11 x 11 predictors).
    nquantiles
        QDM only: quantiles of the transfer function.

    Raises
    ------
    ValueError
        For an unknown method, a trained method without ``train``, or a factor
        that cannot be inferred.
    """
    if method not in METHODS:
        raise ValueError(f"unknown baseline method {method!r}; choose one of {METHODS}")
    if method in TRAINED and train is None:
        raise ValueError(
            f"baseline {method!r} is learnt from data: pass train=(coarse_train, fine_train)"
        )
    if train is not None:
        factor = _infer_factor(train[0], train[1], factor)
    if factor is None:
        raise ValueError(f"baseline {method!r}: pass factor= (or train=, to infer it)")
    options: dict[str, Any] = dict(
        factor=factor, periodic=periodic, time_dim=time_dim, window=window, nquantiles=nquantiles
    )
    if isinstance(coarse, xr.Dataset):
        ydim, xdim = grid.spatial_dims(coarse)
        out = {
            name: baseline(
                var,
                method,
                train=None
                if train is None
                else (_variable(train[0], name), _variable(train[1], name)),
                **options,
            )
            for name, var in coarse.data_vars.items()
            if ydim in var.dims and xdim in var.dims
        }
        return xr.Dataset(out, attrs=dict(coarse.attrs)).assign_coords(
            grid.fine_grid(coarse, factor, ydim, xdim)
        )
    if periodic is None:
        ydim, xdim = grid.spatial_dims(coarse)
        periodic = grid.is_global_longitude(coarse[xdim], coarse)
    base = "bicubic" if method in TRAINED else method
    fine = interpolate(coarse, factor, base, periodic)
    if method in INTERPOLATIONS:
        return fine
    assert train is not None  # checked above for the TRAINED methods
    coarse_train, fine_train = (_variable(t, coarse.name) for t in train)
    # the training pair on the cells of ``coarse``, matched by value (longitudes
    # modulo 360, either orientation), so a fit by position applies to them
    coarse_train = grid.match_grid(
        coarse_train, coarse, label="coarse training data", ref_label="coarse data"
    )
    bicubic_train = interpolate(coarse_train, factor, "bicubic", periodic)
    truth = grid.match_grid(fine_train, bicubic_train, label="fine training data", ref_label="grid")
    truth = truth.transpose(*bicubic_train.dims)
    if method == "climatology":
        correction = (truth - bicubic_train).mean([time_dim])
        return (fine + correction).assign_attrs(fine.attrs).rename(coarse.name)
    if method == "qdm":
        return _qdm(fine, bicubic_train, truth, time_dim, nquantiles)
    return _ridge(
        coarse, fine, coarse_train, bicubic_train, truth, factor, time_dim, window, periodic
    )


def _variable(obj: xr.DataArray | xr.Dataset, name: Hashable) -> xr.DataArray:
    if isinstance(obj, xr.DataArray):
        return obj
    if name not in obj.data_vars:
        raise KeyError(
            f"variable {name!r} is not in the training data (has {sorted(map(str, obj.data_vars))})"
        )
    return obj[name]


def _infer_factor(coarse, fine, factor: int | None) -> int:
    cy, cx = grid.spatial_dims(coarse)
    fy, fx = grid.spatial_dims(fine)
    ratios = {fine.sizes[fy] / coarse.sizes[cy], fine.sizes[fx] / coarse.sizes[cx]}
    if len(ratios) != 1 or int(next(iter(ratios))) != next(iter(ratios)):
        raise ValueError(
            f"the fine training grid ({fine.sizes[fy]} x {fine.sizes[fx]}) is not the coarse "
            f"one ({coarse.sizes[cy]} x {coarse.sizes[cx]}) times an integer factor"
        )
    inferred = int(next(iter(ratios)))
    if factor is not None and factor != inferred:
        raise ValueError(f"factor={factor}, but the training pair is {inferred} times finer")
    return inferred


# --------------------------------------------------------------------------- QDM
def _qdm(fine, bicubic_train, truth, time_dim, nquantiles):
    import xsdba

    units = fine.attrs.get("units") or "1"

    def prep(a):
        # xsdba groups along a dim named "time" and wants units on every input
        a = a.rename({time_dim: "time"}) if time_dim != "time" else a
        a = a.assign_attrs(units=a.attrs.get("units") or units)
        return a.chunk({"time": -1}) if isinstance(a.data, da.Array) else a

    qdm = xsdba.QuantileDeltaMapping.train(
        ref=prep(truth), hist=prep(bicubic_train), nquantiles=nquantiles, kind="+", group="time"
    )
    out = qdm.adjust(sim=prep(fine))
    if time_dim != "time":
        out = out.rename({"time": time_dim})
    out = out.transpose(*fine.dims).drop_vars(
        [c for c in out.coords if c not in fine.coords], errors="ignore"
    )
    return out.assign_attrs(fine.attrs).rename(fine.name)


# --------------------------------------------------------------------------- ridge
@dataclass
class RidgeFit:
    """A fitted per-window ridge regression.

    ``windows [n_cells, p]``: flat coarse indices of each coarse cell's
    predictors (every row the same when the window is the whole domain);
    ``coef [n_cells, p, k*k]`` the coefficients of the ``k*k`` fine pixels of
    each cell; ``x_mean, x_std [ny*nx]`` the predictors' scaling;
    ``r_mean [n_cells, k*k]`` the mean residual (the climatological
    correction); ``alpha`` the penalty chosen among ``alphas`` by the blocked
    cross-validation RMSE ``cv_rmse``.
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

    @property
    def whole_domain(self) -> bool:
        return bool((self.windows == self.windows[0]).all())

    def predict(self, coarse: np.ndarray) -> np.ndarray:
        """Residual ``[..., ny k, nx k]`` for coarse fields ``[..., ny, nx]``."""
        ny, nx = self.shape
        k = self.factor
        lead = coarse.shape[:-2]
        x = np.nan_to_num((coarse.reshape(-1, ny * nx) - self.x_mean) / self.x_std)
        if self.whole_domain:  # one design matrix for every cell: a plain product
            r = np.einsum("tp,cpq->tcq", x, self.coef)
        else:
            r = np.einsum("tcp,cpq->tcq", x[:, self.windows], self.coef)
        r = (r + self.r_mean).reshape(-1, ny, nx, k, k).transpose(0, 1, 3, 2, 4)
        return r.reshape(*lead, ny * k, nx * k).astype(np.float32)


def _windows(ny: int, nx: int, half: int | None, periodic: bool) -> np.ndarray:
    """Flat predictor indices ``[n_cells, p]`` of each coarse cell's window.

    A window that would cross a non-periodic edge is shifted inward (as tiles
    are), so every window has the same size; a periodic longitude wraps.
    """
    if half is None or (2 * half + 1 >= ny and 2 * half + 1 >= nx):
        return np.tile(np.arange(ny * nx), (ny * nx, 1))
    wy, wx = min(2 * half + 1, ny), min(2 * half + 1, nx)
    iy, ix = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    y0 = np.clip(iy - half, 0, ny - wy)
    x0 = ix - half if periodic else np.clip(ix - half, 0, nx - wx)
    dy, dx = np.meshgrid(np.arange(wy), np.arange(wx), indexing="ij")
    rows = y0.reshape(-1, 1) + dy.reshape(1, -1)
    cols = (x0.reshape(-1, 1) + dx.reshape(1, -1)) % nx
    return rows * nx + cols


def _solve(u, s, vt, r, alphas):
    """Ridge coefficients for each alpha: ``V diag(s / (s² + α)) Uᵀ R`` (batched)."""
    ur = np.einsum("gtm,gtq->gmq", u, r)
    return [np.einsum("gmp,gm,gmq->gpq", vt, s / (s**2 + a), ur) for a in alphas]


def fit_ridge(
    coarse: np.ndarray,
    residual: np.ndarray,
    factor: int,
    *,
    window: int | None = None,
    periodic: bool = False,
    alphas: Sequence[float] | None = None,
    folds: int = 5,
    batch: int = 256,
) -> RidgeFit:
    """Fit the per-window ridge of `baseline`'s ``"ridge"`` on numpy arrays.

    ``coarse [T, ny, nx]`` training coarse fields; ``residual [T, ny k, nx k]``
    their ``fine - bicubic`` (NaN: missing, left out).  One penalty for all
    windows, the one with the least squared error over ``folds`` contiguous
    blocks of years, each predicted by a fit on the others.
    """
    t, ny, nx = coarse.shape
    k = int(factor)
    if t < 4:
        raise ValueError(f"ridge needs at least 4 training time steps, got {t}")
    folds = min(folds, t // 2)
    half = window
    if half is None and ny * nx > WHOLE_DOMAIN_MAX:
        half = 5
    windows = _windows(ny, nx, half, periodic)
    whole = bool((windows == windows[0]).all())
    x_all = coarse.reshape(t, ny * nx).astype(np.float64)
    x_mean = np.nanmean(x_all, axis=0)
    x_std = np.nanstd(x_all, axis=0)
    x_std = np.where(x_std > 0, x_std, 1.0)
    x_all = np.nan_to_num((x_all - x_mean) / x_std)
    r = residual.reshape(t, ny, k, nx, k).transpose(0, 1, 3, 2, 4).reshape(t, ny * nx, k * k)
    r = r.astype(np.float64)
    valid = np.isfinite(r)
    r_mean = np.nan_to_num(np.nanmean(r, axis=0))
    r_anom = np.where(valid, r - r_mean, 0.0)
    grid_alphas = np.asarray(alphas if alphas is not None else ALPHAS * t, np.float64)
    n_cells = ny * nx

    def groups():
        """(cells, design [g, T, p], targets [g, T, q]) in batches of cells."""
        if whole:  # one design for all cells: one solve, every fine pixel a target
            yield slice(None), x_all[None], r_anom.reshape(t, 1, -1).transpose(1, 0, 2)
            return
        for c0 in range(0, n_cells, batch):
            cells = np.arange(c0, min(n_cells, c0 + batch))
            yield (
                cells,
                np.moveaxis(x_all[:, windows[cells]], 1, 0),
                np.moveaxis(r_anom[:, cells], 1, 0),
            )

    edges = np.linspace(0, t, folds + 1).round().astype(int)
    sse = np.zeros(len(grid_alphas))
    for _, x, y in groups():
        for f in range(folds):
            test = np.zeros(t, bool)
            test[edges[f] : edges[f + 1]] = True
            u, s, vt = np.linalg.svd(x[:, ~test], full_matrices=False)
            for i, b in enumerate(_solve(u, s, vt, y[:, ~test], grid_alphas)):
                pred = np.einsum("gtp,gpq->gtq", x[:, test], b)
                sse[i] += float(((pred - y[:, test]) ** 2).sum())
    alpha = float(grid_alphas[int(np.argmin(sse))])
    coef = np.zeros((n_cells, windows.shape[1], k * k))
    for cells, x, y in groups():
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        b = _solve(u, s, vt, y, [alpha])[0]
        if whole:  # [1, p, cells * q] -> [cells, p, q]
            b = b[0].reshape(-1, n_cells, k * k).transpose(1, 0, 2)
        coef[cells] = b
    return RidgeFit(
        windows=windows,
        coef=coef.astype(np.float32),
        x_mean=x_mean,
        x_std=x_std,
        r_mean=r_mean.astype(np.float32),
        alpha=alpha,
        alphas=grid_alphas,
        cv_rmse=np.sqrt(sse / max(1, int(valid.sum()))),
        shape=(ny, nx),
        factor=k,
    )


def _ridge(coarse, fine, coarse_train, bicubic_train, truth, factor, time_dim, window, periodic):
    ydim, xdim = grid.spatial_dims(coarse)
    order = [time_dim, ydim, xdim]
    ct = coarse_train.transpose(*order).values
    residual = (truth - bicubic_train).transpose(*order).values
    fit = fit_ridge(ct, residual, factor, window=window, periodic=bool(periodic))
    dims = [d for d in coarse.dims if d not in (ydim, xdim)] + [ydim, xdim]
    src = coarse.transpose(*dims)
    ny, nx = src.shape[-2:]
    data = src.data
    if isinstance(data, da.Array):
        data = data.rechunk({-2: -1, -1: -1})
        chunks = (*data.chunks[:-2], (ny * factor,), (nx * factor,))
        correction = data.map_blocks(fit.predict, chunks=chunks, dtype=np.float32)
    else:
        correction = fit.predict(np.asarray(data, np.float64))
    out = fine.transpose(*dims) + xr.DataArray(correction, dims=dims)
    out = out.transpose(*fine.dims).assign_attrs(fine.attrs).rename(fine.name)
    out.attrs["xorbit_ridge_alpha"] = fit.alpha
    return out
