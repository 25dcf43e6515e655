"""Units: inputs converted to the model's units, clear errors otherwise."""

import numpy as np
import pytest

from tests.datasets import powerlaw_field
from tests.test_accessor import coarse_field, make_downscaler
from xorbit.units import UnitsError, convert


@pytest.fixture(scope="module")
def dsr():
    return make_downscaler()  # trained on "K"


@pytest.fixture(scope="module")
def kelvin():
    return coarse_field(280 + 10 * powerlaw_field((2, 8, 12), seed=3))


def test_celsius_input_gives_the_kelvin_answer_in_celsius(dsr, kelvin):
    """The model runs in its units; the result comes back in the input's."""
    ref = kelvin.orbit.downscale(dsr, tile=4, halo=2, device="cpu")
    assert ref.attrs["units"] == "K"
    celsius = (kelvin - 273.15).assign_attrs(kelvin.attrs, units="degC").chunk(lat=4)
    out = celsius.orbit.downscale(dsr, tile=4, halo=2, device="cpu")
    assert out.attrs["units"] == "degC"
    np.testing.assert_allclose(out.values, ref.values - 273.15, atol=2e-3)
    # a units= override is what the input is in, so the answer is in it too
    bare = (kelvin - 273.15).assign_attrs(units="nonsense")
    out = bare.orbit.downscale(dsr, tile=4, halo=2, device="cpu", units={"tas": "degC"})
    assert out.attrs["units"] == "degC"
    np.testing.assert_allclose(out.values, ref.values - 273.15, atol=2e-3)


def test_missing_and_overridden_units(dsr, kelvin):
    bare = kelvin.copy()
    bare.attrs = {}
    with pytest.raises(UnitsError, match="'tas' has no units attribute but the model expects"):
        bare.orbit.downscale(dsr, device="cpu")
    out = bare.orbit.downscale(dsr, tile=4, halo=2, device="cpu", units={"tas": "K"})
    ref = kelvin.orbit.downscale(dsr, tile=4, halo=2, device="cpu")
    np.testing.assert_allclose(out.values, ref.values, rtol=0, atol=0)
    with pytest.raises(UnitsError, match="cannot understand units 'kelvinish'"):
        kelvin.assign_attrs(units="kelvinish").orbit.downscale(dsr, device="cpu")


def test_precipitation_flux_and_depth_rates():
    pr = coarse_field(np.full((1, 2, 2), 1.0 / 86400)).assign_attrs(units="kg m-2 s-1")
    out = convert(pr, "mm/day")
    np.testing.assert_allclose(out.values, 1.0)
    assert out.attrs["units"] == "mm/day"
    back = convert(out, "kg m-2 s-1")
    np.testing.assert_allclose(back.values, 1.0 / 86400)
    with pytest.raises(UnitsError, match="'tas' is in 'K', which cannot be converted"):
        convert(coarse_field(np.ones((1, 2, 2))), "mm/day")


def test_conversion_survives_xsdba_changing_the_shared_registry(kelvin):
    """xsdba (the qdm baseline) switches pint's application registry to
    force_ndarray_like=False on import; pint-xarray then refused every conversion."""
    import pint

    registry = pint.get_application_registry()
    before = registry.force_ndarray_like
    registry.force_ndarray_like = False  # what `import xsdba` does
    try:
        celsius = (kelvin - 273.15).assign_attrs(units="degC").chunk(lat=4)
        back = convert(celsius, "K")
        assert back.attrs["units"] == "K" and back.dtype == np.float32
        np.testing.assert_allclose(back.values, kelvin.values, rtol=0, atol=1e-4)
    finally:
        registry.force_ndarray_like = before
