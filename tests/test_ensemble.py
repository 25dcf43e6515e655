"""Stochastic Reslim: noise channels, the fair CRPS, seamless members, ensemble scores."""

import dataclasses
import warnings

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr

import xorbit
from tests.datasets import powerlaw_field, tiny_config
from tests.test_accessor import coarse_field
from tests.test_constraints import cell_means
from tests.test_mc_dropout import coarse, dropout_downscaler
from tests.test_precip import gamma_precip, precip_config
from tests.test_train import fine_field, small_config
from xorbit import coarsen
from xorbit.cli import main as cli_main
from xorbit.engine import downscale_array, field_noise, member_noise, window_noise
from xorbit.metrics import gradient_energy, rank_flatness, rank_histogram
from xorbit.model.loss import fair_crps_loss, mirror
from xorbit.model.reslim import Reslim
from xorbit.tiles import TilePlan
from xorbit.training import TrainOptions, train

K = 4
TILES = dict(tile=4, halo=2)


def stochastic_downscaler(noise_channels=3):
    """A stochastic model whose output depends on its noise (the last layers
    randomised, as training would move them away from zero), without dropout."""
    return dropout_downscaler(drop_rate=0.0, drop_path=0.0, noise_channels=noise_channels)


@pytest.fixture(scope="module")
def dsr():
    return stochastic_downscaler()


# ------------------------------------------------------------------ the loss


def test_fair_crps_matches_the_pairwise_formula_and_its_gradient_is_finite():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 2, 4, 3, generator=gen, requires_grad=True)
    y = torch.randn(2, 2, 4, 3, generator=gen)
    y[0, 1, 2, 2] = float("nan")  # a missing pixel drops out
    loss = fair_crps_loss(x, y)
    xs, ys = x.detach().numpy(), y.numpy()
    skill = np.abs(xs - ys[:, None]).mean(1)
    pairs = np.abs(xs[:, :, None] - xs[:, None, :]).sum((1, 2)) / (2 * 5 * 4)
    assert float(loss.detach()) == pytest.approx(np.nanmean(skill - pairs), rel=1e-5)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    # identical members: the fair CRPS is their absolute error
    same = torch.zeros(1, 3, 1, 2, 2)
    assert float(fair_crps_loss(same, torch.ones(1, 1, 2, 2))) == pytest.approx(1.0)


def test_fair_crps_weights_rows_and_variables_and_adds_each_members_tv():
    from xorbit.model.loss import total_variation

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 2, 4, 5, generator=gen)
    y = torch.randn(2, 2, 4, 5, generator=gen)
    lw = torch.rand(2, 4, generator=gen) + 0.5
    vw = torch.tensor([10.0, 1.0])
    got = fair_crps_loss(x, y, lam=0.1, lat_weights=lw, var_weights=vw)
    xs, ys = x.numpy(), y.numpy()
    skill = np.abs(xs - ys[:, None]).mean(1)
    pairs = np.abs(xs[:, :, None] - xs[:, None, :]).sum((1, 2)) / (2 * 3 * 2)
    tv = total_variation(x.flatten(0, 1)).reshape(x.shape).mean(1).numpy()
    term = (skill - pairs + 0.1 * tv) * lw.numpy()[:, None, :, None] * vw.numpy()[:, None, None]
    assert float(got) == pytest.approx(term.mean(), rel=1e-5)


def test_fair_crps_of_two_members_learns_the_true_spread():
    """Its minimum is at members drawn from the truth's distribution, even with two
    members; the plain CRPS of two members is minimised by too little spread."""
    torch.manual_seed(0)

    def fitted_scale(fair: bool) -> float:
        log_s = torch.zeros((), requires_grad=True)
        opt = torch.optim.Adam([log_s], lr=0.05)
        for _ in range(400):
            y = torch.randn(64, 1, 8, 8)
            members = log_s.exp() * torch.randn(64, 2, 1, 8, 8)
            if fair:
                loss = fair_crps_loss(members, y)
            else:  # E|X - y| - E|X - X'| / 2 over the 2 x 2 pairs
                skill = (members - y[:, None]).abs().mean(1)
                loss = (skill - (members[:, 0] - members[:, 1]).abs() / 4).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(log_s.detach().exp())

    assert fitted_scale(fair=True) == pytest.approx(1.0, abs=0.1)
    assert fitted_scale(fair=False) < 0.8


