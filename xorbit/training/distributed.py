"""Training on a Dask cluster: one torch DDP rank per Dask worker.

`fit_distributed` scatters the training arrays to every worker once, finds a
free port on rank 0's host, and runs `xorbit.training.loop.fit` on each worker as
rank ``i`` of a ``torch.distributed`` process group (gloo on CPU, NCCL on GPU),
wrapped in ``DistributedDataParallel``.  Ranks split each global batch, so the
result matches a single process on the same global batches.  Only rank 0
validates and writes checkpoints; it returns the weights.

A rank that raises makes the call raise that error as soon as it arrives; the
other ranks are abandoned (their collectives time out after ``timeout_s``).

The same code runs wherever Dask runs: a ``LocalCluster`` on a workstation, a
multi-GPU box (``LocalCUDACluster`` from dask-cuda, one worker per GPU), or an
HPC batch system through dask-jobqueue (``SLURMCluster(...).scale(jobs=N)``),
provided every worker can reach rank 0's host on the chosen TCP port.
"""

from __future__ import annotations

import datetime
import socket
import uuid
from typing import Any

import torch

from ..downscaler import Downscaler
from .loop import TrainOptions, fit
from .samples import PairedArrays, PairedCrops

__all__ = ["fit_distributed"]


def _free_port() -> tuple[str, int]:
    """A host address reachable by the other workers and a free TCP port on it."""
    host = socket.gethostbyname(socket.gethostname())
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return host, s.getsockname()[1]


def _rank_main(
    rank: int,
    world_size: int,
    address: str,
    port: int,
    dsr: Downscaler,
    train: PairedCrops,
    val: PairedArrays | None,
    opts: TrainOptions,
    resume: dict[str, Any] | None,
    timeout_s: float,
    stop_after: int | None = None,
):
    import torch.distributed as dist

    use_cuda = opts.device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
        opts.device = f"cuda:{torch.cuda.current_device()}"
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        if rank != 0:
            opts.checkpoint_dir = None
            opts.progress = False
            val = None

        def wrap(model: torch.nn.Module) -> torch.nn.Module:
            ids = [torch.cuda.current_device()] if use_cuda else None
            return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

        history = fit(
            dsr, train, val, opts, resume=resume, rank=rank, world_size=world_size, wrap=wrap
        )
    finally:
        dist.destroy_process_group()
    if rank == 0:
        state = {k: v.detach().cpu() for k, v in dsr.model.state_dict().items()}
        return history, state
    return None


def fit_distributed(
    client: Any,
    dsr: Downscaler,
    train: PairedCrops,
    val: PairedArrays | None,
    opts: TrainOptions,
    *,
    resume: dict[str, Any] | None = None,
    n_ranks: int | None = None,
    timeout_s: float = 300.0,
    stop_after: int | None = None,
) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """Run `fit` as DDP over the workers of a ``distributed.Client``.

    Returns rank 0's history and trained weights.

    Raises
    ------
    RuntimeError
        If the cluster has no worker.
    Exception
        The first error any rank raised, re-raised here.
    """
    from distributed import as_completed

    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    if n_ranks is not None:
        workers = workers[:n_ranks]
    if not workers:
        raise RuntimeError("the Dask cluster has no workers to train on")
    world = len(workers)
    run_id = uuid.uuid4().hex[:8]
    address, port = client.submit(_free_port, workers=[workers[0]], pure=False).result()
    shared = client.scatter([dsr, train, val], broadcast=True)
    futures = [
        client.submit(
            _rank_main,
            rank,
            world,
            address,
            port,
            *shared,
            opts,
            resume,
            timeout_s,
            workers=[w],
            allow_other_workers=False,
            pure=False,
            key=f"xorbit-ddp-{run_id}-rank-{rank}",
        )
        for rank, w in enumerate(workers)
    ]
    result = None
    try:
        for fut in as_completed(futures):
            if fut.status == "error":
                fut.result()  # raises the rank's own exception, at once
            value = fut.result()
            if value is not None:
                result = value
    finally:
        client.cancel([f for f in futures if not f.done()])
    return result
