"""Resolution from the grid: the embedding reads the input's spacing in km."""

import numpy as np
import pytest
import torch
import xarray as xr

import xorbit
from tests.datasets import powerlaw_field
from tests.test_train import small_config
from xorbit.accessor import GridWarning
from xorbit.grid import KM_PER_DEGREE, spacing_km
from xorbit.model.reslim import RES_SCALE, Reslim


def field(n, step, lat0=10.0, lon0=200.0, nt=12, seed=0, units=("degrees_north", "degrees_east")):
    data = 280 + 10 * powerlaw_field((nt, n, n), seed=seed)
    return xr.DataArray(
        data.astype(np.float32),
        dims=("time", "lat", "lon"),
        coords={
            "time": np.arange(nt),
            "lat": ("lat", lat0 + step * np.arange(n), {"units": units[0]}),
            "lon": ("lon", lon0 + step * np.arange(n), {"units": units[1]}),
        },
        name="tas",
        attrs={"units": "K"},
    )


class Spy:
    """Records every spacing the resolution embedding reads."""

    def __init__(self, monkeypatch):
        self.seen = []
        original = Reslim.resolution_embedding

        def spy(model, res_km, tokens):
            values = model.config.res_km if res_km is None else res_km
            self.seen.append(
                (res_km is None, np.atleast_1d(torch.as_tensor(values).cpu().numpy()).tolist())
            )
            return original(model, res_km, tokens)

        monkeypatch.setattr(Reslim, "resolution_embedding", spy)

    def values(self):
        return sorted({round(v, 3) for _, vals in self.seen for v in vals})


def test_spacing_km_from_degrees_metres_and_kilometres():
    deg = field(4, 2.5).isel(time=0)
    assert spacing_km(deg) == pytest.approx(2.5 * KM_PER_DEGREE)
    assert 1.0 * KM_PER_DEGREE == pytest.approx(111.19, abs=0.01)  # "111 km"
    # a 2.5 x 3.75 degree grid (HadCM3): the geometric mean of the two axes
    hadcm3 = deg.assign_coords(lon=("lon", 3.75 * np.arange(4), {"units": "degrees_east"}))
    assert spacing_km(hadcm3) == pytest.approx(np.sqrt(2.5 * 3.75) * KM_PER_DEGREE)
    metres = field(4, 4000.0, units=("m", "m")).rename(lat="y", lon="x").isel(time=0)
    assert spacing_km(metres) == pytest.approx(4.0)
    km = metres.assign_coords(y=("y", 4.0 * np.arange(4), {"units": "km"}))
    assert spacing_km(km, "y", "x") == pytest.approx(4.0)
    # no units on a projected axis, or one point: nothing to say
    bare = metres.assign_coords(y=np.arange(4.0), x=np.arange(4.0))
    assert spacing_km(bare) is None
    assert spacing_km(deg.isel(lat=[0], lon=[0])) is None


def test_the_embedding_reads_one_spacing_per_sample():
    model = Reslim(small_config(interp_skip="none")).eval()  # no zero-initialised output layers
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        both = model(x, res_km=torch.tensor([111.0, 444.0]))
        first = model(x[:1], res_km=111.0)
        second = model(x[1:], res_km=444.0)
    torch.testing.assert_close(both, torch.cat([first, second]))
    assert not torch.allclose(first, model(x[:1], res_km=444.0))
    # relative to the model's own spacing by default: its own grid reads RES_SCALE
    tok = torch.zeros(1, 4, 16)
    with torch.no_grad():
        emb = model.resolution_embedding(torch.tensor([2 * model.config.res_km]), tok)
        want = model.spatial_embed(torch.tensor([[2 * RES_SCALE]]))
    torch.testing.assert_close(emb[0, 0], want[0])
    # an old config reads kilometres
    old = xorbit.ReslimConfig.from_dict(
        {k: v for k, v in small_config().to_dict().items() if k != "res_embed"}
    )
    assert old.res_embed == "km" and small_config().res_embed == "relative"
    with pytest.raises(ValueError, match="res_km has 3 values for a batch of 2"):
        model(x, res_km=torch.tensor([1.0, 2.0, 3.0]))


