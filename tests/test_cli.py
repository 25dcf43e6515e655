"""The `xorbit` command: every subcommand on bundled data, and one bad input each."""

import argparse
import inspect

import numpy as np
import pytest
import xarray as xr
import yaml

import xorbit
import xorbit.io
from xorbit import baseline, coarsen
from xorbit.cli import build_parser, main
from xorbit.datasets import hadcm3_air_temperature


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    fine = hadcm3_air_temperature().isel(time=slice(0, 24))
    fine.to_dataset().to_netcdf(d / "fine.nc")
    coarsen(fine, 4).isel(time=slice(12, 24)).to_dataset().to_netcdf(d / "coarse.nc")
    (d / "train.yaml").write_text(
        yaml.safe_dump(
            {
                "fine": "fine.nc",
                "variables": ["air_temperature"],
                "factor": 4,
                "model": {
                    "preset": "tiny",
                    "img_size": [8, 8],
                    "embed_dim": 16,
                    "depth": 1,
                    "decoder_depth": 1,
                },
                "train": {"epochs": 2, "batch_size": 4, "val_fraction": 0.25, "device": "cpu"},
                "output": "model.xorbit",
            }
        )
    )
    assert main(["train", str(d / "train.yaml"), "--quiet"]) == 0
    return d


def one_line_error(capsys, command):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"xorbit {command}: error: ")
    assert "Traceback" not in err
    return err


def test_train_writes_a_model(files, capsys):
    assert (files / "model.xorbit").stat().st_size > 10_000


def test_train_with_a_wrong_variable(files, tmp_path, capsys):
    spec = yaml.safe_load((files / "train.yaml").read_text())
    spec["variables"] = ["pr"]
    spec["fine"] = str(files / "fine.nc")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    assert main(["train", str(tmp_path / "bad.yaml")]) == 1
    assert "['pr'] not in" in one_line_error(capsys, "train")
    assert main(["train", str(tmp_path / "missing.yaml")]) == 1
    assert "no such config file" in one_line_error(capsys, "train")


def test_train_fine_tunes_with_init_and_freeze(files, tmp_path, capsys):
    spec = yaml.safe_load((files / "train.yaml").read_text())
    spec["fine"] = str(files / "fine.nc")
    spec["model"] = {}  # with init the architecture is the pretrained model's
    spec["train"]["val_fraction"] = 0.0
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(spec))
    pre = files / "model.xorbit"
    args = ["train", str(tmp_path / "ft.yaml"), "--init", str(pre), "--freeze", "blocks.*,norm.*"]
    assert main([*args, "--output", str(tmp_path / "ft.xorbit"), "--quiet"]) == 0
    tuned = xorbit.load(tmp_path / "ft.xorbit")
    assert tuned.config.embed_dim == 16 and tuned.config.depth == 1
    assert tuned.provenance["init"] == str(pre)
    assert tuned.provenance["freeze"] == ["blocks.*", "norm.*"]
    assert "norm.weight" in tuned.provenance["frozen"]
    capsys.readouterr()
    # the factor is the pretrained model's: another one is refused, naming both
    spec["factor"] = 2
    (tmp_path / "x2.yaml").write_text(yaml.safe_dump(spec))
    assert main(["train", str(tmp_path / "x2.yaml"), "--init", str(pre), "--quiet"]) == 1
    assert "factor 2 differs from the pretrained model's (4" in one_line_error(capsys, "train")


def test_info(files, capsys):
    assert main(["info", str(files / "model.xorbit")]) == 0
    out = capsys.readouterr().out
    assert "Reslim x4" in out and "air_temperature [K]" in out and "sha256" in out
    # the training grid travels with the model (HadCM3: 1.25 x 1.875 degrees, x4 coarser)
    assert "coarse spacing 5.0 x 7.5, latitude ascending, longitude ascending" in out
    # which epoch's weights the file holds, and that epoch's validation scores
    dsr = xorbit.load(files / "model.xorbit")
    best = dsr.history[-1]["best_epoch"]
    rec = dsr.history[best - 1]
    assert f"best epoch {best} of 2 (the weights saved): rmse_air_temperature " in out
    assert f"{rec['rmse_air_temperature']:.4g}" in out.split("best epoch")[1]
    # the linear path (the crop is 8 x 8: every cell a predictor)
    assert "linear     ridge path over 8 x 8 windows (every cell each)" in out
    (files / "junk.xorbit").write_bytes(b"not a model")
    assert main(["info", str(files / "junk.xorbit")]) == 1
    assert "not a readable xorbit checkpoint" in one_line_error(capsys, "info")


