"""The demo job: train on bundled HadCM3 data, downscale held-out years, score, write files.

``make demo`` and ``xorbit demo`` run `run_demo`; the test suite runs it too.
"""

from __future__ import annotations

__all__ = ["DEMO_SPLIT_YEAR", "format_table", "run_demo"]

DEMO_SPLIT_YEAR = 2040

# the statistical baselines of the demo table, in its order (xorbit comes last)
BASELINES = ("bilinear", "bicubic", "climatology", "ridge", "qdm")
# table column -> `xorbit.evaluate` score
TABLE_COLUMNS = {
    "rmse_K": "rmse",
    "bias_K": "bias",
    "anomaly_r2": "anomaly_r2",
    "trend_bias_K_per_decade": "trend_bias",
    "p99_bias_K": "p99_bias",
}


def run_demo(
    out_dir: str = "demo-output",
    epochs: int = 40,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train on HadCM3 A1B years up to 2040, downscale 2041-2099, score, write files.

    Returns ``{"table": xr.Dataset of scores, "netcdf": path, "png": path,
    "downscaler": Downscaler}``.
    """
    import time
    from pathlib import Path

    import numpy as np
    import torch
    import xarray as xr

    from . import ReslimConfig, baseline, coarsen, evaluate, train
    from .baselines import TRAINED
    from .datasets import hadcm3_air_temperature
    from .grid import match_grid

    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fine = hadcm3_air_temperature()  # 240 x 36 x 48, K
    coarse = coarsen(fine, 4)  # 240 x 9 x 12: the model's input
    is_train = fine.time.dt.year <= DEMO_SPLIT_YEAR
    # the default recipe: only the preset, the variables and the number of epochs
    config = ReslimConfig.preset(
        "tiny", factor=4, in_vars=["air_temperature"], out_vars=["air_temperature"]
    )
    t0 = time.perf_counter()
    dsr = train(
        coarse.sel(time=is_train),
        fine.sel(time=is_train),
        config,
        epochs=epochs,
        seed=seed,
        device="cpu",
        progress=progress,
    )
    train_s = time.perf_counter() - t0
    dsr.save(out / "hadcm3_x4.xorbit")

    # held-out years, downscaled lazily; nothing is computed before the scores
    test_coarse = coarse.sel(time=~is_train).chunk(time=10)
    pred = test_coarse.orbit.downscale(dsr, device="cpu")
    truth = match_grid(fine.sel(time=~is_train), pred)
    pair = (coarse.sel(time=is_train), fine.sel(time=is_train))
    methods = {
        m: baseline(test_coarse, m, train=pair if m in TRAINED else None, factor=4)
        for m in BASELINES
    }
    methods["xorbit"] = pred
    scores = evaluate(methods, truth).sel(variable="air_temperature").compute()
    table = xr.Dataset(
        {name: scores[key] for name, key in TABLE_COLUMNS.items()},
        coords={"method": list(methods)},
    )
    table["rmse_vs_bicubic"] = table.rmse_K / table.rmse_K.sel({"method": "bicubic"})
    bicubic = methods["bicubic"]

    nc = pred.orbit.to_netcdf(
        out / "hadcm3_x4_2041-2099.nc",
        title="HadCM3 SRES A1B air temperature downscaled x4 by xorbit",
    )
    year = 2070
    sel = {"time": truth.time.dt.year == year}
    fig = _demo_figure(test_coarse, bicubic, pred, truth, sel, year)
    png = out / "hadcm3_x4_demo.png"
    fig.savefig(png, dpi=110)
    import matplotlib.pyplot as plt

    from .plot import report

    shown = {m: methods[m] for m in ("bicubic", "climatology", "ridge", "xorbit")}
    report_png = out / "hadcm3_x4_report.png"
    summary = report(truth, shown, coarse=test_coarse)
    summary.savefig(report_png, dpi=90)
    for done in (fig, summary):  # written: not left open in the caller's pyplot
        plt.close(done)
    return {
        "table": table,
        "netcdf": nc,
        "png": png,
        "report_png": report_png,
        "downscaler": dsr,
        "train_seconds": train_s,
        "n_train_years": int(np.sum(is_train.values)),
    }


def _demo_figure(coarse, bicubic, pred, truth, sel, year):
    from .plot import compare_maps

    panels = {
        "coarse (input)": coarse.sel(sel).squeeze("time").compute(),
        "bicubic": bicubic.sel(sel).squeeze("time").compute(),
        "xorbit": pred.sel(sel).squeeze("time").compute(),
        "truth": truth.sel(sel).squeeze("time"),
    }
    return compare_maps(
        panels,
        truth_key="truth",
        error_of="xorbit",
        title=f"HadCM3 A1B near-surface air temperature, {year} (held out), x4",
    )


def format_table(table) -> str:
    """The demo table as text: one row per method."""
    cols = [
        ("RMSE (K)", "rmse_K", ".3f"),
        ("bias (K)", "bias_K", ".3f"),
        ("anomaly R²", "anomaly_r2", ".4f"),
        ("trend bias (K/10y)", "trend_bias_K_per_decade", ".4f"),
        ("p99 bias (K)", "p99_bias_K", ".3f"),
        ("RMSE/bicubic", "rmse_vs_bicubic", ".2f"),
    ]
    lines = [f"{'method':<14}" + "".join(f"{title:>{len(title) + 2}}" for title, _, _ in cols)]
    for m in table.method.values:
        r = table.sel({"method": m})
        lines.append(
            f"{m!s:<14}"
            + "".join(f"{float(r[key]):>{len(title) + 2}{fmt}}" for title, key, fmt in cols)
        )
    return "\n".join(lines)
