"""Training throughput: one process vs. DDP over Dask workers, with and without a thread limit.

Run: ``.venv/bin/python benchmarks/bench_train_throughput.py [--quick] [--threads-only]``

Trains the HadCM3 demo model (``xorbit demo``'s config, 9 x 12 -> 36 x 48) for a
few epochs in several ways and prints samples and epochs per second of the
training loop (validation switched off), after a one-epoch warm-up in each mode.
On a 2-core machine two workers share the cores, so the interesting numbers are
the DDP overhead and the cost of oversubscription, not a speed-up.

The last two modes start workers whose torch may use every core (as where
nothing sets ``OMP_NUM_THREADS=1`` for the workers), then train with each rank
held to its worker's share of the host's cores (the default) or left at every
core (``threads=`` the core count: the behaviour before the limit).
``--threads-only`` runs just those two; ``--repeat`` alternates them.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from _cpu import CpuShare

SAMPLES = 160


def problem():
    from xorbit import ReslimConfig, coarsen
    from xorbit.datasets import hadcm3_air_temperature

    fine = hadcm3_air_temperature().isel(time=slice(0, SAMPLES))
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
    return coarse, fine, cfg


def timed(epochs: int, **kw) -> float:
    """Seconds of a ``train`` call of ``epochs``, after a one-epoch warm-up."""
    from xorbit.training import train

    coarse, fine, cfg = problem()
    kw = dict(batch_size=16, val_fraction=0.0, progress=False, device="cpu", **kw)
    train(coarse, fine, cfg, epochs=1, **kw)  # imports, process group, caches
    t0 = time.perf_counter()
    train(coarse, fine, cfg, epochs=epochs, **kw)
    return time.perf_counter() - t0


def run(mode: str, epochs: int) -> float:
    """Seconds for ``epochs`` epochs in ``mode``."""
    cores = os.cpu_count() or 1
    if mode == "local":
        return timed(epochs)
    from distributed import Client, LocalCluster

    n, worker_threads, limit = {
        "ddp-1": (1, cores, None),
        "ddp-2": (2, cores // 2, None),
        "ddp-2-nolimit": (2, cores, cores),
        "ddp-2-limit": (2, cores, None),
    }[mode]
    with (
        LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            env={"OMP_NUM_THREADS": str(worker_threads)},
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(torch.set_num_threads, worker_threads)
        return timed(epochs, client=client, **({"threads": limit} if limit else {}))


MODES = {
    "local": "one process (all cores)",
    "ddp-1": "DDP, 1 worker x 1 thread",
    "ddp-2": "DDP, 2 workers x 1 thread, OMP=1",
    "ddp-2-nolimit": "DDP, 2 workers x 1 thread, no limit",
    "ddp-2-limit": "DDP, 2 workers x 1 thread, share",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads-only", action="store_true")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    epochs = 2 if args.quick else 10
    modes = ["ddp-2-nolimit", "ddp-2-limit"] if args.threads_only else list(MODES)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
        f"{epochs} epochs of {SAMPLES} samples (9x12 -> 36x48), batch 16"
    )
    print(f"{'mode':<38}{'samples/s':>10}{'epochs/s':>10}{'others CPU':>12}")
    for _ in range(args.repeat):
        for mode in modes:
            cpu = CpuShare()
            seconds = run(mode, epochs)
            print(
                f"{MODES[mode]:<38}{SAMPLES * epochs / seconds:>10.1f}{epochs / seconds:>10.2f}"
                f"{cpu.others():>12.0%}",
                flush=True,
            )


if __name__ == "__main__":
    main()
