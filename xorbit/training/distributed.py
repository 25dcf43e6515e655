"""Training on a Dask cluster: one torch DDP rank per Dask worker.

`fit_distributed` scatters the training arrays to every worker once and runs
`xorbit.training.loop.fit` on each worker as rank ``i`` of a ``torch.distributed``
process group (gloo on CPU, NCCL on GPU), wrapped in ``DistributedDataParallel``.
Ranks split each global batch, so the result matches a single process on the
same global batches.  Every rank validates its share of the validation time
steps and the ranks add their error sums, so all of them get the scores of the
whole set at the same moment; rank 0 writes checkpoints (holding every rank's
RNG state) and returns the weights.

Rendezvous: rank 0 binds a ``TCPStore`` on port 0, so the OS picks a free port
in the bind itself (a port chosen first and bound later can be taken in
between), and publishes ``(host, port)`` in a ``distributed.Variable`` named
after the run; the other ranks read it and connect.  The host is the one in
rank 0's Dask worker address, which the other workers already reach (what the
hostname resolves to can be 127.0.1.1, unreachable from other machines).

Threads: torch would take every core in each worker process, and Dask runs
several workers (or threads) per host, oversubscribing it.  Each rank trains
under at most its worker's share of its host's cores: the host's cores over
the Dask threads of all workers on that host, times the worker's threads (the
rank is the only task we give its worker).  ``TrainOptions.threads`` overrides
the share.

A rank that raises makes the call raise that error as soon as it arrives; the
other ranks are abandoned (their collectives time out after ``timeout_s``).

The same code runs wherever Dask runs: a ``LocalCluster`` on a workstation, a
multi-GPU box (``LocalCUDACluster`` from dask-cuda, one worker per GPU), or an
HPC batch system through dask-jobqueue (``SLURMCluster(...).scale(jobs=N)``),
provided every worker can reach rank 0's worker host on a TCP port.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .._threads import available_cores, torch_threads
from ..downscaler import Downscaler
from . import sharding
from .loop import TrainOptions, fit
from .memory import choose_strategy
from .samples import CropMix, PairedArrays, PairedCrops

__all__ = ["fit_distributed"]

logger = logging.getLogger(__name__)


def _address_host(address: str) -> str:
    """The host part of a Dask address (``tcp://10.0.0.3:8786`` -> ``10.0.0.3``).

    Raises
    ------
    ValueError
        If the address names no host.
    """
    rest = address.split("://", 1)[-1]
    if rest.startswith("["):  # IPv6: tcp://[fd00::2]:8786
        host = rest[1:].split("]", 1)[0]
    else:  # inproc://192.0.2.2/4167/4 has a path, tcp://host:port a port
        host = rest.split("/", 1)[0].rsplit(":", 1)[0]
    if not host:
        raise ValueError(f"no host in the Dask worker address {address!r}")
    return host


def _worker_host() -> str:
    """The host of the Dask worker running this task, as the other workers reach it."""
    from distributed import get_worker

    return _address_host(get_worker().address)


def _thread_shares(
    workers: Mapping[str, Mapping[str, Any]], cores: Mapping[str, int]
) -> dict[str, int | None]:
    """Torch threads for a rank on each worker: the worker's share of its host's cores.

    ``workers`` is ``scheduler_info()["workers"]`` (``host``, ``nthreads`` of
    each worker), ``cores`` the cores each worker may run on
    (`xorbit._threads.available_cores`).  A host's cores are split over the Dask
    threads of *all* its workers, ranks or not: the others run tasks too.  A
    host whose workers reported no cores gets ``None`` (no limit).
    """
    host_threads: dict[str, int] = defaultdict(int)
    host_cores: dict[str, int] = {}
    for address, info in workers.items():
        host = info["host"]
        host_threads[host] += max(1, int(info["nthreads"]))
        if address in cores:
            host_cores[host] = max(host_cores.get(host, 0), int(cores[address]))
    shares: dict[str, int | None] = {}
    for address, info in workers.items():
        n = host_cores.get(info["host"])
        mine = max(1, int(info["nthreads"]))
        shares[address] = None if n is None else max(1, n * mine // host_threads[info["host"]])
    return shares


def _visible_devices() -> str | None:
    """This worker's ``CUDA_VISIBLE_DEVICES``."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def _gpu_indices(
    workers: Sequence[str],
    info: Mapping[str, Mapping[str, Any]],
    visible: Mapping[str, str | None],
) -> dict[str, int]:
    """The device index each rank's worker should take, by worker address.

    dask-cuda's ``LocalCUDACluster`` gives each worker its own
    ``CUDA_VISIBLE_DEVICES``, rotated so that the worker's GPU comes first:
    every worker of such a host takes device 0.  Workers of one host that see
    the same devices take the i-th, i their place among that host's ranks (a
    global rank modulo the device count put two ranks on one GPU in both cases).
    """
    by_host: dict[str, list[str]] = defaultdict(list)
    for w in workers:
        by_host[info[w]["host"]].append(w)
    out: dict[str, int] = {}
    for ranks in by_host.values():
        lists = [visible.get(w) for w in ranks]
        own = len(ranks) > 1 and all(lists) and len(set(lists)) == len(ranks)
        for i, w in enumerate(ranks):
            out[w] = 0 if own else i
    return out


