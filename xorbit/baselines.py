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
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from . import grid
from .regrid import interpolate
from .ridge import RidgeFit, fit_ridge

__all__ = ["INTERPOLATIONS", "METHODS", "TRAINED", "RidgeFit", "baseline", "fit_ridge"]

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "conservative")
TRAINED = ("climatology", "ridge", "qdm")
METHODS = INTERPOLATIONS + TRAINED


def baseline(
    coarse: xr.DataArray | xr.Dataset,
    method: str,
    *,
    train: tuple[xr.DataArray | xr.Dataset, xr.DataArray | xr.Dataset] | None = None,
    factor: int | None = None,
    periodic: bool | None = None,
    time_dim: Hashable = "time",
    window: int | str | None = None,
    nquantiles: int = 50,
    predictors: Sequence[str] | None = None,
    _inputs: tuple[xr.Dataset, xr.Dataset] | None = None,
) -> xr.DataArray | xr.Dataset:
    """A statistical baseline on the fine grid of ``.orbit.downscale``; lazy on Dask input.

    Parameters
    ----------
    coarse
        The coarse fields to downscale: a DataArray, or a Dataset (each of its
        spatial variables; with ``train``, those the fine training data hold).
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
        ``"cv"``: on a larger domain, the whole domain or 5, whichever the
        blocked cross-validation prefers (as a Reslim model's linear path does);
        ``attrs["xorbit_ridge_half"]`` says which (``-1``: the whole domain).
    nquantiles
        QDM only: quantiles of the transfer function.
    predictors
        Ridge only, ``coarse`` a Dataset: the coarse variables each output is
        regressed on (every one in each cell's window), e.g.
        ``["pr", "u", "v"]`` for precipitation from itself and the winds.
        Default: the output variable alone.

    Raises
    ------
    ValueError
        For an unknown method, a trained method without ``train``, a factor
        that cannot be inferred, or ``predictors`` without a Dataset.
    KeyError
        For a predictor missing from ``coarse`` or the coarse training data.
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
    if predictors is not None and method != "ridge":
        raise ValueError(f"predictors= is an option of the ridge baseline, not of {method!r}")
    if isinstance(coarse, xr.Dataset):
        ydim, xdim = grid.spatial_dims(coarse)
        if predictors is not None:
            assert train is not None  # ridge is trained
            names = list(predictors)
            for label, ds in (("the coarse data", coarse), ("the coarse training data", train[0])):
                missing = [n for n in names if n not in ds.data_vars]
                if missing:
                    raise KeyError(
                        f"predictors {missing} are not in {label} "
                        f"(has {sorted(map(str, ds.data_vars))})"
                    )
            options["_inputs"] = (coarse[names], _as_dataset(train[0])[names])
        wanted = [
            name
            for name, var in coarse.data_vars.items()
            if ydim in var.dims
            and xdim in var.dims
            and (train is None or isinstance(train[1], xr.DataArray) or name in train[1])
        ]
        out = {
            name: baseline(
                coarse[name],
                method,
                train=None
                if train is None
                else (_variable(train[0], name), _variable(train[1], name)),
                **options,
            )
            for name in wanted
        }
        return xr.Dataset(out, attrs=dict(coarse.attrs)).assign_coords(
            grid.fine_grid(coarse, factor, ydim, xdim)
        )
    if predictors is not None:
        raise ValueError(
            "predictors= names variables of a Dataset: give coarse (and train) as Datasets"
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
    if _inputs is None:
        inputs = (coarse.to_dataset(name="_x"), coarse_train.to_dataset(name="_x"))
    else:
        ref = coarse.to_dataset(name="_ref")
        inputs = (
            _inputs[0],
            grid.match_grid(_inputs[1], ref, label="coarse training data", ref_label="coarse data"),
        )
    return _ridge(inputs, fine, bicubic_train, truth, factor, time_dim, window, periodic)


def _as_dataset(obj: xr.DataArray | xr.Dataset) -> xr.Dataset:
    return obj if isinstance(obj, xr.Dataset) else obj.to_dataset()


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
def _ridge(inputs, fine, bicubic_train, truth, factor, time_dim, window, periodic):
    """Bicubic plus the ridge of ``fine - bicubic`` on the predictors ``inputs``.

    ``inputs``: ``(coarse, coarse_train)`` Datasets of the predictors, on the
    data's cells; the regression reads every one of their variables.
    """
    data, train = inputs
    names = list(data.data_vars)
    ydim, xdim = grid.spatial_dims(data)
    order = [time_dim, ydim, xdim]
    ct = np.stack([train[n].transpose(*order).values for n in names], axis=1)
    residual = (truth - bicubic_train).transpose(*order).values[:, None]
    fit = fit_ridge(ct, residual, factor, window=window, periodic=bool(periodic))
    dims = [d for d in fine.dims if d not in (ydim, xdim)] + [ydim, xdim]
    lead = dims[:-2]
    srcs = [data[n].transpose(*[d for d in lead if d in data[n].dims], ydim, xdim) for n in names]
    ny, nx = srcs[0].shape[-2:]
    if any(isinstance(s.data, da.Array) for s in srcs):
        stacked = da.stack([da.asarray(s.data) for s in srcs], axis=-3)
        stacked = stacked.rechunk({-3: -1, -2: -1, -1: -1})
        chunks = (*stacked.chunks[:-3], (1,), (ny * factor,), (nx * factor,))
        correction = stacked.map_blocks(fit.predict, chunks=chunks, dtype=np.float32)[..., 0, :, :]
    else:
        stacked = np.stack([np.asarray(s.values, np.float64) for s in srcs], axis=-3)
        correction = fit.predict(stacked)[..., 0, :, :]
    out = fine.transpose(*dims) + xr.DataArray(correction, dims=dims)
    out = out.transpose(*fine.dims).assign_attrs(fine.attrs).rename(fine.name)
    out.attrs["xorbit_ridge_alpha"] = fit.alpha
    out.attrs["xorbit_ridge_half"] = -1 if fit.half is None else fit.half
    return out
