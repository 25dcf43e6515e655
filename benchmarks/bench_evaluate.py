"""Wall time of `xorbit.evaluate` on a small Dask input: lazy graphs against one load.

Run: ``.venv/bin/python benchmarks/bench_evaluate.py``

The demo's held-out years (59 x 36 x 48, HadCM3 cell-averaged x4 and
interpolated back with bicubic and nearest) as two Dask-chunked methods against
the truth.  Prints, per path, the first call (imports included) and the best
of the next three, each the build plus the ``.compute()``:

- ``lazy``: every score as a Dask graph (`SMALL_INPUT_BYTES` set to 0, as for
  inputs larger than it);
- ``small``: the default for inputs under `SMALL_INPUT_BYTES`: one
  ``dask.compute`` of every input, then scores in memory.
"""

from __future__ import annotations

import time
import warnings

import xorbit
import xorbit.metrics
from xorbit.datasets import hadcm3_air_temperature


def timed(methods, truth) -> float:
    start = time.perf_counter()
    xorbit.evaluate(methods, truth).compute()
    return time.perf_counter() - start


def main() -> None:
    warnings.simplefilter("ignore")
    fine = hadcm3_air_temperature().isel(latitude=slice(0, 36), longitude=slice(0, 48)).load()
    held = xorbit.coarsen(fine, 4).isel(time=slice(181, None))
    truth = fine.isel(time=slice(181, None))
    methods = {m: held.orbit.interpolate(4, m).chunk(time=10) for m in ("bicubic", "nearest")}
    small = xorbit.metrics.SMALL_INPUT_BYTES
    print(f"{'path':8s}{'first call s':>14s}{'warm s':>10s}")
    for path, limit in (("lazy", 0), ("small", small)):
        xorbit.metrics.SMALL_INPUT_BYTES = limit
        first = timed(methods, truth)
        warm = min(timed(methods, truth) for _ in range(3))
        print(f"{path:8s}{first:14.2f}{warm:10.2f}")
    xorbit.metrics.SMALL_INPUT_BYTES = small


if __name__ == "__main__":
    main()
