"""Precipitation: the log1p transform in training, its inverse on the way out, units."""

import numpy as np
import pytest
import torch
import xarray as xr

import xorbit
from tests.datasets import powerlaw_field
from tests.test_train import small_config
from xorbit import transforms
from xorbit.training.loop import TrainOptions, fit
from xorbit.training.samples import PairedCrops, pair_arrays
from xorbit.units import UnitsError

N_TIME, N = 24, 32


def gamma_precip(seed=0, dry_columns=12):
    """Daily precipitation in mm/day: gamma-distributed amounts whose scale
    follows a smooth random field, dry (exactly 0) in the western columns and
    wherever the field is low, as real daily rain is."""
    rng = np.random.default_rng(seed)
    weather = powerlaw_field((N_TIME, N, N), seed=seed)  # smooth, unit variance
    scale = 4.0 * np.exp(weather)
    amount = rng.gamma(0.8, scale).astype(np.float32)
    amount[weather < -0.3] = 0.0
    amount[..., :dry_columns] = 0.0
    return xr.DataArray(
        amount,
        dims=("time", "lat", "lon"),
        coords={
            "time": np.arange(N_TIME),
            "lat": ("lat", 30.0 + 0.5 * np.arange(N), {"units": "degrees_north"}),
            "lon": ("lon", 250.0 + 0.5 * np.arange(N), {"units": "degrees_east"}),
        },
        name="pr",
        attrs={"units": "mm/day", "standard_name": "lwe_precipitation_rate"},
    )


def precip_config(**kw):
    return small_config(**{"in_vars": ["pr"], "out_vars": ["pr"], **kw})


@pytest.fixture(scope="module")
def pr_fine():
    return gamma_precip()


@pytest.fixture(scope="module")
def pr_model(pr_fine):
    coarse = xorbit.coarsen(pr_fine, 4)
    return xorbit.train(
        coarse,
        pr_fine,
        precip_config(),
        epochs=3,
        batch_size=8,
        progress=False,
        device="cpu",
        climatology=False,
        transforms={"pr": "log1p"},
    )


def test_round_trip_through_the_transform_is_exact_above_the_threshold():
    x = xr.DataArray(np.array([0.0, 0.1, 0.25, 0.2501, 1.0, 12.5, 250.0, np.nan], np.float32))
    z = transforms.forward(x, "log1p")
    np.testing.assert_array_equal(z.values[:3], 0.0)  # dry and drizzle: zero
    np.testing.assert_allclose(z.values[3:7], np.log1p(x.values[3:7]), rtol=1e-7)
    back = transforms.inverse(z, "log1p")
    np.testing.assert_allclose(back.values[3:7], x.values[3:7], rtol=1e-6)
    np.testing.assert_array_equal(back.values[:3], 0.0)
    assert np.isnan(z.values[7]) and np.isnan(back.values[7])
    # the model's output below the drizzle line (or negative) is dry, never negative
    out = transforms.inverse(xr.DataArray(np.array([-2.0, 0.1, 0.3], np.float32)), "log1p")
    np.testing.assert_allclose(out.values, [0.0, 0.0, np.expm1(0.3)], rtol=1e-6)
    # lazy on Dask
    assert transforms.forward(x.chunk(4), "log1p").chunks is not None


def test_training_stores_the_transform_and_works_in_log_space(pr_model, pr_fine):
    assert pr_model.transforms == {"pr": "log1p"}
    assert pr_model.units["pr"] == "mm/day"
    assert "pr" in pr_model.nonnegative
    # normalization statistics are those of log1p(thresholded mm/day)
    logged = transforms.forward(xorbit.coarsen(pr_fine, 4), "log1p")
    assert pr_model.mean["pr"] == pytest.approx(float(logged.mean()), rel=1e-4)
    assert pr_model.std["pr"] == pytest.approx(float(logged.std()), rel=1e-3)


def test_downscaled_precipitation_keeps_its_magnitude_and_dry_areas(pr_model, pr_fine):
    coarse = xorbit.coarsen(pr_fine, 4)
    out = coarse.orbit.downscale(pr_model, device="cpu")
    truth = pr_fine.assign_coords(lat=out.lat, lon=out.lon)
    assert out.attrs["units"] == "mm/day"
    assert float(out.min()) >= 0.0
    # magnitude, not log space: the domain mean within 15 % of the truth's, the
    # wettest pixel as wet as the wettest coarse cell, far above any log1p value
    assert float(out.mean()) == pytest.approx(float(truth.mean()), rel=0.15)
    assert float(out.max()) > 0.9 * float(coarse.max())
    assert float(out.max()) > 3 * float(np.log1p(truth.max()))
    # zero where the input is dry (the western columns, a coarse cell in from the edge)
    dry = out.isel(lon=slice(0, 8))
    assert float(np.abs(dry).max()) == 0.0
    # the coarse means of the output follow the input's (the white-noise detail of
    # this field is unpredictable; its coarse cells are not)
    back = xorbit.coarsen(out, 4)
    assert float(xr.corr(back, coarse)) > 0.95