def test_fair_crps_refuses_one_member_and_mismatched_shapes():
    with pytest.raises(ValueError, match="at least 2 members"):
        fair_crps_loss(torch.zeros(1, 1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"\[B, M, V, H, W\]"):
        fair_crps_loss(torch.zeros(1, 2, 1, 2, 2), torch.zeros(1, 2, 2, 2))


def test_mirrored_fair_crps_leaves_each_pair_out_of_the_spread_term():
    gen = torch.Generator().manual_seed(1)
    draws = torch.randn(2, 3, 1, 4, 3, generator=gen)
    centre = torch.randn(2, 1, 1, 4, 3, generator=gen)
    x = mirror(draws, centre)
    assert x.shape == (2, 6, 1, 4, 3)
    torch.testing.assert_close(x[:, 1], 2 * centre[:, 0] - draws[:, 0])
    np.testing.assert_allclose(mirror(draws.numpy(), centre.numpy()), x.numpy())
    y = torch.randn(2, 1, 4, 3, generator=gen)
    xs, ys = x.numpy(), y.numpy()
    skill = np.abs(xs - ys[:, None]).mean(1)
    diff = np.abs(xs[:, :, None] - xs[:, None, :])
    partner = np.arange(6) ^ 1  # 0-1, 2-3, 4-5
    diff[:, np.arange(6), partner] = 0
    pairs = diff.sum((1, 2)) / (2 * 6 * 4)
    got = float(fair_crps_loss(x, y, paired=True))
    assert got == pytest.approx(float(np.mean(skill - pairs)), rel=1e-5)
    # the partners' differences are large: counting them would understate the CRPS
    assert got > float(fair_crps_loss(x, y)) + 1e-3
    for m in (2, 5):
        with pytest.raises(ValueError, match="pairs"):
            fair_crps_loss(torch.zeros(1, m, 1, 2, 2), torch.zeros(1, 1, 2, 2), paired=True)


@pytest.mark.parametrize("mode", ["independent", "antithetic", "mirrored"])
def test_the_training_loss_draws_the_members_noise_by_mode(mode):
    from xorbit.training.loop import _loss

    class Recorder(torch.nn.Module):
        def forward(self, x, variables, res_km=None, noise=None):
            self.noise = noise
            return torch.nn.functional.interpolate(x[:, :1] + noise[:, :1], scale_factor=2)

    cfg = xorbit.ReslimConfig(
        in_vars=["a"], out_vars=["a"], factor=2, noise_channels=2, noise_members=mode
    )
    net = Recorder()
    x, y = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 8, 8)
    loss = _loss(net, cfg, x, y, None, None, TrainOptions(ensemble=4, tv_lambda=0.0), None)
    assert torch.isfinite(loss)
    z = net.noise.unflatten(0, (3, -1))
    assert z.shape[1] == {"independent": 4, "antithetic": 4, "mirrored": 3}[mode]
    if mode == "mirrored":
        assert float(z[:, -1].abs().max()) == 0.0 and float(z[:, 0].abs().min()) > 0
    else:  # antithetic members are drawn so, and train on independent ones
        assert float((z[:, 1] + z[:, 0]).abs().min()) > 0


