"""Training throughput (samples/s): one process vs. DDP over 1 and 2 Dask workers.

Run: ``.venv/bin/python benchmarks/bench_train_throughput.py [--quick]``

Trains the HadCM3 demo model (``xorbit demo``'s config, 9 x 12 -> 36 x 48) for a
few epochs in three ways and prints samples per second of the training loop
(validation switched off).  On a 2-core machine two workers share the cores, so
the interesting number is the DDP overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import time

import torch


def run(mode: str, epochs: int) -> float:
    from xorbit import ReslimConfig, coarsen
    from xorbit.datasets import hadcm3_air_temperature
    from xorbit.training import train

    fine = hadcm3_air_temperature().isel(time=slice(0, 160))
    coarse = coarsen(fine, 4)
    statics = ["coord_latitude", "coord_sinlon", "coord_coslon"]
    cfg = ReslimConfig.preset(
        "tiny",
        in_vars=["air_temperature", *statics],
        out_vars=["air_temperature"],
        static_vars=statics,
        img_size=(9, 12),
        learn_pos_embed=True,
        drop_path=0.0,
        drop_rate=0.0,
    )
    kw = dict(epochs=epochs, batch_size=16, val_fraction=0.0, progress=False, device="cpu")
    if mode == "local":
        train(coarse, fine, cfg, **{**kw, "epochs": 1})  # warm-up, as for the workers
        t0 = time.perf_counter()
        train(coarse, fine, cfg, **kw)
        return 160 * epochs / (time.perf_counter() - t0)
    from distributed import Client, LocalCluster

    n = 1 if mode == "ddp-1" else 2
    threads = 2 // n
    with (
        LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            env={"OMP_NUM_THREADS": str(threads)},
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(torch.set_num_threads, threads)
        train(
            coarse,
            fine,
            cfg,
            client=client,
            epochs=1,
            batch_size=16,
            val_fraction=0.0,
            progress=False,
            device="cpu",
        )  # warm-up: imports and process group
        t0 = time.perf_counter()
        train(coarse, fine, cfg, client=client, **kw)
        return 160 * epochs / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    epochs = 2 if args.quick else 10
    torch.set_num_threads(2)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {epochs} epochs of "
        "160 samples (9x12 -> 36x48), batch 16"
    )
    print(f"{'mode':<34}{'samples/s':>10}")
    for mode, label in (
        ("local", "one process (2 threads)"),
        ("ddp-1", "DDP, 1 Dask worker (2 threads)"),
        ("ddp-2", "DDP, 2 Dask workers (1 thread each)"),
    ):
        print(f"{label:<34}{run(mode, epochs):>10.1f}", flush=True)


if __name__ == "__main__":
    main()
