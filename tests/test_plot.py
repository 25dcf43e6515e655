"""Figures: the evaluation report and the older single-purpose plots (Agg backend)."""

import matplotlib

matplotlib.use("Agg")

import dask.array as da
import matplotlib.pyplot as plt
import numpy as np
import pytest

from xorbit import coarsen
from xorbit.datasets import hadcm3_air_temperature
from xorbit.metrics import power_spectra
from xorbit.plot import compare_maps, report, spectra, training_curves

QUANTILES = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1]
QUANTILES += [0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999]


@pytest.fixture(scope="module")
def fields():
    """HadCM3 (360-day calendar, 30 years) as truth, two baselines, the coarse input."""
    truth = hadcm3_air_temperature().isel(time=slice(0, 30)).load()
    coarse = coarsen(truth, 4)
    predictions = {
        "bicubic": coarse.orbit.interpolate(4, "bicubic"),
        # lazy on purpose: the report computes it without loading it in place
        "nearest": coarse.orbit.interpolate(4, "nearest").chunk(time=10),
    }
    return truth, predictions, coarse


@pytest.fixture(scope="module")
def figure(fields):
    truth, predictions, coarse = fields
    fig = report(truth, predictions, coarse=coarse)
    yield fig
    plt.close(fig)


def by_title(fig, title):
    (ax,) = [a for a in fig.axes if a.get_title() == title]
    return ax


def test_report_has_a_panel_per_method_and_field(figure, fields):
    _, predictions, _ = fields
    titles = [a.get_title() for a in figure.axes]
    # 2 error maps + colour bar, 4 trend maps (truth, 2 methods, coarse) + colour
    # bar, spectra, QQ
    assert len(figure.axes) == 2 + 1 + 4 + 1 + 2
    for name in predictions:
        assert f"{name} − truth (time mean)" in titles
        assert f"{name} trend" in titles
    assert "truth trend" in titles and "coarse trend" in titles
    spec_labels = [line.get_label() for line in by_title(figure, "power spectra").lines]
    assert spec_labels == ["truth", "bicubic", "nearest", "coarse"]
    assert isinstance(predictions["nearest"].data, da.Array)  # the caller's object stays lazy


def test_report_qq_panel_plots_numpy_quantiles(figure, fields):
    truth, predictions, _ = fields
    ax = by_title(figure, "extremes: quantiles 0.001–0.1 and 0.9–0.999")
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"bicubic", "nearest", "1:1"}
    want_truth = np.quantile(truth.values, QUANTILES)
    for name, pred in predictions.items():
        np.testing.assert_allclose(lines[name].get_xdata(), want_truth, rtol=1e-6)
        np.testing.assert_allclose(
            lines[name].get_ydata(), np.quantile(pred.values, QUANTILES), rtol=1e-6
        )
    one = lines["1:1"]
    np.testing.assert_array_equal(one.get_xdata(), one.get_ydata())


def test_report_maps_are_mean_errors_and_trends_per_decade(figure, fields):
    truth, predictions, _ = fields
    err = (predictions["bicubic"].values - truth.values).mean(0)
    mesh = by_title(figure, "bicubic − truth (time mean)").collections[0]
    np.testing.assert_allclose(mesh.get_array().reshape(err.shape), err, rtol=1e-5, atol=1e-5)
    lim = mesh.get_clim()
    assert lim[0] == -lim[1]  # diverging, centred on zero
    other = by_title(figure, "nearest − truth (time mean)").collections[0]
    assert other.get_clim() == lim  # one scale for every method
    # the trend against the years of the 360-day calendar, times ten
    years = truth.time.dt.year.values + 150 / 360
    slope = np.polyfit(years, truth.values.reshape(len(years), -1), 1)[0]
    mesh = by_title(figure, "truth trend").collections[0]
    np.testing.assert_allclose(mesh.get_array().ravel(), 10 * slope, rtol=1e-4, atol=1e-6)


def test_report_refuses_a_method_off_the_truth_grid(fields):
    truth, predictions, _ = fields
    shifted = predictions["bicubic"].assign_coords(latitude=predictions["bicubic"].latitude + 1)
    with pytest.raises(
        ValueError, match="method 'shifted' and the truth differ in their 'latitude'"
    ):
        report(truth, {"shifted": shifted})
    with pytest.raises(ValueError, match="'truth'"):
        report(truth, {"truth": truth})
    with pytest.raises(ValueError, match="no time dimension 'year'"):
        report(truth, predictions, time_dim="year")


def test_report_takes_datasets_and_a_variable(fields):
    truth, predictions, _ = fields
    ds = {k: v.to_dataset(name="tas").assign(other=v) for k, v in predictions.items()}
    fig = report(truth.to_dataset(name="tas"), ds, variable="tas")
    assert len(fig.axes) == 2 + 1 + 3 + 1 + 2  # no coarse: one trend map fewer
    plt.close(fig)
    with pytest.raises(ValueError, match="pass variable="):
        report(truth, ds)


def test_the_single_purpose_plots_still_draw(fields):
    truth, predictions, _ = fields
    t0 = truth.isel(time=0)
    b0 = predictions["bicubic"].isel(time=0)
    figs = [
        compare_maps({"bicubic": b0, "truth": t0}, error_of="bicubic"),
        spectra(power_spectra(truth=truth, bicubic=predictions["bicubic"])),
        training_curves([{"epoch": 1, "loss": 1.0, "rmse_model": 2.0}]),
    ]
    assert [len(f.axes) for f in figs] == [5, 1, 2]  # compare_maps: 3 panels + 2 colour bars
    assert [line.get_label() for line in figs[1].axes[0].lines] == ["truth", "bicubic"]
    for f in figs:
        plt.close(f)


def test_training_curves_mark_the_kept_epoch():
    history = [
        {"epoch": e, "loss": 1.0 / e, "rmse_tas": r, "rmse_bicubic_tas": 1.0, "best_epoch": b}
        for e, r, b in ((1, 0.9, 1), (2, 0.5, 2), (3, 0.7, 2))
    ]
    fig = training_curves(history)
    marks = [ln for ln in fig.axes[1].lines if ln.get_label().startswith("best epoch")]
    assert len(marks) == 1 and marks[0].get_label() == "best epoch (2)"
    assert list(marks[0].get_xdata()) == [2, 2]
    plt.close(fig)


def test_plotting_never_changes_the_users_backend():
    """`xorbit.plot` switched matplotlib to Agg, silencing `plt.show()` afterwards."""
    plt.close("all")
    matplotlib.use("svg")  # stands in for a user's interactive backend
    try:
        field = coarsen(hadcm3_air_temperature().isel(time=0), 4)
        fig = compare_maps({"truth": field, "same": field}, error_of="same")
        assert matplotlib.get_backend() == "svg"
        assert plt.fignum_exists(fig.number)  # a pyplot figure: plt.show() shows it
    finally:
        plt.close("all")
        matplotlib.use("Agg")
