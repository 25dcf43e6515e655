"""Figures (needs the ``plot`` extra: matplotlib).  Each function returns the figure.

`report` is the one-page evaluation a downscaling scientist reads first: where
each method is wrong on average, whether it has the truth's small-scale
variance, whether it keeps the truth's trends, and whether its extremes are the
truth's.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import xarray as xr

from . import grid

__all__ = ["QQ_QUANTILES", "compare_maps", "report", "spectra", "training_curves"]

# the tails the QQ panel of `report` compares: the lower and the upper 10 %
QQ_QUANTILES = np.array(
    [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999]
)


def _pyplot():
    """pyplot, on whatever backend the user has (never switched here).

    matplotlib picks Agg by itself where there is no display, so headless runs
    need nothing; an interactive session keeps its windows and ``plt.show()``.
    """
    import matplotlib.pyplot as plt

    return plt


def compare_maps(
    panels: Mapping[str, xr.DataArray],
    truth_key: str = "truth",
    error_of: str | None = None,
    title: str | None = None,
):
    """Side-by-side maps (e.g. coarse | bicubic | xorbit | truth) plus an error map.

    Parameters
    ----------
    panels
        Title → 2-D field.  All but the error share one colour scale.
    truth_key
        The panel that is the truth.
    error_of
        Panel whose difference from the truth is drawn last (diverging scale).
    """
    plt = _pyplot()
    names = list(panels)
    n = len(names) + (1 if error_of else 0)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.0), constrained_layout=True)
    axes = np.atleast_1d(axes)
    values = [np.asarray(panels[k]) for k in names]
    vmin = min(float(np.nanmin(v)) for v in values)
    vmax = max(float(np.nanmax(v)) for v in values)
    im = None
    for ax, name in zip(axes, names, strict=False):
        im = panels[name].plot.imshow(
            ax=ax, vmin=vmin, vmax=vmax, cmap="RdYlBu_r", add_colorbar=False, origin="lower"
        )
        ax.set_title(name)
    fig.colorbar(im, ax=axes[: len(names)].tolist(), shrink=0.8, label=_units(panels[names[0]]))
    if error_of:
        err = panels[error_of] - panels[truth_key].values
        lim = float(np.nanmax(np.abs(err)))
        ie = err.plot.imshow(
            ax=axes[-1], vmin=-lim, vmax=lim, cmap="RdBu_r", add_colorbar=False, origin="lower"
        )
        axes[-1].set_title(f"{error_of} − {truth_key}")
        fig.colorbar(ie, ax=axes[-1], shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def _units(da: xr.DataArray) -> str:
    return str(da.attrs.get("units", ""))


def _draw_spectra(ax, spec: xr.Dataset, title: str | None = None) -> None:
    for name, line in spec.data_vars.items():
        ax.loglog(spec.wavenumber, line, label=str(name))
    ax.set_xlabel("wavenumber (half-cycles per domain)")
    ax.set_ylabel("variance per band")
    ax.legend()
    ax.set_title(title or "radially averaged power spectra")


def spectra(spec: xr.Dataset, title: str | None = None):
    """Log-log power spectra, one line per data variable of `xorbit.metrics.power_spectra`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6), constrained_layout=True)
    _draw_spectra(ax, spec, title)
    return fig


def training_curves(history: list[dict[str, float]], title: str | None = None):
    """Training loss and validation RMSE (model vs bicubic) per epoch.

    A dotted line marks the best validation epoch, whose weights training kept.
    """
    plt = _pyplot()
    if not history:
        raise ValueError("training_curves: the history is empty (was the model trained?)")
    epochs = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    a1.semilogy(epochs, [h["loss"] for h in history])
    a1.set_xlabel("epoch")
    a1.set_ylabel("training loss")
    for key in sorted({k for h in history for k in h if k.startswith("rmse_")}):
        a2.plot(epochs, [h.get(key, np.nan) for h in history], label=key[5:])
    best = int(history[-1].get("best_epoch", 0))
    if best:  # the epoch whose weights training kept
        a2.axvline(best, color="0.5", linestyle=":", label=f"best epoch ({best})")
    a2.set_xlabel("epoch")
    a2.set_ylabel("validation RMSE")
    a2.legend()
    if title:
        fig.suptitle(title)
    return fig


