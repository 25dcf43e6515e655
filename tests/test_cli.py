"""The `xorbit` command: every subcommand on bundled data, and one bad input each."""

import numpy as np
import pytest
import xarray as xr
import yaml

from xorbit import coarsen
from xorbit.cli import main
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


def test_info(files, capsys):
    assert main(["info", str(files / "model.xorbit")]) == 0
    out = capsys.readouterr().out
    assert "Reslim x4" in out and "air_temperature [K]" in out and "sha256" in out
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
    assert "bicubic + climatology" in out and "wrote" in out
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--epochs", "1", "--quiet", "--out", str(tmp_path / "file")]) == 1
    one_line_error(capsys, "demo")


def test_help_for_every_command(capsys):
    for cmd in ("demo", "train", "downscale", "evaluate", "info"):
        with pytest.raises(SystemExit) as exit_:
            main([cmd, "--help"])
        assert exit_.value.code == 0
        assert "usage: xorbit " + cmd in capsys.readouterr().out