def test_downscale_to_netcdf_and_zarr(files, capsys):
    out = files / "fine_pred.nc"
    args = ["downscale", str(files / "coarse.nc"), str(out), "--model"]
    assert main([*args, str(files / "model.xorbit"), "--chunks", "time=4", "--quiet"]) == 0
    back = xr.open_dataset(out, decode_times=xr.coders.CFDatetimeCoder(use_cftime=True))
    assert back["air_temperature"].shape == (12, 36, 48)
    assert np.isfinite(back["air_temperature"].values).all()
    assert back.attrs["Conventions"] == "CF-1.10"
    z = files / "fine_pred.zarr"
    assert (
        main(
            [
                "downscale",
                str(files / "coarse.nc"),
                str(z),
                "--model",
                str(files / "model.xorbit"),
                "--keepbits",
                "10",
                "--quiet",
            ]
        )
        == 0
    )
    assert xr.open_zarr(z, consolidated=False)["air_temperature"].attrs["xorbit_keepbits"] == 10
    auto = files / "fine_auto.nc"
    model = str(files / "model.xorbit")
    coarse = str(files / "coarse.nc")
    cmd = ["downscale", coarse, str(auto), "--model", model, "--keepbits", "auto", "--quiet"]
    assert main(cmd) == 0
    kept = xr.open_dataset(auto)["air_temperature"].attrs["xorbit_keepbits"]
    assert 0 <= kept < 23
    with pytest.raises(SystemExit):
        main([*args, str(files / "model.xorbit"), "--keepbits", "most"])
    capsys.readouterr()
    assert (
        main(
            ["downscale", str(files / "nope.nc"), str(out), "--model", str(files / "model.xorbit")]
        )
        == 1
    )
    assert "no such file or folder" in one_line_error(capsys, "downscale")


