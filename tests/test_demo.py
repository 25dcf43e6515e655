"""`xorbit demo` end to end on real HadCM3 data (about a minute on 2 cores)."""

import numpy as np
import xarray as xr

from xorbit.demo import format_table, run_demo


def test_demo_beats_every_baseline_on_held_out_years(tmp_path):
    result = run_demo(str(tmp_path), epochs=40, seed=0, progress=False)
    table = result["table"]
    rmse = dict(zip(table.method.values, table.rmse_K.values, strict=True))
    # the numbers printed by `make demo` and quoted in the README
    assert rmse["bicubic"] == np.float64(rmse["bicubic"])
    assert abs(rmse["bicubic"] - 0.940) < 0.005  # plain interpolation, no training
    assert rmse["xorbit"] <= 0.6 * rmse["bicubic"]  # the first release's goal
    # the statistical baselines: the bar the model has to clear
    assert list(table.method.values) == [
        "bilinear",
        "bicubic",
        "climatology",
        "ridge",
        "qdm",
        "xorbit",
    ]
    assert abs(rmse["climatology"] - 0.271) < 0.002 and abs(rmse["ridge"] - 0.224) < 0.002
    r2 = dict(zip(table.method.values, table.anomaly_r2.values, strict=True))
    assert r2["ridge"] > r2["climatology"] + 0.001
    # the default recipe: the lowest RMSE and the highest anomaly R² of all rows
    others = [m for m in rmse if m != "xorbit"]
    assert all(rmse["xorbit"] < rmse[m] for m in others), rmse
    assert all(r2["xorbit"] > r2[m] for m in others), r2
    # and it keeps the coarse warming trend (K per decade)
    assert abs(float(table.trend_bias_K_per_decade.sel({"method": "xorbit"}))) < 0.02
    # interpolation keeps the coarse trend: its trend bias is tiny (K per decade)
    assert abs(float(table.trend_bias_K_per_decade.sel({"method": "bicubic"}))) < 0.005
    assert result["n_train_years"] == 181
    text = format_table(table)
    assert "climatology" in text and "anomaly R²" in text and "trend bias" in text
    # the files it promises
    back = xr.open_dataset(
        result["netcdf"], decode_times=xr.coders.CFDatetimeCoder(use_cftime=True)
    )
    assert back["air_temperature"].shape == (59, 36, 48)
    assert back.attrs["Conventions"] == "CF-1.10"
    assert result["png"].stat().st_size > 10_000
    assert result["report_png"].stat().st_size > 10_000
