"""How many intra-op threads torch may use inside a Dask task.

Dask already runs several tasks at once (threads of the local scheduler, or the
``nthreads`` of a distributed worker); a torch call that also takes every core
multiplies the two and oversubscribes the machine.  `thread_share` is the
cores this process has divided by the Dask threads that share them, capped by
``OMP_NUM_THREADS`` when set (Dask's nanny sets it to 1 for worker processes);
`torch_threads` applies it for the duration of a ``with`` block.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["available_cores", "thread_share", "torch_threads"]


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _dask_threads() -> int:
    """Tasks that may run at once in this process under the current scheduler."""
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        pass
    import dask

    scheduler = dask.config.get("scheduler", None)
    if scheduler in ("sync", "synchronous", "single-threaded"):
        return 1
    return max(1, int(dask.config.get("num_workers", None) or available_cores()))


def thread_share(dask_threads: int | None = None, tasks: int | None = None) -> int:
    """Torch threads one task may use: cores // concurrent Dask threads (at least 1).

    ``tasks``: how many such tasks the graph has at most; fewer tasks than Dask
    threads leave threads idle, whose cores the tasks may use (one whole-field
    block under the threaded scheduler gets every core, not one).
    """
    n = dask_threads if dask_threads is not None else _dask_threads()
    if tasks is not None:
        n = min(n, max(1, int(tasks)))
    share = max(1, available_cores() // max(1, n))
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        share = min(share, int(omp))
    return share


@contextmanager
def torch_threads(n: int | None, cap: bool = True) -> Iterator[None]:
    """Run the block with at most ``n`` torch intra-op threads (``None``: unchanged).

    Torch's CPU build keeps this setting per calling thread (OpenMP), so each
    Dask task sets its own and restores it afterwards; concurrent tasks do not
    undo each other's limit.  ``cap`` (default) never raises the count above
    the thread's current one; ``cap=False`` sets ``n`` as it is, for a DDP rank,
    the only task of its worker, whose process the Dask nanny started with
    ``OMP_NUM_THREADS=1`` (and torch at one thread).
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n) if not cap else min(int(n), before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