def test_flux_units_in_give_flux_units_out(pr_model, pr_fine):
    coarse = xorbit.coarsen(pr_fine, 4)
    ref = coarse.orbit.downscale(pr_model, device="cpu")
    flux = (coarse / 86400.0).assign_attrs(coarse.attrs, units="kg m-2 s-1").chunk(time=5)
    out = flux.orbit.downscale(pr_model, device="cpu")
    assert out.chunks is not None  # lazy
    assert out.attrs["units"] == "kg m-2 s-1"
    np.testing.assert_allclose(out.values * 86400.0, ref.values, rtol=1e-4, atol=1e-4)
    assert float(out.min()) >= 0.0


def test_training_in_flux_units_converts_to_mm_per_day(pr_fine):
    flux = (pr_fine / 86400.0).assign_attrs(pr_fine.attrs, units="kg m-2 s-1")
    dsr = xorbit.train(
        xorbit.coarsen(flux, 4),
        flux,
        precip_config(),
        epochs=1,
        batch_size=8,
        progress=False,
        device="cpu",
        climatology=False,
        transforms={"pr": "log1p"},
    )
    assert dsr.units["pr"] == "mm/day"
    logged = transforms.forward(xorbit.coarsen(pr_fine, 4), "log1p")
    assert dsr.mean["pr"] == pytest.approx(float(logged.mean()), rel=1e-4)


def test_transform_errors_name_the_variable(pr_fine):
    coarse = xorbit.coarsen(pr_fine, 4)
    kw = dict(epochs=1, batch_size=8, progress=False, device="cpu", climatology=False)
    with pytest.raises(ValueError, match="transform 'sqrt' for variable 'pr' is unknown"):
        xorbit.train(coarse, pr_fine, precip_config(), transforms={"pr": "sqrt"}, **kw)
    with pytest.raises(ValueError, match="variable 'tas', which is not among"):
        xorbit.train(coarse, pr_fine, precip_config(), transforms={"tas": "log1p"}, **kw)
    bare = pr_fine.copy()
    bare.attrs = {}
    with pytest.raises(UnitsError, match="'pr' has no units attribute, but its 'log1p'"):
        xorbit.train(
            xorbit.coarsen(bare, 4), bare, precip_config(), transforms={"pr": "log1p"}, **kw
        )


def test_the_transform_survives_save_and_load(pr_model, pr_fine, tmp_path):
    path = pr_model.save(tmp_path / "pr.xorbit")
    back = xorbit.load(path)
    assert back.transforms == {"pr": "log1p"}
    coarse = xorbit.coarsen(pr_fine, 4).isel(time=slice(0, 3))
    np.testing.assert_array_equal(
        coarse.orbit.downscale(back, device="cpu").values,
        coarse.orbit.downscale(pr_model, device="cpu").values,
    )


def test_per_variable_loss_weights_steer_training():
    """The reference weighs temperature 10 and precipitation 1: the weights
    reach the loss (a weight of 0 leaves a variable untrained)."""
    rng = np.random.default_rng(0)
    data = pair_arrays(
        xorbit.coarsen(two_variables(rng), 4),
        two_variables(rng),
        ["tas", "pr"],
        ["tas", "pr"],
        4,
        {"tas": 0.0, "pr": 0.0},
        {"tas": 1.0, "pr": 1.0},
    )
    crops = PairedCrops(data, (8, 8), 4, crops_per_time=2, seed=0)
    cfg = precip_config(in_vars=["tas", "pr"], out_vars=["tas", "pr"], interp_skip="none")
    moved = {}
    for weights in ({"tas": 10.0, "pr": 0.0}, {"tas": 0.0, "pr": 1.0}):
        dsr = xorbit.Downscaler.from_config(cfg, seed=0)
        before = dsr.model.conv_out.weight.detach().clone()
        opts = TrainOptions(epochs=1, batch_size=4, progress=False, var_weights=weights)
        fit(dsr, crops, None, opts)
        # conv_out's output channel of a variable with weight 0 gets no gradient
        # from the loss (AdamW's decay alone moves it by a factor, not a step)
        change = (dsr.model.conv_out.weight.detach() - before).abs().sum(dim=(1, 2, 3))
        moved[tuple(weights.values())] = change / before.abs().sum(dim=(1, 2, 3))
    assert moved[(10.0, 0.0)][0] > 100 * moved[(10.0, 0.0)][1]
    assert moved[(0.0, 1.0)][1] > 100 * moved[(0.0, 1.0)][0]
    assert torch.isfinite(moved[(0.0, 1.0)]).all()


def two_variables(rng):
    field = gamma_precip(seed=int(rng.integers(100)))
    tas = (280 + 5 * powerlaw_field((N_TIME, N, N), seed=1)).astype(np.float32)
    return xr.Dataset({"pr": field, "tas": (field.dims, tas, {"units": "K"})})
