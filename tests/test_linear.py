"""The linear path: a frozen ridge map inside Reslim, fitted in closed form, and its gate."""

import numpy as np
import pytest
import torch

import xorbit
from tests.test_train import fine_field, small_config
from xorbit import coarsen
from xorbit.datasets import hadcm3_air_temperature
from xorbit.grid import match_grid
from xorbit.model.linear import LinearPath
from xorbit.ridge import fit_ridge


@pytest.mark.parametrize("half", [None, 1], ids=["whole window", "3 x 3 cells"])
def test_the_torch_path_is_the_numpy_fit(half):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2, 5, 6))
    y = rng.normal(size=(40, 1, 10, 12)) + x[:, :1].repeat(2, -2).repeat(2, -1)
    fit = fit_ridge(x, y, 2, window=6 if half is None else half)
    path = LinearPath((5, 6), n_in=2, n_out=1, factor=2, half=half)
    path.load_fit(fit)
    got = path(torch.from_numpy(x[:3]).float()).numpy()
    np.testing.assert_allclose(got, fit.predict(x[:3]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"maps 5 x 6 windows .* given 5 x 8"):
        path(torch.zeros(1, 2, 5, 8))
    with pytest.raises(ValueError, match="does not suit this path"):
        LinearPath((5, 6), n_in=1, n_out=1, factor=2, half=half).load_fit(fit)


@pytest.fixture(scope="module")
def hadcm3():
    fine = hadcm3_air_temperature().isel(time=slice(0, 80)).load()
    coarse = coarsen(fine, 4)
    early = {"time": slice(0, 60)}
    late = {"time": slice(60, None)}
    return coarse.isel(early), fine.isel(early), coarse.isel(late), fine.isel(late)


def test_the_default_model_contains_the_ridge_baseline(hadcm3):
    """Without its correction (gate 0) the model is the ridge baseline: it can
    fall behind ridge only by what the correction adds, which the gate checks."""
    ct, ft, cs, fs = hadcm3
    cfg = xorbit.ReslimConfig.preset(
        "tiny", in_vars=["air_temperature"], out_vars=["air_temperature"]
    )
    dsr = xorbit.train(ct, ft, cfg, epochs=1, progress=False, device="cpu", gate=False)
    assert dsr.config.linear_window == (9, 12) and dsr.config.linear_half is None
    dsr.model.gate.fill_(0.0)
    linear = cs.orbit.downscale(dsr, constrain=False)  # the map alone
    ridge = xorbit.baseline(cs, "ridge", train=(ct, ft))
    truth = match_grid(fs, linear)
    diff = float(np.sqrt(((linear - ridge) ** 2).mean()))
    err = float(np.sqrt(((ridge - truth) ** 2).mean()))
    assert diff < 0.02 * err  # the same map, up to the two bicubic kernels at the edges
    # it is stored with the model
    assert "linear.coef" in dsr.model.state_dict()


def test_a_saved_model_keeps_its_linear_path(hadcm3, tmp_path):
    ct, ft, cs, _ = hadcm3
    cfg = xorbit.ReslimConfig.preset(
        "tiny", in_vars=["air_temperature"], out_vars=["air_temperature"]
    )
    dsr = xorbit.train(ct, ft, cfg, epochs=1, progress=False, device="cpu", gate=False)
    back = xorbit.load(dsr.save(tmp_path / "m.xorbit"))
    assert back.config.linear_window == (9, 12)
    np.testing.assert_array_equal(cs.orbit.downscale(back).values, cs.orbit.downscale(dsr).values)
    off = xorbit.train(ct, ft, cfg, epochs=1, progress=False, device="cpu", linear_path=False)
    assert off.config.linear_window is None and "linear.coef" not in off.model.state_dict()


def nonlinear_pair(nt=40, seed=0):
    """A fine field whose detail is in part linear in the coarse anomaly (the
    linear path finds it, interpolation does not) and in part its square (no
    linear map finds it, a network can)."""
    fine = fine_field(nt=nt, seed=seed)
    coarse = coarsen(fine, 4)
    anomaly = (coarse - coarse.mean("time")) / float(coarse.std())
    pattern = np.tile([[1.0, -1.0], [-1.0, 1.0]], (16, 16))
    up = anomaly.values.repeat(4, -2).repeat(4, -1)
    return coarse, fine + (up**2 * 3.0 + up * 6.0) * pattern


def test_the_gate_keeps_a_correction_that_helps():
    coarse, fine = nonlinear_pair()
    kw = dict(epochs=8, batch_size=4, progress=False, device="cpu", seed=0)
    helped = xorbit.train(coarse, fine, small_config(), **kw)
    ratio = next(h["gate_rmse_ratio"] for h in helped.history if "gate_rmse_ratio" in h)
    assert ratio < 1.0 and float(helped.model.gate) == 1.0
    assert helped.history[-1]["gate"] == 1.0 and len(helped.history) == 8


def test_the_gate_drops_a_correction_that_harms_held_out_years(monkeypatch):
    """The rule itself: a correction that makes the held-out block worse is
    switched off, and training stops at the decision."""
    import xorbit.training as training

    calls = []

    def harmful_fit(dsr, crops, val, opts, resume=None, stop_after=None):
        calls.append((len(crops.data), stop_after))
        torch.nn.init.constant_(dsr.model.conv_out.bias, 0.5)  # adds 0.5 std everywhere
        dsr.model.eval()
        return [{"epoch": e + 1, "loss": 1.0} for e in range(stop_after or opts.epochs)]

    monkeypatch.setattr(training.loop, "fit", harmful_fit)
    coarse, fine = nonlinear_pair()
    dsr = xorbit.train(coarse, fine, small_config(), epochs=8, progress=False, device="cpu")
    ratio = dsr.history[-1]["gate_rmse_ratio"]
    assert ratio > 1.0 and float(dsr.model.gate) == 0.0 and dsr.history[-1]["gate"] == 0.0
    assert calls == [(32, 6)]  # the earlier 32 of 40 years, stopped after 6 of 8 epochs
    # the model is then its linear path, fitted again on every year
    assert len(dsr.history) == 6


def test_config_round_trip_keeps_the_linear_window():
    cfg = small_config(linear_window=(8, 8), linear_half=2)
    back = xorbit.ReslimConfig.from_dict(cfg.to_dict())
    assert back.linear_window == (8, 8) and back.linear_half == 2
    with pytest.raises(ValueError, match="linear_window must be"):
        small_config(linear_window=(0, 8))


def test_crops_smaller_than_the_domain_downscale_with_default_tiles():
    """The linear path maps windows of the training crop: the default tiles
    (and the gate's validation, which uses them) are windows of that size,
    not of the config's img_size (a crash before)."""
    coarse, fine = nonlinear_pair(nt=30)
    kw = dict(crop=(4, 4), epochs=2, batch_size=4, progress=False, device="cpu", seed=0)
    dsr = xorbit.train(coarse, fine, small_config(), **kw)
    assert dsr.config.linear_window == (4, 4) and "gate_rmse_ratio" in dsr.history[1]
    out = coarse.orbit.downscale(dsr)
    assert out.shape == fine.shape and bool(np.isfinite(out).all())
    # windows of 4 x 4: a halo of 1 around cores of 2
    np.testing.assert_array_equal(out.values, coarse.orbit.downscale(dsr, tile=2, halo=1).values)


def test_the_gate_clears_a_linear_path_that_harms_held_out_years(monkeypatch):
    """A path worse than the interpolation skip alone on the held-out block
    (as a map shared by window positions can be, where the truth depends on
    position) is cleared, and the correction trained on top of it goes too."""
    import xorbit.training.linear as linear

    real = linear.fit_linear_path

    def harmful_path(model, data, **kw):
        real(model, data, **kw)
        model.linear.r_mean.add_(3.0)  # 3 std everywhere

    monkeypatch.setattr(linear, "fit_linear_path", harmful_path)
    coarse, fine = nonlinear_pair()
    dsr = xorbit.train(coarse, fine, small_config(), epochs=4, batch_size=4, progress=False)
    record = next(h for h in dsr.history if "linear_rmse_ratio" in h)
    assert record["linear_rmse_ratio"] > 1.5 and float(dsr.model.gate) == 0.0
    assert float(dsr.model.linear.coef.abs().max()) == 0.0
    assert float(dsr.model.linear.r_mean.abs().max()) == 0.0
    # the model is now the skip alone: neither the path nor the network moves it
    got = coarse.orbit.downscale(dsr).values
    torch.nn.init.constant_(dsr.model.conv_out.bias, 0.5)
    np.testing.assert_array_equal(coarse.orbit.downscale(dsr).values, got)


def test_a_short_record_does_not_keep_a_path_that_extrapolates_badly():
    """10 years of the HadCM3 east half, scored on the next 60: a ridge map from
    so few years is far worse than none (0.66 K against 0.20 in the benchmark).
    Before the gate decided from 6 earlier years (it needed 20), the path was
    fitted and kept here."""
    fine = hadcm3_air_temperature().isel(latitude=slice(0, 36), longitude=slice(24, 48))
    year = fine.time.dt.year
    train = fine.sel(time=(year >= 2030) & (year < 2040))
    test = fine.sel(time=year >= 2040)
    ct, cs = coarsen(train, 4), coarsen(test, 4)
    cfg = xorbit.ReslimConfig.preset(
        "tiny", in_vars=["air_temperature"], out_vars=["air_temperature"]
    )
    dsr = xorbit.train(ct, train, cfg, epochs=1, progress=False, device="cpu")
    record = next(h for h in dsr.history if "linear_rmse_ratio" in h)
    assert record["linear_rmse_ratio"] > 1.5  # the path alone, against the skip alone
    assert float(dsr.model.linear.coef.abs().sum()) == 0.0  # cleared
    rmse = lambda p: float(np.sqrt(((p - match_grid(test, p)) ** 2).mean()))  # noqa: E731
    ridge = rmse(xorbit.baseline(cs, "ridge", train=(ct, train)))
    assert rmse(cs.orbit.downscale(dsr)) < 0.5 * ridge
    # with fewer than GATE_MIN_STEPS earlier years: no decision, and no path
    few = train.isel(time=slice(0, 6))
    short = xorbit.train(coarsen(few, 4), few, cfg, epochs=1, progress=False, device="cpu")
    assert float(short.model.linear.coef.abs().sum()) == 0.0
    assert not any("gate_rmse_ratio" in h for h in short.history)
    # the same rule where the gate does not run (a validation set): it kept
    # the path fitted on 5 years before
    kw = dict(epochs=1, progress=False, device="cpu", val_fraction=0.2)
    held = xorbit.train(coarsen(few, 4), few, cfg, **kw)
    assert float(held.model.linear.coef.abs().sum()) == 0.0
    # gate=False asks for the path whatever the record
    forced = xorbit.train(coarsen(few, 4), few, cfg, gate=False, **kw)
    assert float(forced.model.linear.coef.abs().sum()) > 0.0


def test_cross_fitting_shows_the_network_out_of_fold_residuals():
    from xorbit.training import linear
    from xorbit.training.samples import pair_arrays

    coarse, fine = nonlinear_pair(nt=20)
    mean, std = {"tas": float(fine.mean())}, {"tas": float(fine.std())}
    data = pair_arrays(coarse, fine, ["tas"], ["tas"], 4, mean, std)
    cfg = small_config(linear_window=(8, 8), linear_half=None)
    model = xorbit.Downscaler.from_config(cfg, seed=0, mean=mean, std=std).model
    linear.fit_linear_path(model, data)
    coef = model.linear.coef.clone()
    assert linear.cross_fitted(model, data, 0) is data  # off by default
    moved = linear.cross_fitted(model, data, 4)
    assert torch.equal(model.linear.coef, coef)  # the model's own path stays
    # fold 1 (time steps 5-9): the target plus the path minus the path fitted without them
    other = xorbit.Downscaler.from_config(cfg, seed=0, mean=mean, std=std).model
    linear.fit_linear_path(other, data.select(np.r_[0:5, 10:20]))
    x = torch.from_numpy(data.coarse[5:10].astype(np.float32))
    with torch.no_grad():
        want = model.linear_map(x, ["tas"]) - other.linear_map(x, ["tas"])
    np.testing.assert_allclose(moved.fine[5:10] - data.fine[5:10], want.numpy(), atol=1e-5)
    # in sample the path fits better than out of fold: the shift is not zero
    assert float(np.abs(moved.fine - data.fine).mean()) > 1e-3


def window_choice_case(case, t=60, n=21, k=4, seed=0):
    """Coarse inputs on more than `WHOLE_DOMAIN_MAX` cells and fine targets that
    read either the mirrored cell across the grid (only the whole grid sees it)
    or, noisily, the cell itself (the neighbours fit it with fewer predictors)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, n, n))
    source, noise = (x[:, ::-1, ::-1], 0.1) if case == "far" else (x, 1.0)
    y = source.repeat(k, -2).repeat(k, -1) + noise * rng.standard_normal((t, n * k, n * k))
    return x, y


def test_ridge_cv_takes_the_window_the_map_needs():
    k, test = 4, np.random.default_rng(1).standard_normal((30, 21, 21))
    for case, chosen in (("far", None), ("near", 5)):
        x, y = window_choice_case(case)
        want = (test[:, ::-1, ::-1] if case == "far" else test).repeat(k, -2).repeat(k, -1)
        fits = {half: fit_ridge(x, y, k, window=15 if half is None else half) for half in (None, 5)}
        auto = fit_ridge(x, y, k, window="cv")
        assert auto.half == chosen, case
        np.testing.assert_array_equal(auto.coef, fits[chosen].coef)
        rmse = {h: float(np.sqrt(((f.predict(test) - want) ** 2).mean())) for h, f in fits.items()}
        other = 5 if chosen is None else None
        assert rmse[chosen] < 0.97 * rmse[other], (case, rmse)  # the better one on new samples
    # the default keeps each cell's neighbours on a grid this large; a wrong word is named
    assert fit_ridge(x, y, k).half == 5
    with pytest.raises(ValueError, match="'whole'"):
        fit_ridge(x, y, k, window="whole")


@pytest.mark.parametrize("case", ["far", "near"])
def test_a_large_window_path_takes_the_window_the_cross_validation_prefers(case, tmp_path):
    from xorbit.training import linear
    from xorbit.training.samples import PairedArrays

    x, y = window_choice_case(case)
    data = PairedArrays(
        coarse=x[:, None].astype(np.float32),
        fine=y[:, None].astype(np.float32),
        fine_lat=np.linspace(10, 30, 84),
        times=np.arange(len(x)),
    )
    cfg = small_config(linear_window=(21, 21), linear_half=None)
    dsr = xorbit.Downscaler.from_config(cfg, seed=0, mean={"tas": 0.0}, std={"tas": 1.0})
    fit = linear.fit_linear_path(dsr.model, data)
    half = None if case == "far" else 5
    assert fit.half == half and dsr.config.linear_half == half
    assert dsr.model.linear.coef.shape == (441, 441 if half is None else 121, 16)
    with torch.no_grad():
        got = dsr.model.linear(torch.from_numpy(x[:2, None]).float()).numpy()
    np.testing.assert_allclose(got, fit.predict(x[:2, None]), rtol=1e-4, atol=1e-4)
    back = xorbit.load(dsr.save(tmp_path / "m.xorbit"))  # the chosen path is saved and rebuilt
    assert back.config.linear_half == half
    assert torch.equal(back.model.linear.coef, dsr.model.linear.coef)


def censored_case(t, seed):
    """Targets ``max(0, 2 x_own - 0.5 + noise)``: a linear latent field clamped at zero."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, 4, 5))
    latent = 2.0 * x.repeat(2, -2).repeat(2, -1) - 0.5 + 0.3 * rng.standard_normal((t, 8, 10))
    return x, np.maximum(latent, 0.0), latent


def test_a_ridge_on_censored_targets_learns_the_latent_field():
    x, y, _ = censored_case(120, 0)
    xt, yt, latent_t = censored_case(200, 1)
    plain = fit_ridge(x, y, 2)
    censored = fit_ridge(x, y, 2, floor=np.zeros_like(y))
    err = {
        name: float(np.sqrt(((np.maximum(f.predict(xt), 0) - yt) ** 2).mean()))
        for name, f in (("plain", plain), ("censored", censored))
    }
    assert err["censored"] < 0.8 * err["plain"], err
    # below the floor it predicts the latent field, not zero
    dry = latent_t < -1.0
    assert float(censored.predict(xt)[dry].mean()) < -1.0 < float(plain.predict(xt)[dry].mean())
    # no target at its floor: the same fit as without one
    same = fit_ridge(x, y + 1.0, 2, floor=np.zeros_like(y))
    np.testing.assert_array_equal(same.coef, fit_ridge(x, y + 1.0, 2).coef)


def test_the_zero_of_a_normalized_output_is_where_it_is_dry():
    """``PairedArrays.fine_zero`` (the floor of censored targets) is the normalized
    value of the dry pixels, climatology and all."""
    from xorbit.training.samples import pair_arrays

    fine = fine_field(nt=12, n=16, seed=3)
    fine = (fine - 280).clip(min=0).rename("pr")  # dry wherever the field was below 280
    coarse = coarsen(fine, 4)
    clim = {"pr": fine.mean("time")}
    data = pair_arrays(
        coarse, fine, ["pr"], ["pr"], 4, {"pr": 1.5}, {"pr": 3.0}, output_climatology=clim
    )
    dry = fine.values == 0
    assert dry.any() and (~dry).any()
    zero = np.broadcast_to(data.fine_zero, data.fine.shape)[:, 0]
    np.testing.assert_allclose(data.fine[:, 0][dry], zero[dry], atol=1e-5)
    assert np.all(data.fine[:, 0][~dry] > zero[~dry])


def test_train_censors_the_dry_pixels_of_a_nonnegative_output():
    """`xorbit.train(..., nonnegative=[v])` fits the path on censored targets: at
    dry pixels it predicts below the floor, where a path fitted without the
    floor stays near it."""
    from xorbit.training.samples import pair_arrays

    rng = np.random.default_rng(4)
    z = rng.standard_normal((40, 8, 8)).repeat(4, -2).repeat(4, -1)
    fine = fine_field(nt=40, seed=4).rename("pr")  # its grid, and the rain of a latent field:
    fine.values = np.maximum(2.0 * z - 0.5 + 0.3 * rng.standard_normal(z.shape), 0.0)
    fine.attrs = {"units": "mm/day"}
    coarse = coarsen(fine, 4)
    cfg = small_config(in_vars=["pr"], out_vars=["pr"])
    kw = dict(epochs=1, progress=False, device="cpu", gate=False, seed=0)
    paths = {}
    for name, nonnegative in (("censored", ["pr"]), ("plain", [])):
        dsr = xorbit.train(coarse, fine, cfg, nonnegative=nonnegative, **kw)
        data = pair_arrays(
            coarse, fine, ["pr"], ["pr"], 4, dsr.mean, dsr.std,
            input_climatology=dsr.input_climatology, output_climatology=dsr.output_climatology,
        )  # fmt: skip
        x = torch.from_numpy(data.coarse)
        with torch.no_grad():
            latent = dsr.model.skip(x, ["pr"]) + dsr.model.linear_map(x, ["pr"])
        dry = fine.values[:, None] == 0
        paths[name] = float((latent.numpy() - data.fine_zero)[dry].mean())  # below the floor
    assert paths["censored"] < paths["plain"] - 0.05, paths


def test_the_network_is_not_asked_to_lift_pixels_the_path_already_makes_dry():
    from xorbit.training import linear
    from xorbit.training.samples import PairedArrays

    rng = np.random.default_rng(5)
    z = rng.standard_normal((30, 1, 8, 8))
    fine = np.maximum(2.0 * z.repeat(4, -2).repeat(4, -1) - 0.5, 0.0).astype(np.float32)
    data = PairedArrays(
        coarse=z.astype(np.float32),
        fine=fine,
        fine_lat=np.linspace(10, 25, 32),
        times=np.arange(30),
        fine_zero=np.zeros((1, 32, 32), np.float32),
    )
    cfg = small_config(linear_window=(8, 8), linear_half=None)
    model = xorbit.Downscaler.from_config(cfg, seed=0, mean={"tas": 0.0}, std={"tas": 1.0}).model
    linear.fit_linear_path(model, data, floors=["tas"])
    assert linear.dry_kept(model, data, []) is data  # no floors: as it was
    moved = linear.dry_kept(model, data, ["tas"])
    with torch.no_grad():
        x = torch.from_numpy(data.coarse)
        base = (model.skip(model._pad(x), ["tas"]) + model.linear_map(x, ["tas"])).numpy()
    dry = fine == 0
    low = dry & (base < 0)
    assert low.sum() > 0.2 * dry.sum() and (dry & (base > 0)).any()
    np.testing.assert_array_equal(moved.fine[low], base[low])  # nothing left to correct
    np.testing.assert_array_equal(moved.fine[~low], fine[~low])  # wet, or predicted wet: the floor
