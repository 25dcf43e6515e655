"""Real climate-model output shipped inside a PyPI package (nothing is downloaded).

The ``iris-sample-data`` wheel carries HadCM3 annual-mean near-surface air
temperature over North America, 1860-2099, SRES A1B (240 x 37 x 49 on a
1.25° x 1.875° grid, 360-day calendar).  It is xorbit's demo and test field.
"""

from __future__ import annotations

import os
from pathlib import Path

import xarray as xr

__all__ = ["hadcm3_air_temperature", "sample_data_path"]


def sample_data_path(name: str = "A1B_north_america.nc") -> Path:
    """Path of a file inside the installed ``iris-sample-data`` package.

    Raises
    ------
    ImportError
        If the package is not installed (``pip install iris-sample-data``).
    FileNotFoundError
        If the package does not hold ``name``.
    """
    try:
        import iris_sample_data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the sample data need the 'iris-sample-data' package: pip install iris-sample-data"
        ) from err
    path = Path(os.path.dirname(iris_sample_data.__file__)) / "sample_data" / name
    if not path.exists():
        raise FileNotFoundError(f"iris-sample-data has no file {name!r} (looked at {path})")
    return path


def hadcm3_air_temperature(crop: bool = True, chunks: dict | None = None) -> xr.DataArray:
    """HadCM3 A1B annual-mean air temperature (K) as a CF-decoded DataArray.

    Parameters
    ----------
    crop
        Drop the last latitude and longitude so that the grid is 36 x 48, a
        multiple of 4 (and of 2, 3, 6, 12): coarsening by those factors is then
        exact.
    chunks
        Passed to ``xarray.open_dataset`` for a Dask-backed result.

    Returns
    -------
    DataArray ``air_temperature (time, latitude, longitude)`` with cftime
    ``Datetime360Day`` times; the file's ``grid_mapping`` variable is kept as a
    scalar coordinate so that writers can carry it through.
    """
    ds = xr.open_dataset(
        sample_data_path(),
        decode_times=xr.coders.CFDatetimeCoder(use_cftime=True),
        chunks=chunks,
    )
    da = ds["air_temperature"]
    da = da.assign_coords(latitude_longitude=ds["latitude_longitude"])
    da = da.drop_vars(["forecast_period", "forecast_reference_time"], errors="ignore")
    if crop:
        da = da.isel(latitude=slice(0, 36), longitude=slice(0, 48))
    return da
