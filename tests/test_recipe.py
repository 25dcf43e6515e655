"""The steps of `xorbit.train` one at a time (`xorbit.training.recipe`), and their size."""

import ast
import pathlib

import numpy as np
import pytest
import torch
import xarray as xr

import xorbit
from tests.test_train import fine_field, small_config
from xorbit import coarsen
from xorbit.training import TrainOptions, recipe


@pytest.fixture(scope="module")
def pair():
    fine = fine_field(nt=30, n=32)
    return coarsen(fine, 4), fine


def prepared_pair(pair, **kw):
    coarse, fine = pair
    return recipe.prepare_pairs([(coarse, fine)], small_config(), **kw)


def test_prepare_pairs_finds_splits_and_adds_static_inputs(pair):
    _, fine = pair
    orog = xr.Dataset({"orog": fine.isel(time=0, drop=True).rename("orog") * 0 + 100.0})
    prepared = prepared_pair(pair, static=orog, val_fraction=0.2)
    p = prepared.pairs[0]
    assert not prepared.multi and len(prepared.pairs) == 1
    assert list(p.train_idx) == list(range(24)) and list(p.val_idx) == list(range(24, 30))
    # a fine static field: 16 packed coarse channels, static inputs of the config
    packed = [v for v in prepared.config.in_vars if v.startswith("orog[")]
    assert len(packed) == 16 and set(packed) <= set(prepared.config.static_vars)
    assert prepared.static_packing == {"orog": "fine"}
    assert prepared.units == {"tas": "K", **dict.fromkeys(packed, None)}
    assert prepared.cell_average_error["tas"] < 1e-5  # `coarsen` made the coarse field
    assert prepared.config.res_km == pytest.approx(2 * 111.195, rel=0.01)  # 2 degrees
    assert prepared.attrs["tas"]["standard_name"] == "air_temperature"


def test_the_first_pair_sets_units_for_every_pair(pair):
    coarse, fine = pair
    in_c = coarse.copy(data=coarse.values - 273.15).assign_attrs(units="degC")
    in_f = fine.copy(data=fine.values - 273.15).assign_attrs(units="degC")
    cfg = small_config()
    prepared = recipe.prepare_pairs([(coarse, fine), (in_c, in_f)], cfg)
    assert prepared.multi
    second = prepared.pairs[1]
    np.testing.assert_allclose(second.inputs["tas"].values, coarse.values, rtol=1e-6)
    np.testing.assert_allclose(second.targets["tas"].values, fine.values, rtol=1e-6)


def test_statistics_come_from_the_training_years_and_climatology_from_all(pair):
    prepared = prepared_pair(pair, val_fraction=0.2)
    coarse, fine = pair
    stats = recipe.statistics(prepared)
    clim = coarse.mean("time")
    np.testing.assert_allclose(stats.input_climatology["tas"].values, clim.values, rtol=1e-6)
    np.testing.assert_allclose(
        stats.output_climatology["tas"].values, fine.mean("time").values, rtol=1e-6
    )
    anomalies = (coarse - clim).isel(time=slice(0, 24))
    assert stats.mean == {"tas": 0.0}  # centred on the climatology
    assert stats.std["tas"] == pytest.approx(float(anomalies.std()), rel=1e-4)
    plain = recipe.statistics(prepared, climatology=False)
    assert not plain.input_climatology
    assert plain.mean["tas"] == pytest.approx(float(coarse.isel(time=slice(0, 24)).mean()))


def test_pooled_statistics_weigh_each_set_by_its_time_steps():
    a, b = np.arange(10.0), 5 + 2 * np.arange(30.0)
    mean, std = recipe.pooled(
        [({"v": a.mean()}, {"v": a.std()}, 10), ({"v": b.mean()}, {"v": b.std()}, 30)]
    )
    both = np.concatenate([a, b])
    assert mean["v"] == pytest.approx(both.mean()) and std["v"] == pytest.approx(both.std())