def _field(obj: xr.DataArray | xr.Dataset, variable: Hashable | None, what: str) -> xr.DataArray:
    """The DataArray to plot: ``obj`` itself, or its ``variable`` (or only variable)."""
    if isinstance(obj, xr.DataArray):
        return obj
    if variable is None:
        if len(obj.data_vars) != 1:
            raise ValueError(
                f"{what} holds {sorted(map(str, obj.data_vars))}: pass variable= to choose one"
            )
        (variable,) = obj.data_vars
    if variable not in obj.data_vars:
        raise ValueError(
            f"{what} has no variable {variable!r} (it has {sorted(map(str, obj.data_vars))})"
        )
    return obj[variable]


def _on_truth_grid(name: str, pred: xr.DataArray, truth: xr.DataArray) -> xr.DataArray:
    """``pred`` with the truth's coordinates, once they match the truth's values.

    Coordinates that differ by round-off (float32 against float64 latitudes) are
    taken from the truth, so the error is never silently NaN or misaligned.
    """
    if set(pred.dims) != set(truth.dims):
        raise ValueError(f"method {name!r} has dims {pred.dims}, the truth {truth.dims}")
    for dim in truth.dims:
        if pred.sizes[dim] != truth.sizes[dim]:
            raise ValueError(
                f"method {name!r} has {pred.sizes[dim]} points along {dim!r}, "
                f"the truth {truth.sizes[dim]}: put it on the truth's grid first"
            )
        if dim not in truth.coords or dim not in pred.coords:
            continue
        a, b = pred[dim].values, truth[dim].values
        if np.issubdtype(a.dtype, np.number) and np.issubdtype(b.dtype, np.number):
            step = np.abs(np.diff(b)).min() if b.size > 1 else 1.0
            same = np.allclose(a, b, rtol=0, atol=0.01 * step)
        else:
            same = bool(np.all(a == b))
        if not same:
            raise ValueError(
                f"method {name!r} and the truth differ in their {dim!r} values: "
                "put it on the truth's grid (and times) first"
            )
    return pred.transpose(*truth.dims).assign_coords({d: truth[d] for d in truth.coords})


def _absmax(fields) -> float:
    """The largest finite magnitude in ``fields`` (1 if none): a symmetric colour scale."""
    m = max((float(np.nanmax(np.abs(f.values), initial=0.0)) for f in fields), default=0.0)
    return m if np.isfinite(m) and m > 0 else 1.0


def _map_row(fig, ncols: int, maps: Mapping[str, xr.DataArray], cmap: str, label: str) -> None:
    """Title → map, left to right in ``ncols`` columns, on one symmetric colour scale."""
    lim = _absmax(maps.values())
    gs = fig.add_gridspec(1, ncols)
    axes = [fig.add_subplot(gs[0, i]) for i in range(len(maps))]
    for ax, (title, field) in zip(axes, maps.items(), strict=True):
        ydim, xdim = grid.spatial_dims(field)
        im = field.plot.pcolormesh(
            ax=ax, x=xdim, y=ydim, vmin=-lim, vmax=lim, cmap=cmap, add_colorbar=False
        )
        ax.set_title(title)
    fig.colorbar(im, ax=axes, shrink=0.8, label=label)