def test_mirrored_fair_crps_learns_the_true_spread():
    """Mirrored pairs about the true centre: the loss's minimum is at the
    truth's spread, as for independent members."""
    torch.manual_seed(0)
    log_s = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([log_s], lr=0.05)
    for _ in range(400):
        y = torch.randn(64, 1, 8, 8)
        draws = log_s.exp() * torch.randn(64, 2, 1, 8, 8)
        loss = fair_crps_loss(mirror(draws, torch.zeros(64, 1, 1, 8, 8)), y, paired=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(log_s.detach().exp()) == pytest.approx(1.0, abs=0.1)


# ------------------------------------------------------------------ the model


def test_noise_enters_the_network_but_not_the_linear_path(dsr):
    model = dsr.model.eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        zero = model(x)
        np.testing.assert_array_equal(model(x, noise=torch.zeros(2, 3, 8, 8)), zero)
        a = model(x, noise=torch.randn(2, 3, 8, 8))
        b = model(x, noise=torch.randn(2, 3, 8, 8))
    assert float((a - b).abs().mean()) > 1e-2 and float((a - zero).abs().mean()) > 1e-2
    # every noise channel has its own embedding, and feeds the residual path
    assert len(model.token_embeds) == 4 and model.var_embed.shape[1] == 4
    assert model.path2[0].in_channels == 1 + 3
    with pytest.raises(ValueError, match=r"noise has shape \(2, 2, 8, 8\)"):
        model(x, noise=torch.zeros(2, 2, 8, 8))
    with pytest.raises(KeyError, match="unknown to this model"):
        model(torch.zeros(1, 2, 8, 8), ["tas", model.noise_vars[0]])
    plain = Reslim(tiny_config(in_vars=["tas"], out_vars=["tas"], static_vars=[]))
    with pytest.raises(ValueError, match="deterministic"):
        plain(x, noise=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="noise_channels must be"):
        tiny_config(noise_channels=-1)


def test_adaptive_tokens_take_the_noise_too():
    cfg = tiny_config(
        in_vars=["tas"],
        out_vars=["tas"],
        static_vars=[],
        img_size=(16, 16),
        tokens="adaptive",
        max_leaf=2,
        noise_channels=2,
    )
    model = Reslim(cfg).eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        a = model(x, noise=torch.randn(1, 2, 16, 16))
        b = model(x, noise=torch.randn(1, 2, 16, 16))
    assert a.shape == (1, 1, 64, 64) and float((a - b).abs().mean()) > 1e-3


def test_a_deterministic_model_fine_tunes_into_a_stochastic_one():
    """init= a deterministic model, ensemble=M: the pretrained weights move,
    the noise channels' embeddings and residual-path inputs start fresh."""
    from xorbit.training.finetune import transfer

    fine = fine_field(nt=24, n=32)
    crs = coarsen(fine, 4)
    kw = dict(epochs=1, batch_size=4, progress=False, seed=0, device="cpu")
    pre = train(crs, fine, small_config(), **kw)
    tuned = train(crs, fine, init=pre, ensemble=2, **kw)
    assert tuned.config.noise_channels > 0 and pre.config.noise_channels == 0
    status = transfer(pre.model, Reslim(tuned.config))
    n_in = len(tuned.config.in_vars)
    assert status["token_embeds.0.proj.weight"] == "pretrained"
    assert status[f"token_embeds.{n_in}.proj.weight"] == "new"  # the first noise channel
    assert status["var_embed"] == "partial" and status["path2.0.weight"] == "partial"
    assert status["blocks.0.attn.qkv.weight"] == "pretrained"
    members = crs.isel(time=slice(0, 2)).orbit.downscale(tuned, samples=2)
    assert float(np.abs(members[0] - members[1]).mean()) > 0


def test_the_noise_is_a_function_of_global_position():
    shape = (12, 16)
    whole = field_noise(7, 2, np.arange(12), np.arange(16), shape)
    assert whole.shape == (2, 12, 16) and whole.dtype == np.float32
    # a window reads the whole field's values; past an edge it wraps around
    part = field_noise(7, 2, np.arange(3, 9), np.arange(14, 19), shape)
    np.testing.assert_array_equal(part, whole[:, 3:9][:, :, np.r_[14, 15, 0, 1, 2]])
    assert not np.array_equal(field_noise(8, 2, np.arange(12), np.arange(16), shape), whole)
    big = field_noise(3, 1, np.arange(300), np.arange(400), (300, 400)).ravel()
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01
    assert abs(np.corrcoef(big[:-1], big[1:])[0, 1]) < 0.01  # neighbours independent
    # overlapping windows of two tiles see the same noise where they overlap
    plan = TilePlan.build(shape, 4, 2, K)
    w = window_noise(0, 1, 2, plan, [(0, 0), (0, 1)], (1,), (0,))
    np.testing.assert_array_equal(w[0][:, :, 4:], w[1][:, :, :4])


def test_members_differ_are_seeded_and_do_not_depend_on_chunks(dsr):
    x = coarse()
    x[1, 0, 5, 6] = np.nan
    a = downscale_array(x, dsr, **TILES, samples=3, seed=5)
    assert a.shape == (3, 3, 1, 12 * K, 16 * K)
    ok = np.isfinite(a[0])
    assert min(np.abs(a[i] - a[j])[ok].mean() for i in range(3) for j in range(i)) > 1e-2
    np.testing.assert_array_equal(downscale_array(x, dsr, **TILES, samples=3, seed=5), a)
    b = downscale_array(x, dsr, **TILES, samples=3, seed=6)
    assert np.abs(a - b)[:, ok].mean() > 1e-2
    np.testing.assert_array_equal(downscale_array(x, dsr, **TILES, samples=2, seed=5), a[:2])
    for chunks, batch in (((1, 1, 5, 7), 16), ((2, 1, 12, 4), 3)):
        lazy = downscale_array(
            da.from_array(x, chunks=chunks), dsr, **TILES, samples=3, seed=5, batch_size=batch
        )
        np.testing.assert_allclose(lazy.compute(), a, rtol=1e-5, atol=0)
    p1 = downscale_array(x, dsr, **TILES, periodic=True, samples=2, seed=5)
    p2 = downscale_array(
        da.from_array(x, chunks=(1, 1, 12, 4)), dsr, **TILES, periodic=True, samples=2, seed=5
    )
    np.testing.assert_allclose(p2.compute(), p1, rtol=1e-5, atol=0)
    # the deterministic output is the member at zero noise, and needs no dropout
    det = downscale_array(x, dsr, **TILES)
    assert min(np.abs(det - m)[ok].mean() for m in a) > 1e-2


def test_mirrored_members_are_pairs_about_the_zero_noise_member(monkeypatch):
    mir = dropout_downscaler(
        drop_rate=0.0, drop_path=0.0, noise_channels=3, noise_members="mirrored"
    )
    x = coarse()
    calls = []
    real = xorbit.engine.predict_block

    def counted(*args, **kw):
        calls.append(kw.get("mc"))
        return real(*args, **kw)

    monkeypatch.setattr(xorbit.engine, "predict_block", counted)
    a = downscale_array(x, mir, **TILES, samples=5, seed=2)
    # 5 members: 3 draws and the centre, 4 passes
    assert calls == [(2, 0), (2, 1), (2, 2), None]
    centre = downscale_array(x, mir, **TILES)
    for p in (0, 1):
        np.testing.assert_allclose(a[2 * p : 2 * p + 2].mean(0), centre, rtol=0, atol=1e-4)
    assert np.abs(a[0] - a[2]).mean() > 1e-2 and np.abs(a[0] - centre).mean() > 1e-2
    np.testing.assert_array_equal(a[:4], downscale_array(x, mir, **TILES, samples=4, seed=2))
    # the draws are the independent model's members 0, 1, 2 for the same weights
    ind = dataclasses.replace(mir, model=Reslim(mir.config.replace(noise_members="independent")))
    ind.model.load_state_dict(mir.model.state_dict())
    np.testing.assert_allclose(
        downscale_array(x, ind, **TILES, samples=3, seed=2), a[0::2], rtol=0, atol=1e-5
    )
    lazy = downscale_array(da.from_array(x, chunks=(1, 1, 5, 7)), mir, **TILES, samples=5, seed=2)
    np.testing.assert_allclose(lazy.compute(), a, rtol=1e-5, atol=0)


def test_antithetic_members_are_draws_and_their_negatives(dsr, tmp_path, capsys):
    assert dsr.config.noise_members == "antithetic"  # the default
    path = dsr.drawn("independent").save(tmp_path / "ind.xorbit")
    assert xorbit.load(path).config.noise_members == "independent"
    assert cli_main(["info", str(path)]) == 0
    assert "members (--samples) drawn independent" in capsys.readouterr().out
    anti, ind_dsr = dsr.drawn("antithetic"), dsr.drawn("independent")
    assert ind_dsr.config.noise_members == "independent"
    with pytest.raises(ValueError, match="mirrored members need a model trained mirrored"):
        dsr.drawn("mirrored")
    with pytest.raises(ValueError, match="deterministic"):
        dropout_downscaler().drawn("antithetic")
    plan = TilePlan.build((12, 16), (4, 4), (2, 2), K)
    args = (plan, [(0, 0), (1, 2)], (2,), (3,))
    cfg = anti.config
    np.testing.assert_array_equal(member_noise(cfg, (4, 0), *args), window_noise(4, 0, 3, *args))
    np.testing.assert_array_equal(member_noise(cfg, (4, 1), *args), -window_noise(4, 0, 3, *args))
    np.testing.assert_array_equal(member_noise(cfg, (4, 2), *args), window_noise(4, 1, 3, *args))
    x = coarse()
    a = downscale_array(x, anti, **TILES, samples=4, seed=5)
    ind = downscale_array(x, ind_dsr, **TILES, samples=2, seed=5)
    np.testing.assert_allclose(a[0::2], ind, rtol=0, atol=1e-5)  # the draws: 0, 1
    assert np.abs(a[1] - ind[1]).mean() > 1e-2
    lazy = downscale_array(da.from_array(x, chunks=(1, 1, 5, 7)), anti, **TILES, samples=4, seed=5)
    np.testing.assert_allclose(lazy.compute(), a, rtol=1e-5, atol=0)


def test_members_are_seamless_across_tiles(dsr):
    """Tiles blend member fields drawn from the same global noise: a member
    downscaled in small tiles differs from the whole-domain member no more
    at the seams than elsewhere, as the deterministic output does."""
    x = coarse((4, 1, 16, 16), seed=2)
    whole = downscale_array(x, dsr, tile=16, halo=0, samples=2, seed=1)
    tiled = downscale_array(x, dsr, tile=8, halo=4, samples=2, seed=1)
    diff = np.abs(tiled - whole)
    seam = diff[..., :, 8 * K - 4 : 8 * K + 4].mean()
    inner = diff[..., :, 2 * K : 6 * K].mean()
    spread = np.abs(whole[0] - whole[1]).mean()
    # members differ by far more than tiling changes them, at the seams too
    assert seam < 0.5 * spread and diff.mean() < 0.5 * spread, (seam, inner, spread)
    assert seam < 3 * inner + 0.05 * spread, (seam, inner, spread)


def test_the_accessor_names_the_members(dsr):
    field = coarse_field(coarse()[:, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", xorbit.accessor.GridWarning)
        out = field.chunk(time=1).orbit.downscale(dsr, **TILES, samples=2, seed=3)
    assert out.dims[0] == "sample" and out.shape[0] == 2
    assert "stochastic model" in out.attrs["ensemble"]
    assert out["sample"].attrs["long_name"] == "stochastic-model ensemble member"


# ------------------------------------------------------------------ training


def test_train_with_an_ensemble_builds_noise_and_learns_spread():
    fine = fine_field(nt=24, n=32)
    crs = coarsen(fine, 4)
    kw = dict(epochs=4, batch_size=4, progress=False, seed=0, device="cpu")
    d = train(crs, fine, small_config(), ensemble=3, **kw)
    assert d.config.noise_channels == xorbit.model.config.NOISE_CHANNELS
    # no gate: it would judge one member's RMSE and could switch the spread off
    assert "gate" not in d.history[-1] and float(d.model.gate) == 1.0
    assert d.history[-1]["loss"] < d.history[0]["loss"]
    members = crs.isel(time=slice(0, 3)).orbit.downscale(d, samples=4, seed=0)
    assert float(members.std("sample").mean()) > 0.05  # K: the members spread
    # reproducible: the same seed gives the same weights
    again = train(crs, fine, small_config(), ensemble=3, **kw)
    for k, v in d.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(ValueError, match="ensemble must be 0"):
        TrainOptions(ensemble=1)


@pytest.mark.parametrize("mode", ["antithetic", "mirrored"])
def test_train_paired_members_learns_spread(mode):
    """Antithetic and mirrored members train, spread, and draw as they should."""
    fine = fine_field(nt=24, n=32)
    crs = coarsen(fine, 4)
    kw = dict(epochs=4, batch_size=4, progress=False, seed=0, device="cpu")
    d = train(crs, fine, small_config(noise_members=mode), ensemble=4, **kw)
    assert d.config.noise_members == mode and d.config.noise_channels > 0
    assert d.history[-1]["loss"] < d.history[0]["loss"]
    x = crs.isel(time=slice(0, 3))
    members = x.orbit.downscale(d, samples=4, seed=0)
    assert float(members.std("sample").mean()) > 0.05  # K
    centre = x.orbit.downscale(d)
    if mode == "mirrored":  # the centre is the members' mean
        xr.testing.assert_allclose(members.mean("sample"), centre, atol=1e-4)
    else:
        assert float(abs(members.mean("sample") - centre).max()) > 1e-3
    if mode == "mirrored":
        for m in (3, 2):
            with pytest.raises(ValueError, match=f"ensemble={m}: .*{mode}"):
                train(crs, fine, small_config(noise_members=mode), ensemble=m, **kw)
    else:  # trained on independent members: the same weights as independent
        ind = train(crs, fine, small_config(noise_members="independent"), ensemble=4, **kw)
        for k, v in d.model.state_dict().items():
            torch.testing.assert_close(ind.model.state_dict()[k], v, rtol=0, atol=0)


def test_cross_fitting_applies_without_the_gate():
    """An ensemble trains without the gate; cross_fit= was silently ignored there
    (the same weights with and without it)."""
    fine = fine_field(nt=24, n=32)
    crs = coarsen(fine, 4)
    kw = dict(epochs=1, batch_size=4, progress=False, seed=0, device="cpu", ensemble=2)
    plain = train(crs, fine, small_config(), **kw)
    crossed = train(crs, fine, small_config(), cross_fit=3, **kw)
    # the same linear path (fitted on every year), a network trained on other targets
    torch.testing.assert_close(crossed.model.linear.coef, plain.model.linear.coef)
    assert float(plain.model.linear.coef.abs().max()) > 0
    diff = max(
        float((crossed.model.state_dict()[k] - v).abs().max())
        for k, v in plain.model.state_dict().items()
    )
    assert diff > 1e-4


def test_precipitation_members_keep_the_coarse_totals_and_stay_non_negative():
    """A stochastic model with the precipitation transform: the multiplicative
    constraint holds for every member, as for the deterministic output."""
    fine = gamma_precip()
    coarse = xorbit.coarsen(fine, K)
    kw = dict(epochs=2, batch_size=8, progress=False, device="cpu", climatology=False)
    dsr = train(coarse, fine, precip_config(), transforms={"pr": "log1p"}, ensemble=2, **kw)
    assert dsr.constraints == {"pr": "multiplicative"} and dsr.config.noise_channels > 0
    members = coarse.isel(time=slice(0, 4)).chunk(time=2).orbit.downscale(dsr, samples=3)
    values = members.values
    assert float(np.abs(values[0] - values[1]).mean()) > 1e-3 * float(coarse.mean())
    assert values.min() >= 0.0
    for m in values:
        np.testing.assert_allclose(
            cell_means(m), coarse.values[:4], rtol=0, atol=1e-3 * float(coarse.mean())
        )


def test_an_ensemble_keeps_the_gates_rules_it_can():
    """Without the gate, an ensemble still clears a path fitted on too few years
    (it extrapolates worse than none), and picks no epoch by the RMSE of its
    zero-noise member; a noise model trained without ensemble= is warned about."""
    fine = fine_field(nt=6, n=32)  # 5 years besides the gate's block: too few
    crs = coarsen(fine, 4)
    kw = dict(epochs=2, batch_size=4, progress=False, seed=0, device="cpu")
    short = train(crs, fine, small_config(), ensemble=2, **kw)
    assert float(short.model.linear.coef.abs().max()) == 0.0
    longer = fine_field(nt=24, n=32)
    kept = train(coarsen(longer, 4), longer, small_config(), ensemble=2, **kw)
    assert float(kept.model.linear.coef.abs().max()) > 0
    val = train(coarsen(longer, 4), longer, small_config(), ensemble=2, val_fraction=0.25, **kw)
    assert all(h["best_epoch"] is None or h["best_epoch"] == 0 for h in val.history)
    with pytest.warns(UserWarning, match="trains without ensemble="):
        train(crs, fine, small_config(noise_channels=2), **kw)


def test_fit_refuses_an_ensemble_for_a_deterministic_model():
    from xorbit.training.loop import fit

    dsr = xorbit.Downscaler.from_config(small_config(), mean={"tas": 280.0}, std={"tas": 10.0})
    with pytest.raises(ValueError, match="noise_channels=0"):
        fit(dsr, None, None, TrainOptions(ensemble=2, progress=False))  # checked first


# ------------------------------------------------------------------ scores


def test_rank_histogram_is_flat_for_a_calibrated_ensemble_and_u_shaped_otherwise():
    rng = np.random.default_rng(0)
    truth = xr.DataArray(rng.standard_normal((200, 8, 8)), dims=("time", "lat", "lon"))
    good = xr.DataArray(rng.standard_normal((7, 200, 8, 8)), dims=("sample", "time", "lat", "lon"))
    narrow = 0.3 * good
    counts = rank_histogram(good, truth)
    assert counts.sizes["rank"] == 8 and int(counts.sum()) == truth.size
    assert rank_flatness(good, truth) < 3
    assert rank_flatness(narrow, truth) > 100
    hist = rank_histogram(narrow, truth).values
    assert hist[0] > 2 * hist[4] and hist[-1] > 2 * hist[4]  # a U
    # missing pixels are left out of the counts
    truth[0, 0, 0] = np.nan
    assert int(rank_histogram(good, truth).sum()) == truth.size - 1


def test_rank_histogram_of_a_dataset_pools_its_variables_and_leaves_numpy_alone():
    rng = np.random.default_rng(2)
    dims = ("time", "lat", "lon")
    truth = xr.Dataset({v: (dims, rng.standard_normal((20, 4, 4))) for v in ("a", "b")})
    ens = xr.Dataset({v: (("sample", *dims), rng.standard_normal((5, 20, 4, 4))) for v in "ab"})
    both = rank_histogram(ens, truth).values
    one = rank_histogram(ens["a"], truth["a"]).values + rank_histogram(ens["b"], truth["b"]).values
    np.testing.assert_array_equal(both, one)
    np.random.seed(123)  # noqa: NPY002
    before = np.random.get_state()[1].copy()  # noqa: NPY002
    rank_histogram(ens["a"].round(0), truth["a"].round(0))  # ties: drawn at random
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # noqa: NPY002
    tied = [rank_histogram(ens["a"].round(0), truth["a"].round(0)).values for _ in range(2)]
    np.testing.assert_array_equal(*tied)  # and reproducibly


def test_gradient_energy_sees_a_blurred_field():
    f = xr.DataArray(powerlaw_field((4, 32, 32), slope=2), dims=("time", "lat", "lon"))
    blurred = f.rolling(lat=3, lon=3, center=True).mean()
    assert float(gradient_energy(f)) == pytest.approx(
        float((f.diff("lat") ** 2).mean() + (f.diff("lon") ** 2).mean())
    )
    assert float(gradient_energy(blurred) / gradient_energy(f)) < 0.3
    ev = xorbit.evaluate(blurred.rename("v"), f.rename("v"))
    assert ev["gradient_energy_ratio"].item() < 0.3


def test_member_spectra_are_each_members_not_the_means():
    """power_spectra and ralsd of an ensemble average over its members' maps: a
    mean field, smoother than any member, would lose the small scales."""
    from xorbit.metrics import power_spectra, ralsd

    rng = np.random.default_rng(1)
    truth = xr.DataArray(powerlaw_field((3, 32, 32), slope=2), dims=("time", "lat", "lon"))
    noise = rng.standard_normal((6, 3, 32, 32))
    members = truth + xr.DataArray(noise, dims=("sample", "time", "lat", "lon"))
    spec = power_spectra(member=members)["member"]
    each = [power_spectra(m=members.isel(sample=i))["m"] for i in range(6)]
    np.testing.assert_allclose(spec.values, np.mean(each, axis=0), rtol=1e-10)
    mean_spec = power_spectra(mean=members.mean("sample"))["mean"]
    assert float(mean_spec[-5:].sum()) < 0.5 * float(spec[-5:].sum())
    per_member = np.mean([float(ralsd(members.isel(sample=i), truth)) for i in range(6)])
    assert float(ralsd(members, truth)) == pytest.approx(per_member, rel=1e-6)