def test_evaluate(files, capsys):
    if not (files / "fine_pred.nc").exists():
        main(
            [
                "downscale",
                str(files / "coarse.nc"),
                str(files / "fine_pred.nc"),
                "--model",
                str(files / "model.xorbit"),
                "--quiet",
            ]
        )
    truth = xr.open_dataset(files / "fine.nc").isel(time=slice(12, 24))
    truth.to_netcdf(files / "truth.nc")
    capsys.readouterr()
    assert main(["evaluate", str(files / "fine_pred.nc"), str(files / "truth.nc")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["variable", "rmse", "rmse_latw"]
    assert out.splitlines()[1].startswith("air_temperature")
    assert (
        main(["evaluate", str(files / "fine_pred.nc"), str(files / "truth.nc"), "--var", "pr"]) == 1
    )
    assert "['pr'] not in the file" in one_line_error(capsys, "evaluate")


def test_demo_command_and_a_bad_output_folder(tmp_path, capsys):
    assert main(["demo", "--epochs", "1", "--quiet", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "climatology" in out and "ridge" in out and "wrote" in out
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--epochs", "1", "--quiet", "--out", str(tmp_path / "file")]) == 1
    one_line_error(capsys, "demo")


def test_help_for_every_command(capsys):
    for cmd in ("demo", "train", "downscale", "evaluate", "info"):
        with pytest.raises(SystemExit) as exit_:
            main([cmd, "--help"])
        assert exit_.value.code == 0
        assert "usage: xorbit " + cmd in capsys.readouterr().out


def grid_file(path, values, lat, lon):
    """A small CF netCDF file ``tas (time, lat, lon)`` with the given coordinates."""
    ds = xr.Dataset(
        {"tas": (("time", "lat", "lon"), values, {"units": "K"})},
        coords={
            "time": ("time", np.arange(values.shape[0]), {"units": "days since 2000-01-01"}),
            "lat": ("lat", lat, {"standard_name": "latitude", "units": "degrees_north"}),
            "lon": ("lon", lon, {"standard_name": "longitude", "units": "degrees_east"}),
        },
    )
    ds.to_netcdf(path)
    return str(path)


def printed_scores(out):
    lines = out.splitlines()
    header, row = lines[0].split(), lines[1].split()
    assert row[0] == "tas"
    return dict(zip(header[1:], map(float, row[1:]), strict=True))


@pytest.fixture
def pred_truth():
    lat = np.arange(30.0, 62.0, 2.0)  # 16 rows, 2 degree step
    lon = np.arange(0.5, 24.0, 2.0)  # 12 columns
    rng = np.random.default_rng(3)
    truth = 280 + 15 * np.cos(np.deg2rad(lat))[None, :, None] + rng.normal(size=(4, 16, 12))
    pred = truth + rng.normal(scale=0.7, size=truth.shape)
    return lat, lon, pred, truth


def test_evaluate_reorders_a_truth_whose_latitude_runs_the_other_way(pred_truth, tmp_path, capsys):
    lat, lon, pred, truth = pred_truth
    p = grid_file(tmp_path / "pred.nc", pred, lat, lon)
    # north to south, data flipped with it: the same field, stored the other way
    t = grid_file(tmp_path / "truth.nc", truth[:, ::-1], lat[::-1], lon)
    assert main(["evaluate", p, t]) == 0
    expected = np.sqrt(np.mean((pred - truth) ** 2))
    assert printed_scores(capsys.readouterr().out)["rmse"] == pytest.approx(expected, rel=1e-3)
    # a truth with its longitude off by float round-off only is taken as the same grid
    t = grid_file(tmp_path / "truth2.nc", truth[..., ::-1], lat, lon[::-1] + 1e-5)
    b = grid_file(tmp_path / "base.nc", truth[:, ::-1] + 1.5, lat[::-1], lon)
    assert main(["evaluate", p, t, "--baseline", b]) == 0
    scores = printed_scores(capsys.readouterr().out)
    assert scores["rmse"] == pytest.approx(expected, rel=1e-3)
    assert scores["rmse_baseline"] == pytest.approx(1.5, rel=1e-3)
    assert scores["skill_rmse"] == pytest.approx(1 - expected / 1.5, rel=1e-3)


def test_evaluate_selects_the_prediction_grid_from_a_larger_truth(pred_truth, tmp_path, capsys):
    lat, lon, pred, truth = pred_truth
    p = grid_file(tmp_path / "pred.nc", pred[:, 2:12, 1:10], lat[2:12], lon[1:10])
    t = grid_file(tmp_path / "truth.nc", truth, lat, lon)
    assert main(["evaluate", p, t]) == 0
    expected = np.sqrt(np.mean((pred - truth)[:, 2:12, 1:10] ** 2))
    assert printed_scores(capsys.readouterr().out)["rmse"] == pytest.approx(expected, rel=1e-3)


def test_evaluate_refuses_a_truth_on_another_grid(pred_truth, tmp_path, capsys):
    lat, lon, pred, truth = pred_truth
    p = grid_file(tmp_path / "pred.nc", pred, lat, lon)
    # same sizes, latitude shifted by half a cell: not the same points
    t = grid_file(tmp_path / "truth.nc", truth, lat + 1.0, lon)
    assert main(["evaluate", p, t]) == 1
    err = one_line_error(capsys, "evaluate")
    assert "'lat'" in err and "offset by up to 1" in err
    t = grid_file(tmp_path / "truth2.nc", truth, lat, lon + 0.25)
    assert main(["evaluate", p, t]) == 1
    err = one_line_error(capsys, "evaluate")
    assert "'lon'" in err and "offset by up to 0.25" in err


def test_evaluate_compares_with_statistical_baselines(tmp_path, capsys):
    """One table: the prediction and every baseline named, scored on the held-out years."""
    fine = hadcm3_air_temperature().isel(latitude=slice(0, 36), longitude=slice(0, 48))
    coarse = coarsen(fine, 4)
    train = fine.time.dt.year <= 2040
    paths = {}
    for name, obj in {
        "ct": coarse.sel(time=train),
        "ft": fine.sel(time=train),
        "cs": coarse.sel(time=~train),
        "truth": fine.sel(time=~train),
    }.items():
        paths[name] = str(tmp_path / f"{name}.nc")
        obj.to_dataset().to_netcdf(paths[name])
    pred = baseline(
        coarse.sel(time=~train), "climatology", train=(coarse.sel(time=train), fine.sel(time=train))
    )
    paths["pred"] = str(tmp_path / "pred.nc")
    pred.to_dataset().to_netcdf(paths["pred"])
    cmd = ["evaluate", paths["pred"], paths["truth"], "--baseline", "bicubic", "--baseline"]
    train_args = ["--train", paths["ct"], paths["ft"], "--coarse", paths["cs"]]
    assert main([*cmd, "ridge", *train_args]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:4] == ["variable", "method", "rmse", "bias"] and "trend_bias" in header
    rows = {
        line.split()[1]: dict(zip(header[2:], map(float, line.split()[2:]), strict=True))
        for line in lines[1:]
    }
    assert list(rows) == ["prediction", "bicubic", "ridge"]
    assert rows["prediction"]["rmse"] == pytest.approx(0.2707, abs=5e-4)  # climatology
    assert rows["bicubic"]["rmse"] == pytest.approx(0.940, abs=2e-3)
    assert rows["ridge"]["rmse"] == pytest.approx(0.2244, abs=5e-4)
    assert rows["ridge"]["anomaly_r2"] > rows["prediction"]["anomaly_r2"]
    # without the coarse file, the truth is cell-averaged: the same coarse fields here
    assert main([*cmd, "ridge", "--train", paths["ct"], paths["ft"], "--scores", "rmse"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["variable", "method", "rmse"]
    assert float(lines[3].split()[2]) == pytest.approx(0.2244, abs=5e-4)
    assert main([*cmd, "qdm"]) == 1
    assert "['qdm'] are learnt from data: pass --train" in one_line_error(capsys, "evaluate")


def test_evaluate_matches_longitudes_modulo_360(pred_truth, tmp_path, capsys):
    """A domain across 0 E, the prediction written -180..180 and the truth 0..360."""
    lat, _, pred, truth = pred_truth
    lon = np.arange(-11.0, 13.0, 2.0)  # -11 .. 11: crosses the 0..360 convention's seam
    p = grid_file(tmp_path / "pred.nc", pred, lat, lon)
    t = grid_file(tmp_path / "truth.nc", truth, lat, lon % 360.0)  # 349 .. 359, 1 .. 11
    assert main(["evaluate", p, t]) == 0
    expected = np.sqrt(np.mean((pred - truth) ** 2))
    assert printed_scores(capsys.readouterr().out)["rmse"] == pytest.approx(expected, rel=1e-3)


# ------------------------------------------------------------------ parity with Python
def subparser(name):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_downscale_has_every_option_of_the_python_call_with_its_default():
    """Before: `xorbit downscale ... --samples 4` was 'unrecognized arguments'."""
    actions = {a.dest: a for a in subparser("downscale")._actions}
    params = inspect.signature(xorbit.accessor.downscale).parameters
    options = [p for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert {p.name for p in options} == {
        "tile",
        "halo",
        "batch_size",
        "device",
        "static",
        "periodic",
        "units",
        "precision",
        "samples",
        "seed",
        "constrain",
    }
    for p in options:
        assert p.name in actions, f"--{p.name.replace('_', '-')} is missing"
        assert actions[p.name].default == p.default, p.name
    assert tuple(actions["precision"].choices) == xorbit.engine.PRECISIONS


def test_train_takes_the_recipe_options_a_file_to_file_run_needs():
    actions = {a.dest: a for a in subparser("train")._actions}
    for name in ("epochs", "seed", "transform", "static", "device", "output"):
        assert name in actions
        # absent from the command line: the YAML's value, else train()'s default
        assert actions[name].default is None


@pytest.fixture(scope="module")
def rain(tmp_path_factory):
    """Gamma rain on a 32 x 32 grid, a fine orography file, a model trained by the command."""
    d = tmp_path_factory.mktemp("rain")
    rng = np.random.default_rng(0)
    lat = 40.0 + 0.25 * np.arange(32)
    lon = 5.0 + 0.25 * np.arange(32)
    coords = {
        "time": ("time", np.arange(16), {"units": "days since 2000-01-01"}),
        "lat": ("lat", lat, {"standard_name": "latitude", "units": "degrees_north"}),
        "lon": ("lon", lon, {"standard_name": "longitude", "units": "degrees_east"}),
    }
    pr = rng.gamma(0.8, 4.0, size=(16, 32, 32)).astype(np.float32)
    ds = xr.Dataset({"pr": (("time", "lat", "lon"), pr, {"units": "mm/day"})}, coords=coords)
    ds.to_netcdf(d / "fine.nc")
    coarsen(ds, 4).to_netcdf(d / "coarse.nc")
    hills = 500.0 * np.outer(np.sin(np.arange(32) / 4.0), np.cos(np.arange(32) / 6.0)) + 500.0
    orog = xr.Dataset(
        {"orog": (("lat", "lon"), hills.astype(np.float32), {"units": "m"})},
        coords={k: coords[k] for k in ("lat", "lon")},
    )
    xorbit.io.to_netcdf(orog, d / "orog.nc")  # as xorbit writes it: with lat_bnds, lon_bnds
    (d / "train.yaml").write_text(
        yaml.safe_dump(
            {
                "fine": "fine.nc",
                "variables": ["pr"],
                "model": {
                    "preset": "tiny",
                    "img_size": [8, 8],
                    "embed_dim": 16,
                    "depth": 1,
                    "decoder_depth": 1,
                    "drop_rate": 0.2,
                },
                # no gate: the network (and so the static input) stays in the model
                "train": {"epochs": 3, "batch_size": 4, "gate": False},
                "output": "ignored.xorbit",
            }
        )
    )
    cmd = [
        "train",
        str(d / "train.yaml"),
        "--epochs",
        "1",
        "--seed",
        "2",
        "--quiet",
        "--transform",
        "pr=log1p",
        "--static",
        str(d / "orog.nc"),
        "--output",
        str(d / "m.xorbit"),
        "--device",
        "cpu",
    ]
    assert main(cmd) == 0
    return d


def test_train_command_line_overrides_the_config(rain, capsys):
    assert not (rain / "ignored.xorbit").exists()
    dsr = xorbit.load(rain / "m.xorbit")
    assert dsr.transforms == {"pr": "log1p"}
    assert main(["info", str(rain / "m.xorbit")]) == 0
    assert "totals     coarse-consistency constraints: pr multiplicative" in capsys.readouterr().out
    assert dsr.static_packing == {"orog": "fine"}  # lat_bnds / lon_bnds were left out
    assert len(dsr.history) == 1  # --epochs 1, not the file's 3


def test_downscale_ensemble_and_static_from_the_command_line(rain, capsys):
    dsr = xorbit.load(rain / "m.xorbit")
    coarse = xorbit.io.open_dataset(rain / "coarse.nc")
    flat = xr.Dataset({"orog": xr.full_like(xorbit.io.open_static(rain / "orog.nc").orog, 10.0)})
    flat.to_netcdf(rain / "flat.nc")
    out = rain / "members.nc"
    cmd = [
        "downscale",
        str(rain / "coarse.nc"),
        str(out),
        "--model",
        str(rain / "m.xorbit"),
        "--samples",
        "3",
        "--seed",
        "5",
        "--static",
        str(rain / "flat.nc"),
        "--quiet",
        "--batch-size",
        "2",
        "--precision",
        "fp32",
        "--no-periodic",
    ]
    assert main(cmd) == 0
    got = xr.open_dataset(out)["pr"]
    assert got.sizes["sample"] == 3
    want = coarse.orbit.downscale(dsr, samples=3, seed=5, static=flat)["pr"]
    np.testing.assert_allclose(got.values, want.transpose(*got.dims).values, atol=1e-4)
    # the static file is read: the stored orography gives other members
    stored = coarse.orbit.downscale(dsr, samples=3, seed=5)["pr"]
    assert float(np.abs(stored - want).max()) > 1e-4
    with pytest.raises(SystemExit):  # argparse: NAME=VALUE or nothing
        main([*cmd[:5], "--units", "pr"])
    assert "--units expects NAME=VALUE, got 'pr'" in capsys.readouterr().err
