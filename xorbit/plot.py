"""Figures (needs the ``plot`` extra: matplotlib).  Each function returns the figure."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import xarray as xr

__all__ = ["compare_maps", "spectra", "training_curves"]


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
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

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


def spectra(spec: xr.Dataset, title: str | None = None):
    """Log-log power spectra, one line per data variable of `xorbit.metrics.power_spectra`."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), constrained_layout=True)
    for name, line in spec.data_vars.items():
        ax.loglog(spec.wavenumber, line, label=str(name))
    ax.set_xlabel("wavenumber (half-cycles per domain)")
    ax.set_ylabel("variance per band")
    ax.legend()
    ax.set_title(title or "radially averaged power spectra")
    return fig


def training_curves(history: list[dict[str, float]], title: str | None = None):
    """Training loss and validation RMSE (model vs bicubic) per epoch."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("training_curves: the history is empty (was the model trained?)")
    epochs = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    a1.semilogy(epochs, [h["loss"] for h in history])
    a1.set_xlabel("epoch")
    a1.set_ylabel("training loss")
    for key in sorted({k for h in history for k in h if k.startswith("rmse_")}):
        a2.plot(epochs, [h.get(key, np.nan) for h in history], label=key[5:])
    a2.set_xlabel("epoch")
    a2.set_ylabel("validation RMSE")
    a2.legend()
    if title:
        fig.suptitle(title)
    return fig