def _qq(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pooled quantiles `QQ_QUANTILES` of the truth and of a method (NaN left out)."""
    return np.nanquantile(truth, QQ_QUANTILES), np.nanquantile(pred, QQ_QUANTILES)


def report(
    truth: xr.DataArray | xr.Dataset,
    predictions: Mapping[str, xr.DataArray | xr.Dataset],
    *,
    coarse: xr.DataArray | xr.Dataset | None = None,
    time_dim: str = "time",
    variable: str | None = None,
):
    """One figure that evaluates downscaled fields against the truth.

    Rows: (1) the time-mean error ``prediction − truth`` of each method on one
    diverging colour scale; (2) the per-pixel linear trend over ``time_dim``
    (`xorbit.metrics.trend`: least squares against the calendar's decimal
    years, in units per decade) of the truth, each method and the
    coarse input, on one colour scale; (3) radially averaged power spectra
    (`xorbit.metrics.power_spectra`) of the truth, each method and the coarse
    input, and a quantile–quantile plot of the extremes: the pooled quantiles
    `QQ_QUANTILES` (0.001…0.1 and 0.9…0.999, every pixel and time) of each
    method against the truth's, with the 1:1 line.

    Parameters
    ----------
    truth
        The high-resolution truth (DataArray, or Dataset with ``variable``).
    predictions
        Method name → prediction on the truth's grid and times.
    coarse
        The low-resolution input, on its own grid (optional): its spectrum shows
        what the input resolves, its trend what the methods should keep.
    time_dim
        The time dimension.
    variable
        The variable to plot when Datasets are given.

    Notes
    -----
    The data are loaded (pooled quantiles need every value).

    Raises
    ------
    ValueError
        If ``predictions`` is empty, a method is named ``truth`` or ``coarse``,
        a field lacks ``time_dim``, or a method is not on the truth's grid.
    """
    if not predictions:
        raise ValueError("report needs at least one prediction: {method: DataArray}")
    clash = {"truth", "coarse"} & set(predictions)
    if clash:
        raise ValueError(f"method names {sorted(clash)} are reserved: rename them")
    truth = _field(truth, variable, "truth")
    if time_dim not in truth.dims:
        raise ValueError(f"the truth has no time dimension {time_dim!r} (dims {truth.dims})")
    # compute, not load: the caller's Dask-backed objects stay lazy
    truth = truth.compute()
    preds = {
        str(k): _on_truth_grid(str(k), _field(v, variable, f"method {k!r}"), truth).compute()
        for k, v in predictions.items()
    }
    extra = {}
    if coarse is not None:
        extra["coarse"] = _field(coarse, variable, "coarse").compute()
        if time_dim not in extra["coarse"].dims:
            raise ValueError(
                f"coarse has no time dimension {time_dim!r} (dims {extra['coarse'].dims})"
            )
    units = truth.attrs.get("units", "")

    from .metrics import power_spectra, trend

    plt = _pyplot()
    trends = {"truth": truth, **preds, **extra}
    ncols = max(len(trends), 2)
    fig = plt.figure(figsize=(3.2 * ncols, 9.6), layout="constrained")
    # one sub-figure per row: each row's colour bar then takes no room from the others
    rows = fig.subfigures(3, 1)

    errors = {f"{k} − truth (time mean)": (p - truth).mean(time_dim) for k, p in preds.items()}
    _map_row(rows[0], ncols, errors, "RdBu_r", f"mean error ({units})" if units else "mean error")
    slopes = {f"{k} trend": trend(f, time_dim) for k, f in trends.items()}
    _map_row(rows[1], ncols, slopes, "PuOr_r", f"{units} per decade" if units else "per decade")

    bottom = rows[2].add_gridspec(1, ncols)
    half = ncols // 2
    # the coarse field has fewer wavenumbers: its own spectrum, aligned on the
    # wavenumber (half-cycles per domain: the same scale on both grids)
    spec = xr.merge(
        [power_spectra(truth=truth, **preds), *[power_spectra(**{k: v}) for k, v in extra.items()]],
        join="outer",
        compat="no_conflicts",
    )
    _draw_spectra(rows[2].add_subplot(bottom[0, :half]), spec, "power spectra")

    ax = rows[2].add_subplot(bottom[0, half:])
    t = truth.values.ravel()
    lo, hi = np.inf, -np.inf
    for name, pred in preds.items():
        tq, pq = _qq(t, pred.values.ravel())
        ax.plot(tq, pq, marker="o", linestyle="none", label=name)
        lo, hi = min(lo, tq.min(), pq.min()), max(hi, tq.max(), pq.max())
    ax.plot([lo, hi], [lo, hi], color="0.4", linewidth=1, label="1:1")
    ax.set_xlabel(f"truth quantile ({units})" if units else "truth quantile")
    ax.set_ylabel("method quantile")
    ax.set_title("extremes: quantiles 0.001–0.1 and 0.9–0.999")
    ax.legend()
    return fig
