"""Smoke test of the installed wheel, run from outside the source tree.

Catches modules or package data that the wheel leaves out: the package must be
imported from where the wheel was installed, train a tiny model, downscale
lazily, write CF netCDF and read the model back.
"""

import os
import sys
import tempfile

import numpy as np
import xarray as xr

import xorbit

site = os.environ["XORBIT_WHEEL_SITE"]
assert os.path.realpath(xorbit.__file__).startswith(os.path.realpath(site)), (
    f"xorbit was imported from {xorbit.__file__}, not from the wheel in {site}"
)
print(f"xorbit {xorbit.__version__} from {os.path.dirname(xorbit.__file__)}")

rng = np.random.default_rng(0)
fine = xr.DataArray(
    (280 + rng.standard_normal((6, 16, 16))).astype(np.float32),
    dims=("time", "lat", "lon"),
    coords={
        "time": np.arange(6),
        "lat": ("lat", 30 + 0.5 * np.arange(16), {"units": "degrees_north"}),
        "lon": ("lon", 250 + 0.5 * np.arange(16), {"units": "degrees_east"}),
    },
    name="tas",
    attrs={"units": "K", "standard_name": "air_temperature"},
)
coarse = xorbit.coarsen(fine, 4)
cfg = xorbit.ReslimConfig.preset("tiny", factor=4, in_vars=["tas"], out_vars=["tas"])
dsr = xorbit.train(coarse, fine, cfg, epochs=1, batch_size=4, progress=False, device="cpu")
out = coarse.chunk(time=3).orbit.downscale(dsr)
assert out.chunks is not None and out.shape == fine.shape, out
with tempfile.TemporaryDirectory() as tmp:
    path = out.orbit.to_netcdf(os.path.join(tmp, "tas.nc"))
    back = xr.open_dataset(path)
    assert back["tas"].shape == fine.shape and np.isfinite(back["tas"].values).all()
    again = xorbit.load(dsr.save(os.path.join(tmp, "m.xorbit")))
    np.testing.assert_array_equal(
        coarse.orbit.downscale(again).values, coarse.orbit.downscale(dsr).values
    )
print("wheel smoke test passed")
sys.exit(0)
