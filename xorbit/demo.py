"""The demo job: train on bundled HadCM3 data, downscale held-out years, score, write files.

``make demo`` and ``xorbit demo`` run `run_demo`; the test suite runs it too.
"""

from __future__ import annotations

__all__ = ["DEMO_SPLIT_YEAR", "format_table", "run_demo"]

DEMO_SPLIT_YEAR = 2040


def run_demo(
    out_dir: str = "demo-output",
    epochs: int = 150,
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

    from . import ReslimConfig, coarsen, train
    from .datasets import hadcm3_air_temperature
    from .metrics import anomaly_r2, bias, rmse

    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fine = hadcm3_air_temperature()  # 240 x 36 x 48, K
    coarse = coarsen(fine, 4)  # 240 x 9 x 12: the model's input
    is_train = fine.time.dt.year <= DEMO_SPLIT_YEAR
    statics = ["coord_latitude", "coord_sinlon", "coord_coslon"]
    config = ReslimConfig.preset(
        "tiny",
        factor=4,
        in_vars=["air_temperature", *statics],
        out_vars=["air_temperature"],
        static_vars=statics,
        img_size=coarse.shape[-2:],
        # one window covers this small region, so a learnt position embedding
        # can place each token; no dropout for 150 short epochs
        learn_pos_embed=True,
        drop_path=0.0,
        drop_rate=0.0,
        res_km=140.0,
        interp_skip="bicubic",  # learn the correction to bicubic: extrapolates better
    )
    t0 = time.perf_counter()
    dsr = train(
        coarse.sel(time=is_train),
        fine.sel(time=is_train),
        config,
        epochs=epochs,
        batch_size=8,
        lr=3e-3,
        tv_lambda=0.001,
        val_fraction=0.15,
        seed=seed,
        device="cpu",
        progress=progress,
        tile=coarse.shape[-2:],
        halo=(0, 0),
    )
    train_s = time.perf_counter() - t0
    dsr.save(out / "hadcm3_x4.xorbit")

    # held-out years, downscaled lazily; nothing is computed before the scores
    test_coarse = coarse.sel(time=~is_train).chunk(time=10)
    truth = fine.sel(time=~is_train)
    pred = test_coarse.orbit.downscale(dsr, tile=coarse.shape[-2:], halo=0, device="cpu")
    truth = truth.assign_coords(latitude=pred.latitude, longitude=pred.longitude)
    bicubic = test_coarse.orbit.interpolate(4, "bicubic")
    bilinear = test_coarse.orbit.interpolate(4, "bilinear")
    # the statistical baseline: bicubic plus the per-pixel mean of (fine - bicubic)
    # over the training years
    train_bicubic = coarse.sel(time=is_train).orbit.interpolate(4, "bicubic")
    correction = (
        fine.sel(time=is_train).assign_coords(latitude=pred.latitude, longitude=pred.longitude)
        - train_bicubic
    ).mean("time")
    corrected = bicubic + correction
    methods = {
        "bilinear": bilinear,
        "bicubic": bicubic,
        "bicubic + climatology": corrected,
        "xorbit (Reslim)": pred,
    }
    rows = {}
    for name, field in methods.items():
        rows[name] = {
            "rmse_K": rmse(field, truth),
            "bias_K": bias(field, truth),
            "anomaly_r2": anomaly_r2(field, truth),
        }
    import dask

    (computed,) = dask.compute(rows)
    table = xr.Dataset(
        {
            key: ("method", [float(computed[m][key]) for m in methods])
            for key in ("rmse_K", "bias_K", "anomaly_r2")
        },
        coords={"method": list(methods)},
    )
    table["rmse_vs_bicubic"] = table.rmse_K / table.rmse_K.sel({"method": "bicubic"})

    nc = pred.orbit.to_netcdf(
        out / "hadcm3_x4_2041-2099.nc",
        title="HadCM3 SRES A1B air temperature downscaled x4 by xorbit",
    )
    year = 2070
    sel = {"time": truth.time.dt.year == year}
    fig = _demo_figure(test_coarse, bicubic, pred, truth, sel, year)
    png = out / "hadcm3_x4_demo.png"
    fig.savefig(png, dpi=110)
    return {
        "table": table,
        "netcdf": nc,
        "png": png,
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
    lines = [
        f"{'method':<24}{'RMSE (K)':>10}{'bias (K)':>10}{'anomaly R²':>12}{'RMSE/bicubic':>14}",
    ]
    for m in table.method.values:
        r = table.sel({"method": m})
        lines.append(
            f"{m:<24}{float(r.rmse_K):>10.3f}{float(r.bias_K):>10.3f}"
            f"{float(r.anomaly_r2):>12.4f}{float(r.rmse_vs_bicubic):>14.2f}"
        )
    return "\n".join(lines)
