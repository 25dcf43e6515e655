"""Stored per-pixel fields: climatologies (anomaly training) and static inputs."""

import warnings

import numpy as np
import pytest
import torch
import xarray as xr

import xorbit
from tests.datasets import powerlaw_field
from tests.test_train import small_config
from xorbit import fields
from xorbit.baselines import baseline
from xorbit.downscaler import training_grid
from xorbit.training.samples import PairedArrays, PairedCrops


def fine_field(nt=12, ny=32, nx=32, seed=0):
    data = 280 + 10 * powerlaw_field((nt, ny, nx), seed=seed)
    data += np.linspace(0, 2, nt)[:, None, None]  # a warming trend
    return xr.DataArray(
        data.astype(np.float32),
        dims=("time", "lat", "lon"),
        coords={
            "time": np.arange(nt),
            "lat": ("lat", 10.0 + 0.5 * np.arange(ny), {"units": "degrees_north"}),
            "lon": ("lon", 200.0 + 0.5 * np.arange(nx), {"units": "degrees_east"}),
        },
        name="tas",
        attrs={"units": "K", "standard_name": "air_temperature"},
    )


def with_static(coarse, fine, orog, epochs=1):
    """A small model trained briefly with ``orog`` as a (fine) static field; no
    gate, so that the network (which reads the field) stays in the model."""
    return xorbit.train(
        coarse,
        fine,
        small_config(),
        epochs=epochs,
        batch_size=2,
        progress=False,
        static=xr.Dataset({"orog": orog}),
        gate=False,
    )


# --------------------------------------------------------------------------- fields
def test_encode_decode_is_lossless():
    f = fine_field().isel(time=0, drop=True)
    back = fields.decode(fields.encode(fields.plain(f, "lat", "lon")))
    np.testing.assert_array_equal(back.values, f.values)
    np.testing.assert_array_equal(back.lat.values, f.lat.values)


def test_pack_puts_block_pixel_ij_in_channel_ij():
    f = fine_field(nt=1, ny=8, nx=12).isel(time=0, drop=True)
    c = xorbit.coarsen(f, 4)
    packed = fields.pack(f, 4, "orog", c)
    assert list(packed) == fields.packed_names("orog", 4)
    assert packed["orog[2,3]"].shape == (2, 3)
    np.testing.assert_array_equal(packed["orog[2,3]"].values, f.values[2::4, 3::4])
    np.testing.assert_array_equal(packed["orog[0,1]"].lat.values, c.lat.values)


def test_on_grid_matches_by_value_and_refuses_data_outside_the_domain():
    f = fine_field().isel(time=0, drop=True)
    part = f.isel(lat=slice(4, 20)).isel(lat=slice(None, None, -1))
    got = fields.on_grid(f, part, "climatology")
    np.testing.assert_array_equal(got.values, part.values)
    outside = part.assign_coords(lat=part.lat + 40.0)
    with pytest.raises(ValueError, match=r"training domain.*lat"):
        fields.on_grid(f, outside, "'tas' climatology")


# --------------------------------------------------------------------------- anomalies
def test_an_untrained_default_model_is_the_climatology_baseline():
    """Zero-initialised correction + stored climatologies = bicubic + climatology."""
    fine = fine_field(nt=12)
    coarse = xorbit.coarsen(fine, 4)
    train, test = slice(0, 8), slice(8, 12)
    cfg = small_config(img_size=(8, 8))
    assert cfg.interp_skip == "bicubic"
    dsr = xorbit.Downscaler.from_config(
        cfg,
        input_climatology={"tas": fields.climatology(coarse, "time", range(8))},
        output_climatology={"tas": fields.climatology(fine, "time", range(8))},
        grid=training_grid(coarse.lat, coarse.lon),
    )
    pred = coarse.isel(time=test).orbit.downscale(dsr, tile=8, halo=0)
    ref = baseline(
        coarse.isel(time=test),
        "climatology",
        train=(coarse.isel(time=train), fine.isel(time=train)),
    )
    np.testing.assert_allclose(pred.values, ref.transpose(*pred.dims).values, atol=2e-3)
    # and not bicubic: the climatology of (fine - bicubic) is in it
    bicubic = coarse.isel(time=test).orbit.interpolate(4)
    assert float(np.abs(pred - bicubic).max()) > 0.1