def _rendezvous(
    rank: int, world_size: int, name: str, timeout: datetime.timedelta
) -> torch.distributed.TCPStore:
    """The process group's store: rank 0 binds it, the others connect to it."""
    from distributed import Variable

    address = Variable(name)
    if rank == 0:
        host = _worker_host()
        # not waiting for the others: they learn the port only once it is bound
        store = torch.distributed.TCPStore(
            host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False
        )
        address.set([host, store.port])
        return store
    try:
        host, port = address.get(timeout=timeout.total_seconds())
    except TimeoutError:
        raise TimeoutError(
            f"rank {rank} got no rendezvous address from rank 0 in {timeout} ({name!r})"
        ) from None
    return torch.distributed.TCPStore(host, int(port), world_size, is_master=False, timeout=timeout)


def _gpu_memory() -> int:
    """Bytes of this worker's current CUDA device."""
    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def _nbytes(data: Any) -> int:
    """Bytes of the arrays in memory of training or validation data (stores: 0)."""
    if data is None:
        return 0
    if isinstance(data, CropMix):
        return sum(_nbytes(p) for p in data.parts)
    if isinstance(data, PairedCrops):
        return _nbytes(data.data)
    if isinstance(data, PairedArrays):
        return sum(int(getattr(a, "nbytes", 0)) for a in (data.coarse, data.fine))
    return sum(_nbytes(d) for d in data)


def _strategy(
    client: Any,
    dsr: Downscaler,
    train: PairedCrops | CropMix,
    val: Any,
    opts: TrainOptions,
    info: Mapping[str, Mapping[str, Any]],
    workers: Sequence[str],
) -> str:
    """``opts.strategy``, "auto" resolved by the memory plan (logged when it picks FSDP).

    The limit is the smallest worker ``memory_limit`` (none if a worker has
    none); on CUDA the smallest GPU memory.

    Raises
    ------
    MemoryError
        If one rank's share would not fit (`xorbit.training.memory.choose_strategy`).
    """
    cuda = opts.device.startswith("cuda")
    if cuda:
        limit: int | None = min(client.run(_gpu_memory, workers=list(workers)).values())
    else:
        limits = [int(info[w].get("memory_limit") or 0) for w in workers]
        limit = min(limits) if all(limits) else None
    try:
        name, memory = choose_strategy(
            dsr.config,
            opts.strategy,
            # an ensemble's forward runs every sample once per member (pair)
            batch_size=opts.batch_size * max(1, dsr.config.member_passes(opts.ensemble)),
            workers=len(workers),
            limit=limit,
            precision="bf16" if cuda else "fp32",
            checkpoint_activations=opts.checkpoint_activations,
            data_bytes=0 if cuda else _nbytes(train) + _nbytes(val),
        )
    except (NotImplementedError, RuntimeError) as err:
        # a model the meta device cannot run: no plan, not a reason to stop
        name = "ddp" if opts.strategy == "auto" else opts.strategy
        logger.warning("no memory plan for this model (%s): training with %s", err, name)
        return name
    if opts.strategy == "auto" and name == "fsdp":
        logger.warning("strategy='auto': DDP would not fit, training with FSDP\n%s", memory)
    return name