def test_arrays_window_model_and_crops_line_up(pair):
    prepared = prepared_pair(pair)
    stats = recipe.statistics(prepared)
    sets = recipe.paired_arrays(prepared, stats)
    assert sets[0].coarse.shape == (30, 1, 8, 8) and sets[0].fine.shape == (30, 1, 32, 32)
    assert recipe.training_window(sets, None, prepared.config) == (8, 8)
    assert recipe.training_window(sets, (4, 20), prepared.config) == (4, 8)  # at most the grid
    dsr = recipe.build_downscaler(prepared, stats, (8, 8), seed=3)
    assert dsr.config.linear_window == (8, 8) and dsr.config.linear_half is None
    assert dsr.constraints == {"tas": "additive"}  # a cell average: constrained
    assert dsr.grid["window"] == [8, 8] and dsr.grid["cell_average"] == {"tas": True}
    again = recipe.build_downscaler(prepared, stats, (8, 8), seed=3)
    for k, v in dsr.model.state_dict().items():
        torch.testing.assert_close(v, again.model.state_dict()[k])  # seeded
    off = recipe.build_downscaler(prepared, stats, (8, 8), linear_path=False)
    assert off.config.linear_window is None
    opts = TrainOptions()
    parts = recipe.plan_crops(sets, prepared, stats, (4, 4), opts)
    # 4 crops of 4 x 4 tile the 8 x 8 grid; amplitude augmentation (anomalies): at least 4
    assert len(parts[0]) == 30 * 4 and parts[0].scale == tuple(opts.augment_scale)
    none = recipe.plan_crops(sets, prepared, stats, (8, 8), opts.replace(augment="none"))
    assert len(none[0]) == 30 and none[0].scale is None
    with pytest.raises(ValueError, match="augment must be"):
        recipe.plan_crops(sets, prepared, stats, (8, 8), opts.replace(augment="flip"))


def test_resume_state_refuses_another_architecture(pair, tmp_path):
    coarse, fine = pair
    dsr = xorbit.train(
        coarse, fine, small_config(), epochs=1, progress=False, checkpoint_dir=tmp_path, seed=0
    )
    state = recipe.resume_state(True, tmp_path, dsr.config)
    assert state is not None and state["epoch"] == 1
    assert recipe.resume_state(None, tmp_path, dsr.config) is None
    with pytest.raises(ValueError, match=r"another model architecture \(differs in \['depth'\]"):
        recipe.resume_state(tmp_path, None, dsr.config.replace(depth=2))
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        recipe.resume_state(True, None, small_config())


def test_the_steps_called_one_by_one_are_train(pair):
    coarse, fine = pair
    cfg = small_config()
    whole = xorbit.train(coarse, fine, cfg, epochs=2, progress=False, device="cpu", seed=1)
    prepared = recipe.prepare_pairs([(coarse, fine)], cfg)
    stats = recipe.statistics(prepared)
    sets = recipe.paired_arrays(prepared, stats)
    window = recipe.training_window(sets, None, prepared.config)
    dsr = recipe.build_downscaler(prepared, stats, window, seed=1)
    opts = TrainOptions.for_config(cfg).replace(epochs=2, seed=1, progress=False)
    parts = recipe.plan_crops(sets, prepared, stats, window, opts, seed=1)
    dsr.history = recipe.run_training(dsr, parts, sets, prepared, opts)
    for k, v in whole.model.state_dict().items():
        torch.testing.assert_close(v, dsr.model.state_dict()[k])


def _code_lines(node: ast.FunctionDef) -> int:
    """Lines of a function without its docstring."""
    n = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        n -= first.end_lineno - first.lineno + 1
    return n


def test_no_function_in_the_trainer_is_longer_than_a_screen():
    root = pathlib.Path(xorbit.training.__file__).parent
    long = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and _code_lines(node) > 80:
                long.append(f"{path.name}:{node.name} ({_code_lines(node)} lines)")
    assert not long
