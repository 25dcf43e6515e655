"""Train a Reslim downscaler with one torch DDP rank per Dask worker.

Run: ``.venv/bin/python examples/train_on_dask.py``  (about a minute on 2 cores)

The same call scales out by swapping the cluster: ``dask_cuda.LocalCUDACluster()``
on a multi-GPU box (and ``device="cuda"``), or ``dask_jobqueue.SLURMCluster`` on an
HPC system (``cluster.scale(jobs=N)``).  See docs/training.md.
"""

from distributed import Client, LocalCluster

import xorbit
from xorbit import coarsen
from xorbit.datasets import hadcm3_air_temperature


def main() -> None:
    fine = hadcm3_air_temperature()
    coarse = coarsen(fine, 4)
    early = fine.time.dt.year <= 2040
    statics = ["coord_latitude", "coord_sinlon", "coord_coslon"]
    cfg = xorbit.ReslimConfig.preset(
        "tiny",
        factor=4,
        in_vars=["air_temperature", *statics],
        out_vars=["air_temperature"],
        static_vars=statics,
        img_size=(9, 12),
        learn_pos_embed=True,
        interp_skip="bicubic",
        drop_path=0.0,
        drop_rate=0.0,
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
            epochs=60,
            batch_size=8,  # global: 4 per rank
            lr=3e-3,
            tv_lambda=0.001,
            client=client,
            checkpoint_dir="dask-run",
            device="cpu",
            tile=(9, 12),
            halo=(0, 0),
        )
    last = dsr.history[-1]
    print(
        f"epoch {last['epoch']}: validation RMSE {last['rmse_air_temperature']:.3f} K "
        f"(bicubic {last['rmse_bicubic_air_temperature']:.3f} K)"
    )
    dsr.save("dask-run/hadcm3_x4.xorbit")
    print("wrote dask-run/hadcm3_x4.xorbit")


if __name__ == "__main__":
    main()