def test_training_stores_climatologies_and_centres_the_anomalies():
    fine = fine_field(nt=10)
    coarse = xorbit.coarsen(fine, 4)
    dsr = xorbit.train(coarse, fine, small_config(), epochs=1, batch_size=2, progress=False)
    np.testing.assert_allclose(
        dsr.input_climatology["tas"].values, coarse.mean("time").values, atol=1e-4
    )
    np.testing.assert_allclose(
        dsr.output_climatology["tas"].values, fine.mean("time").values, atol=1e-4
    )
    assert dsr.mean["tas"] == 0.0
    anomaly_std = float((coarse - coarse.mean("time")).std())  # all years train by default
    assert dsr.std["tas"] == pytest.approx(anomaly_std, rel=1e-3)
    raw = xorbit.train(
        coarse, fine, small_config(), epochs=1, batch_size=2, progress=False, climatology=False
    )
    assert not raw.input_climatology and raw.mean["tas"] == pytest.approx(float(coarse.mean()))


def test_a_saved_model_keeps_its_fields_and_refuses_another_domain(tmp_path):
    fine = fine_field(nt=10)
    coarse = xorbit.coarsen(fine, 4)
    orog = fine.isel(time=0, drop=True).rename("orog") * 0.1
    dsr = with_static(coarse, fine, orog, epochs=1)
    assert dsr.static_packing == {"orog": "fine"}
    assert dsr.config.in_vars == ["tas", *fields.packed_names("orog", 4)]
    assert set(dsr.config.static_vars) == set(fields.packed_names("orog", 4))
    path = dsr.save(tmp_path / "m.xorbit")
    back = xorbit.load(path)
    assert back.static_packing == {"orog": "fine"}
    np.testing.assert_array_equal(back.static["orog"].values, orog.values)
    region = coarse.isel(time=slice(0, 2), lat=slice(2, 6), lon=slice(1, 7))
    a = region.orbit.downscale(dsr, tile=8, halo=0)
    b = region.orbit.downscale(back, tile=8, halo=0)  # needs nothing but the data
    np.testing.assert_array_equal(a.values, b.values)
    # the fine field enters the model: another static= changes the answer
    other = region.orbit.downscale(back, tile=8, halo=0, static=xr.Dataset({"orog": orog * 0}))
    assert float(np.abs(other - a).max()) > 0
    moved = region.assign_coords(lat=region.lat + 30.0)
    with pytest.raises(ValueError, match="training domain"):
        moved.orbit.downscale(back)


def test_fine_static_fields_follow_a_flipped_input():
    fine = fine_field(nt=10)
    coarse = xorbit.coarsen(fine, 4)
    orog = fine.isel(time=0, drop=True).rename("orog")
    dsr = with_static(coarse, fine, orog, epochs=2)
    x = coarse.isel(time=slice(0, 3))
    a = x.orbit.downscale(dsr, tile=8, halo=0)
    b = x.isel(lat=slice(None, None, -1)).orbit.downscale(dsr, tile=8, halo=0)
    np.testing.assert_allclose(b.sortby("lat").values, a.values, atol=1e-5)
    # static= whose latitude runs the other way from the data's is matched by value
    south_first = xr.Dataset({"orog": orog.isel(lat=slice(None, None, -1))})
    c = x.orbit.downscale(dsr, tile=8, halo=0, static=south_first)
    np.testing.assert_allclose(c.values, a.values, rtol=0, atol=1e-5)
    d = x.isel(lat=slice(None, None, -1)).orbit.downscale(dsr, tile=8, halo=0, static=south_first)
    np.testing.assert_allclose(d.values, b.values, rtol=0, atol=1e-5)
    # and it is read: the same numbers on the rows' positions would change the answer
    by_position = xr.Dataset({"orog": south_first.orog.assign_coords(lat=orog.lat)})
    e = x.orbit.downscale(dsr, tile=8, halo=0, static=by_position)
    assert float(np.abs(e - a).max()) > 1e-3


def test_static_fields_on_neither_grid_are_refused():
    fine = fine_field(nt=6)
    coarse = xorbit.coarsen(fine, 4)
    bad = fine.isel(time=0, drop=True).isel(lat=slice(0, 16)).rename("orog")
    with pytest.raises(ValueError, match="static field 'orog'"):
        with_static(coarse, fine, bad)
    timed = fine.rename("orog")
    with pytest.raises(ValueError, match="time-invariant"):
        with_static(coarse, fine, timed)


# --------------------------------------------------------------------------- augmentation
def test_amplitude_augmentation_scales_anomalies_and_targets_alike():
    rng = np.random.default_rng(0)
    data = PairedArrays(
        coarse=rng.normal(size=(5, 2, 4, 4)).astype(np.float32),
        fine=rng.normal(size=(5, 1, 16, 16)).astype(np.float32),
        fine_lat=np.linspace(0, 10, 16),
        times=np.arange(5),
    )
    plain = PairedCrops(data, (4, 4), 4, seed=3)
    aug = PairedCrops(data, (4, 4), 4, seed=3, scale=(0.0, 3.0), scaled=[0])
    factors = []
    for i in range(5):
        (x0, y0, _), (x1, y1, _) = plain[i], aug[i]
        s = float(x1[0].flatten()[0] / x0[0].flatten()[0])
        torch.testing.assert_close(x1[0], x0[0] * s, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y1, y0 * s, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x1[1], x0[1])  # a static channel stays
        factors.append(s)
    assert min(factors) < 0 < max(factors) and max(map(abs, factors)) <= 3
    torch.testing.assert_close(aug[2][0], aug[2][0])  # deterministic per (seed, epoch, i)


