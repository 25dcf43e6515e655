"""Figures (needs the ``plot`` extra: matplotlib).  Each function returns the figure."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import xarray as xr

__all__ = ["compare_maps"]


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
