"""Compression ratio and write throughput of the demo's output, lossless and keepbits.

Run: ``.venv/bin/python benchmarks/bench_io.py [--quick]``

Writes the HadCM3 fine field (the demo's output grid, 240 x 36 x 48 float32,
tiled 8x in time to get past per-file overheads) with ``xorbit.io.to_netcdf``
(zlib level 4 + shuffle) and ``xorbit.io.to_zarr`` (zstd level 3), lossless and
with ``keepbits`` 12 and 7; prints size, ratio to the raw bytes, write MB/s
(raw bytes over wall time, best of 3) and the largest relative error read back.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

from xorbit.datasets import hadcm3_air_temperature
from xorbit.io import to_netcdf, to_zarr


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    field = hadcm3_air_temperature().load()
    reps = 1 if args.quick else 8
    if reps > 1:
        field = xr.concat([field] * reps, dim="time")
        field = field.assign_coords(time=np.arange(field.sizes["time"]))
        field["time"].attrs = {"units": "days since 1860-01-01", "calendar": "360_day"}
    field = field.chunk(time=60)
    raw = field.size * 4
    print(f"field {field.shape} float32 = {raw / 1e6:.1f} MB raw; best of 3 writes")
    print(f"{'format':<8}{'keepbits':>9}{'MB':>8}{'ratio':>7}{'MB/s':>8}{'max rel err':>13}")
    tmp = Path(tempfile.mkdtemp())
    try:
        for fmt in ("netcdf", "zarr"):
            for keepbits in (None, 12, 7):
                best = np.inf
                for i in range(3):
                    path = tmp / f"out{i}.{'nc' if fmt == 'netcdf' else 'zarr'}"
                    t0 = time.perf_counter()
                    if fmt == "netcdf":
                        to_netcdf(field, path, keepbits=keepbits)
                    else:
                        to_zarr(field, path, keepbits=keepbits)
                    best = min(best, time.perf_counter() - t0)
                if fmt == "netcdf":
                    back = xr.open_dataset(path, decode_times=False)
                else:
                    back = xr.open_zarr(path, decode_times=False, consolidated=False)
                got = back["air_temperature"].values
                err = float(np.max(np.abs(got - field.values) / np.abs(field.values)))
                nbytes = size_of(path)
                kb = "-" if keepbits is None else str(keepbits)
                print(
                    f"{fmt:<8}{kb:>9}{nbytes / 1e6:>8.2f}{raw / nbytes:>7.2f}"
                    f"{raw / 1e6 / best:>8.1f}{err:>13.2e}"
                )
                for i in range(3):
                    p = tmp / f"out{i}.{'nc' if fmt == 'netcdf' else 'zarr'}"
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