def test_a_model_trained_on_two_resolutions_reads_each_grid_spacing(monkeypatch):
    # the same kind of field on a 0.5 degree grid and on a 1 degree grid
    fine_a, fine_b = field(32, 0.5, seed=0), field(32, 1.0, lat0=-20.0, seed=1)
    coarse_a, coarse_b = xorbit.coarsen(fine_a, 4), xorbit.coarsen(fine_b, 4)
    spy = Spy(monkeypatch)
    dsr = xorbit.train(
        [coarse_a, coarse_b],
        [fine_a, fine_b],
        small_config(interp_skip="none"),  # the network's whole output, so the spacing shows
        epochs=1,
        batch_size=4,
        progress=False,
        device="cpu",
        climatology=False,
        val_fraction=0.25,
    )
    res_a, res_b = 2.0 * KM_PER_DEGREE, 4.0 * KM_PER_DEGREE
    assert dsr.grid["multi_resolution"] is True
    assert dsr.grid["res_km"] == pytest.approx([res_a, res_b])
    # training and validation fed both spacings, per sample
    assert spy.values() == pytest.approx([round(res_a, 3), round(res_b, 3)])
    assert not any(default for default, _ in spy.seen)
    assert len(dsr.history) == 1 and np.isfinite(dsr.history[0]["rmse_tas"])
    # downscaling each grid feeds its own spacing; no warning about the spacing
    for coarse, res in ((coarse_a, res_a), (coarse_b, res_b)):
        spy.seen.clear()
        with warnings_as_errors():
            out = coarse.orbit.downscale(dsr, device="cpu", constrain=False)  # as the array level
        assert spy.values() == pytest.approx([round(res, 3)])
        # and the spacing matters: the other grid's spacing gives another answer
        other = xorbit.engine.downscale_array(
            coarse.values[:, None], dsr, res_km=res_a + res_b - res
        )
        assert np.abs(out.values - other[:, 0]).max() > 1e-4  # (same spacing: < 1e-5)
        same = xorbit.engine.downscale_array(coarse.values[:, None], dsr, res_km=res)
        np.testing.assert_allclose(out.values, same[:, 0], rtol=0, atol=1e-5)


def test_several_grids_need_what_one_grid_can_hold():
    fine_a, fine_b = field(32, 0.5), field(32, 1.0)
    pairs = ([xorbit.coarsen(fine_a, 4), xorbit.coarsen(fine_b, 4)], [fine_a, fine_b])
    kw = dict(epochs=1, batch_size=4, progress=False, device="cpu")
    with pytest.raises(ValueError, match="needs climatology=False"):
        xorbit.train(*pairs, small_config(), **kw)
    with pytest.raises(ValueError, match="lists of the same length"):
        xorbit.train(pairs[0], pairs[1][:1], small_config(), climatology=False, **kw)
    bare = [c.assign_coords(lat=c.lat.values, lon=c.lon.values) for c in pairs[0]]
    for c in bare:
        c.lat.attrs, c.lon.attrs = {}, {}
    bare = [c.rename(lat="y", lon="x") for c in bare]
    fines = [f.rename(lat="y", lon="x") for f in pairs[1]]
    with pytest.raises(ValueError, match="each grid's spacing in km"):
        xorbit.train(bare, fines, small_config(), climatology=False, **kw)


def test_models_without_a_recorded_spacing_keep_their_constant(monkeypatch):
    fine = field(32, 0.5)
    coarse = xorbit.coarsen(fine, 4)
    dsr = xorbit.train(coarse, fine, small_config(), epochs=1, batch_size=4, progress=False)
    assert dsr.grid["res_km"] == pytest.approx(2.0 * KM_PER_DEGREE)
    spy = Spy(monkeypatch)
    coarse.orbit.downscale(dsr, device="cpu")
    assert spy.values() == pytest.approx([round(2.0 * KM_PER_DEGREE, 3)])
    # an older model (no res_km in its grid facts) reads config.res_km, as before
    del dsr.grid["res_km"]
    spy.seen.clear()
    coarse.orbit.downscale(dsr, device="cpu")
    assert spy.seen and all(default for default, _ in spy.seen)


def test_an_input_without_a_spacing_in_km_gets_the_training_one_with_a_warning(monkeypatch):
    fine = field(32, 0.5)
    coarse = xorbit.coarsen(fine, 4)
    dsr = xorbit.train(
        coarse, fine, small_config(), epochs=1, batch_size=4, progress=False, climatology=False
    )
    bare = coarse.rename(lat="y", lon="x").assign_coords(y=np.arange(8.0), x=np.arange(8.0))
    dsr.grid = {"res_km": dsr.grid["res_km"]}  # no orientation facts to compare
    spy = Spy(monkeypatch)
    with pytest.warns(GridWarning, match="cannot tell the input's grid spacing in km"):
        bare.orbit.downscale(dsr, device="cpu")
    assert spy.values() == pytest.approx([round(2.0 * KM_PER_DEGREE, 3)])


def warnings_as_errors():
    import warnings

    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error", GridWarning)

    class _Exit:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            ctx.__exit__(*exc)
            return False

    return _Exit()
