"""Real data shipped inside PyPI packages (nothing is downloaded), and a benchmark built on them.

The ``iris-sample-data`` wheel carries HadCM3 annual-mean near-surface air
temperature over North America, 1860-2099, under SRES A1B and E1 (240 x 37 x
49 on a 1.25° x 1.875° grid, 360-day calendar): xorbit's demo and test field.
matplotlib's sample data hold a real terrain (``topobathy.npz``), over which
`orographic_precipitation` makes rain with the linear theory of Smith and
Barstow (2004): the benchmark where the coarse-to-fine relation is nonlinear.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xarray as xr

__all__ = [
    "SCENARIOS",
    "hadcm3_air_temperature",
    "linear_theory_precipitation",
    "orographic_precipitation",
    "sample_data_path",
    "terrain",
]


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


SCENARIOS = {"A1B": "A1B_north_america.nc", "E1": "E1_north_america.nc"}


def hadcm3_air_temperature(
    crop: bool = True, chunks: dict | None = None, scenario: str = "A1B"
) -> xr.DataArray:
    """HadCM3 annual-mean air temperature (K) over North America, as a CF-decoded DataArray.

    Parameters
    ----------
    scenario
        ``"A1B"`` (default, the demo's) or ``"E1"``: the same model and region
        under the SRES A1B and the ENSEMBLES E1 scenarios, 1860-2099 each (E1
        warms less: a held-out scenario inside the A1B climate).
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
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown HadCM3 scenario {scenario!r}; choose one of {sorted(SCENARIOS)}")
    ds = xr.open_dataset(
        sample_data_path(SCENARIOS[scenario]),
        decode_times=xr.coders.CFDatetimeCoder(use_cftime=True),
        chunks=chunks,
    )
    da = ds["air_temperature"]
    da = da.assign_coords(latitude_longitude=ds["latitude_longitude"])
    da = da.drop_vars(["forecast_period", "forecast_reference_time"], errors="ignore")
    if crop:
        da = da.isel(latitude=slice(0, 36), longitude=slice(0, 48))
    return da


# --------------------------------------------------------------------------- orographic rain
# Linear theory of orographic precipitation (Smith and Barstow 2004, J. Atmos.
# Sci. 61, 1377-1391), the constants of their section 2 and 5.
LT_MOIST_STABILITY = 0.005  # N_m, 1/s
LT_VAPOUR_SCALE_HEIGHT = 2500.0  # H_w, m
LT_CONVERSION_TIME = 1000.0  # tau_c, s
LT_FALLOUT_TIME = 1000.0  # tau_f, s
KG_M2_S_TO_MM_DAY = 86400.0


def terrain() -> xr.DataArray:
    """A real terrain: matplotlib's sample ``topobathy.npz`` (coast and mountains near 48 °N, 126 °W).

    91 x 120 points, 1/45 by 1/30 of a degree (about 2.5 km), cropped to 88 x 120
    (a multiple of 4), heights in m with the sea (bathymetry) at 0.
    """
    from matplotlib import cbook

    with np.load(cbook.get_sample_data("topobathy.npz", asfileobj=False)) as data:
        topo = np.asarray(data["topo"], np.float64)
        lat = np.asarray(data["latitude"], np.float64)
        lon = np.asarray(data["longitude"], np.float64)
    ny = topo.shape[0] // 4 * 4
    return xr.DataArray(
        np.maximum(topo[:ny], 0.0).astype(np.float32),
        dims=("lat", "lon"),
        coords={
            "lat": ("lat", lat[:ny], {"standard_name": "latitude", "units": "degrees_north"}),
            "lon": ("lon", lon, {"standard_name": "longitude", "units": "degrees_east"}),
        },
        name="orog",
        attrs={"standard_name": "surface_altitude", "units": "m"},
    )


def linear_theory_precipitation(
    height: np.ndarray, dx: float, dy: float, u: float, v: float, cw: float
) -> np.ndarray:
    """Orographic precipitation (kg m-2 s-1, before truncation) of Smith and Barstow (2004).

    ``P̂ = C_w i σ ĥ / ((1 - i m H_w)(1 + i σ τ_c)(1 + i σ τ_f))`` in Fourier
    space, with the intrinsic frequency ``σ = u k + v l`` and the vertical
    wavenumber ``m`` of the moist-stable flow (propagating where ``σ² < N_m²``,
    with the sign of ``σ``; evanescent elsewhere).  The terrain (``height [ny,
    nx]`` in m on a grid of ``dx``, ``dy`` m) is padded with a cosine ramp to
    zero on every side, so the periodic transform sees an island.
    """
    ny, nx = height.shape
    pad = max(ny, nx) // 2
    padded = np.pad(height, pad, mode="linear_ramp", end_values=0.0)
    k = 2 * np.pi * np.fft.fftfreq(padded.shape[1], dx)[None, :]
    l = 2 * np.pi * np.fft.fftfreq(padded.shape[0], dy)[:, None]  # noqa: E741
    sigma = u * k + v * l
    k2 = k**2 + l**2
    n2 = LT_MOIST_STABILITY**2
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (n2 - sigma**2) / sigma**2 * k2
        m = np.where(
            ratio >= 0, np.sign(sigma) * np.sqrt(np.abs(ratio)), 1j * np.sqrt(np.abs(ratio))
        )
    m = np.where(sigma == 0, 0.0, m)
    h_hat = np.fft.fft2(padded)
    p_hat = (
        cw
        * 1j
        * sigma
        * h_hat
        / (
            (1 - 1j * m * LT_VAPOUR_SCALE_HEIGHT)
            * (1 + 1j * sigma * LT_CONVERSION_TIME)
            * (1 + 1j * sigma * LT_FALLOUT_TIME)
        )
    )
    return np.real(np.fft.ifft2(p_hat))[pad : pad + ny, pad : pad + nx]


def orographic_precipitation(
    n_samples: int = 350, seed: int = 0, factor: int = 4
) -> tuple[xr.Dataset, xr.Dataset, xr.DataArray]:
    """Rain from a uniform wind over a real terrain, at 2.5 km and ``factor`` times coarser.

    Each sample (one ``time`` step, a day) has its own wind, drawn with speed
    5-20 m/s from any direction, and its own moisture (``C_w`` 1-6 g m-3);
    its fine precipitation is `linear_theory_precipitation` over `terrain`
    plus a background of 0-3 mm/day, truncated at zero.  A benchmark where the
    relation between the coarse and the fine rain depends on the wind
    (upslope wet, lee dry), not linearly on the coarse rain.

    Returns
    -------
    coarse : xarray.Dataset
        ``pr`` (mm/day, the cell averages of the fine rain), ``u`` and ``v``
        (m/s, uniform) on the coarse grid.
    fine : xarray.Dataset
        ``pr`` on the terrain's grid.
    orography : xarray.DataArray
        The terrain (m), a fine static field.
    """
    from .training.samples import coarsen

    orog = terrain()
    h = np.asarray(orog.values, np.float64)
    lat = orog.lat.values
    dy = float(np.median(np.diff(lat))) * 111_195.0
    dx = float(np.median(np.diff(orog.lon.values))) * 111_195.0 * np.cos(np.deg2rad(lat.mean()))
    rng = np.random.default_rng(seed)
    speed = rng.uniform(5.0, 20.0, n_samples)
    direction = rng.uniform(0.0, 2 * np.pi, n_samples)
    u, v = speed * np.cos(direction), speed * np.sin(direction)
    cw = rng.uniform(0.001, 0.006, n_samples)
    background = rng.uniform(0.0, 3.0, n_samples)
    rain = np.stack(
        [
            np.maximum(
                linear_theory_precipitation(h, dx, dy, u[i], v[i], cw[i]) * KG_M2_S_TO_MM_DAY
                + background[i],
                0.0,
            )
            for i in range(n_samples)
        ]
    ).astype(np.float32)
    time = np.datetime64("2000-01-01") + np.arange(n_samples).astype("timedelta64[D]")
    pr_attrs = {"standard_name": "lwe_precipitation_rate", "units": "mm/day"}
    fine = xr.Dataset(
        {"pr": (("time", "lat", "lon"), rain, pr_attrs)},
        coords={"time": time, "lat": orog.lat, "lon": orog.lon},
    )
    coarse = coarsen(fine, factor)
    shape = (n_samples, coarse.sizes["lat"], coarse.sizes["lon"])
    for name, values, std_name in (("u", u, "eastward_wind"), ("v", v, "northward_wind")):
        coarse[name] = (
            ("time", "lat", "lon"),
            np.broadcast_to(values[:, None, None], shape).astype(np.float32),
            {"standard_name": std_name, "units": "m s-1"},
        )
    return coarse, fine, orog
