"""Train a Reslim downscaler with one torch DDP rank per Dask worker.

Run: ``.venv/bin/python examples/train_on_dask.py``  (about a minute on 2 cores)

The same call scales out by swapping the cluster: ``dask_cuda.LocalCUDACluster()``
on a multi-GPU box (and ``device="cuda"``), or ``dask_jobqueue.SLURMCluster`` on an
HPC system (``cluster.scale(jobs=N)``).  Recipes: docs/cluster.md.
"""

from distributed import Client, LocalCluster

import xorbit
from xorbit import coarsen
from xorbit.datasets import hadcm3_air_temperature


def main() -> None:
    fine = hadcm3_air_temperature()
    coarse = coarsen(fine, 4)
    early = fine.time.dt.year <= 2040
    # the default recipe; only the number of epochs is chosen
    cfg = xorbit.ReslimConfig.preset(
        "tiny", factor=4, in_vars=["air_temperature"], out_vars=["air_temperature"]
    )
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        print(client)
        dsr = xorbit.train(
            coarse.sel(time=early),
            fine.sel(time=early),
            cfg,
            epochs=40,  # global batch 8 (the tiny default): 4 per rank
            client=client,
            checkpoint_dir="dask-run",
            device="cpu",
        )
        test = coarse.sel(time=~early)
        pred = test.orbit.downscale(dsr)
    truth = xorbit.grid.match_grid(fine.sel(time=~early), pred)
    rmse = float(((pred - truth) ** 2).mean() ** 0.5)
    print(f"{len(dsr.history)} epochs; held-out 2041-2099 RMSE {rmse:.3f} K")
    dsr.save("dask-run/hadcm3_x4.xorbit")
    print("wrote dask-run/hadcm3_x4.xorbit")


if __name__ == "__main__":
    main()