def _rank_main(
    rank: int,
    world_size: int,
    run_id: str,
    dsr: Downscaler,
    train: PairedCrops | CropMix,
    val: PairedArrays | Sequence[PairedArrays] | None,
    opts: TrainOptions,
    resume: dict[str, Any] | None,
    timeout_s: float,
    stop_after: int | None,
    threads: int | None,
    gpu: int = 0,
    part: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """One rank: join the group, `fit`, return what the client needs of this rank.

    ``gpu``: the index, among the devices this worker sees, of the rank's GPU
    (`_gpu_indices`).  ``part``: with FSDP, this rank's shards of the weights
    (`sharding.split_state`); ``dsr``'s model then has its tensors on ``meta``.
    """
    import torch.distributed as dist

    use_cuda = opts.device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(gpu % torch.cuda.device_count())
        opts = opts.replace(device=f"cuda:{torch.cuda.current_device()}")
    if rank != 0:
        # checkpoint_dir stays: fit gathers every rank's RNG for rank 0 to write
        opts = opts.replace(progress=False)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _rendezvous(rank, world_size, f"xorbit-ddp-{run_id}-store", timeout)
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )
    try:
        wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None
        if part is not None:
            # a model of its own built on meta, sharded, then this rank's shards
            # filled in: the whole model never exists here, and the scattered
            # object stays picklable (fully_shard makes a class pickle cannot
            # find, and a worker under a memory limit spills what it holds)
            model = sharding.shard_from_parts(
                sharding.hollow(dsr.model), part, world_size, torch.device(opts.device)
            )
            dsr = dataclasses.replace(dsr, model=model)
        else:

            def wrap(model: torch.nn.Module) -> torch.nn.Module:
                ids = [torch.cuda.current_device()] if use_cuda else None
                return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

        with torch_threads(threads, cap=False):
            used = torch.get_num_threads()
            history = fit(
                dsr,
                train,
                val,
                opts,
                resume=resume,
                rank=rank,
                world_size=world_size,
                wrap=wrap,
                stop_after=stop_after,
            )
        # a sharded model's weights are gathered to rank 0 by every rank
        gather = rank == 0 or opts.strategy == "fsdp"
        state = sharding.full_model_state(dsr.model, copy=False) if gather else {}
    finally:
        dist.destroy_process_group()
    result: dict[str, Any] = {"rank": rank, "threads": used, "history": history}
    if rank == 0:
        result["state"] = state
    return result


def _scatter_parts(client: Any, dsr: Downscaler, workers: Sequence[str]) -> list[Any]:
    """Futures of each rank's `sharding.split_state` part, each on its rank's worker."""
    # in a list: a dict scattered alone has its keys taken for the Dask keys,
    # which every rank's part shares (ranks got each other's shards)
    return [
        client.scatter([part], workers=[w], hash=False)[0]
        for part, w in zip(sharding.split_state(dsr.model, len(workers)), workers, strict=True)
    ]


def fit_distributed(
    client: Any,
    dsr: Downscaler,
    train: PairedCrops | CropMix,
    val: PairedArrays | Sequence[PairedArrays] | None,
    opts: TrainOptions,
    *,
    resume: dict[str, Any] | None = None,
    n_ranks: int | None = None,
    timeout_s: float = 300.0,
    stop_after: int | None = None,
    rank_results: list[dict[str, Any]] | None = None,
) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """Run `fit` as DDP over the workers of a ``distributed.Client``.

    Returns rank 0's history and trained weights.  ``rank_results``, when
    given, is filled with every rank's ``{"rank", "threads", "history"}`` in
    rank order (``threads``: the torch threads it trained with).

    Raises
    ------
    RuntimeError
        If the cluster has no worker.
    Exception
        The first error any rank raised, re-raised here.
    """
    from distributed import Variable, as_completed

    info = client.scheduler_info(n_workers=-1)["workers"]
    workers = sorted(info)
    if n_ranks is not None:
        workers = workers[:n_ranks]
    if not workers:
        raise RuntimeError("the Dask cluster has no workers to train on")
    world = len(workers)
    opts = opts.replace(strategy=_strategy(client, dsr, train, val, opts, info, workers))
    if opts.threads is None:
        shares = _thread_shares(info, client.run(available_cores))
    else:
        shares = dict.fromkeys(workers, opts.threads)
    gpus = _gpu_indices(workers, info, client.run(_visible_devices))
    run_id = uuid.uuid4().hex[:8]
    # fresh keys: content-hashed ones would be those of a previous call on the
    # same data, whose release can still be under way (the scatter then hangs)
    parts: list[Any] = [None] * world
    if opts.strategy == "fsdp":
        # each rank gets its shards only, and the model's architecture on meta
        parts = _scatter_parts(client, dsr, workers)
        sent = dataclasses.replace(dsr, model=sharding.hollow(dsr.model))
    else:
        sent = dsr
    shared = client.scatter([sent, train, val], broadcast=True, hash=False)
    futures = [
        client.submit(
            _rank_main,
            rank,
            world,
            run_id,
            *shared,
            opts,
            resume,
            timeout_s,
            stop_after,
            shares.get(w),
            gpus[w],
            parts[rank],
            workers=[w],
            allow_other_workers=False,
            pure=False,
            key=f"xorbit-ddp-{run_id}-rank-{rank}",
        )
        for rank, w in enumerate(workers)
    ]
    results: list[dict[str, Any]] = [{} for _ in workers]
    try:
        for fut in as_completed(futures):
            if fut.status == "error":
                fut.result()  # raises the rank's own exception, at once
            value = fut.result()
            results[value["rank"]] = value
    finally:
        client.cancel([f for f in futures if not f.done()])
        Variable(f"xorbit-ddp-{run_id}-store", client=client).delete()
    if rank_results is not None:
        rank_results[:] = [{k: v for k, v in r.items() if k != "state"} for r in results]
    return results[0]["history"], results[0]["state"]