def test_scale_augmentation_needs_anomalies():
    fine = fine_field(nt=6)
    coarse = xorbit.coarsen(fine, 4)
    with pytest.raises(ValueError, match="climatology=True"):
        xorbit.train(
            coarse,
            fine,
            small_config(),
            epochs=1,
            batch_size=2,
            progress=False,
            climatology=False,
            augment="scale",
        )


def test_the_correction_layers_start_at_zero_only_with_a_skip():
    on = xorbit.Downscaler.from_config(small_config()).model
    assert float(on.conv_out.weight.detach().abs().sum()) == 0.0
    assert float(on.path2[-1].weight.detach().abs().sum()) == 0.0
    off = xorbit.Downscaler.from_config(small_config(interp_skip="none")).model
    assert float(off.conv_out.weight.detach().abs().sum()) > 0.0


def test_non_negative_outputs_are_clamped_after_the_climatology_is_added():
    """A negative anomaly of precipitation is fine; a negative total is not."""
    fine = fine_field(nt=3) * 0 + 1.0
    coarse = xorbit.coarsen(fine, 4)
    clim_in = fields.climatology(coarse, "time", range(3)) + 5.0  # anomaly -5 everywhere
    clim_out = fields.climatology(fine, "time", range(3)) * 0 + 2.0  # total 2 - 5 = -3
    dsr = xorbit.Downscaler.from_config(
        small_config(),
        input_climatology={"tas": clim_in},
        output_climatology={"tas": clim_out},
        nonnegative=["tas"],
        grid=training_grid(coarse.lat, coarse.lon),
    )
    out = coarse.orbit.downscale(dsr)
    assert float(out.max()) == 0.0  # clamped anomalies would have given 2 everywhere
    clim_out_wet = clim_out + 10.0  # total 12 - 5 = 7: nothing to clamp
    dsr.output_climatology = {"tas": clim_out_wet}
    np.testing.assert_allclose(coarse.orbit.downscale(dsr).values, 7.0, atol=1e-4)


def test_xorbit_info_names_the_domain_and_the_stored_static_fields(tmp_path, capsys):
    from xorbit.cli import main

    fine = fine_field(nt=6)
    coarse = xorbit.coarsen(fine, 4)
    orog = fine.isel(time=0, drop=True).rename("orog")
    dsr = with_static(coarse, fine, orog, epochs=1)
    path = dsr.save(tmp_path / "m.xorbit")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "climatologies of ['tas']: downscales inside lat 10..25.5, lon 200..215.5 only" in out
    assert "static     stored: orog (fine grid)" in out


def test_static_fields_larger_than_the_domain_are_cut_to_it():
    """Fine orography for a wider region than the training data: cut, not mistaken."""
    big = fine_field(nt=6, ny=40, nx=40)
    fine = big.isel(lat=slice(4, 36), lon=slice(4, 36))
    coarse = xorbit.coarsen(fine, 4)
    orog = big.isel(time=0, drop=True).rename("orog")  # 40 x 40 on the fine spacing
    dsr = with_static(coarse, fine, orog)
    assert dsr.static_packing == {"orog": "fine"}
    np.testing.assert_array_equal(dsr.static["orog"].values, orog.values[4:36, 4:36])
    lsm = xorbit.coarsen(big.isel(time=0, drop=True), 4)  # 10 x 10 on the coarse spacing
    dsr = with_static(coarse, fine, lsm)
    assert dsr.static_packing == {"orog": "coarse"}
    np.testing.assert_array_equal(dsr.static["orog"].values, lsm.values[1:9, 1:9])


def test_a_grid_smaller_than_the_training_window_warns():
    from xorbit.accessor import GridWarning

    fine = fine_field(nt=6, ny=24, nx=24)
    coarse = xorbit.coarsen(fine, 4)  # 6 x 6: smaller than img_size, one crop
    dsr = xorbit.train(coarse, fine, small_config(), epochs=1, batch_size=2, progress=False)
    assert dsr.grid["window"] == [6, 6]
    with warnings.catch_warnings():
        warnings.simplefilter("error", GridWarning)
        coarse.orbit.downscale(dsr)  # the whole domain: no warning
    with pytest.warns(GridWarning, match="trained on windows of 6 x 6"):
        coarse.isel(lat=slice(0, 4)).orbit.downscale(dsr)
