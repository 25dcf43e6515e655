"""DDP plumbing without a cluster: rendezvous address and torch thread shares."""

import pytest

from xorbit.training.distributed import _address_host, _thread_shares


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("tcp://127.0.0.1:38369", "127.0.0.1"),
        ("tls://node12.cluster:40000", "node12.cluster"),
        ("tcp://[fd00::2]:8786", "fd00::2"),
        ("inproc://192.0.2.2/4167/4", "192.0.2.2"),
        ("10.0.0.3:1234", "10.0.0.3"),
    ],
)
def test_the_host_of_a_worker_address(address, host):
    assert _address_host(address) == host


def test_an_address_without_a_host_is_named():
    with pytest.raises(ValueError, match="no host in the Dask worker address 'tcp://:1234'"):
        _address_host("tcp://:1234")


def w(host, nthreads):
    return {"host": host, "nthreads": nthreads}


def test_thread_shares_split_each_hosts_cores_over_its_dask_threads():
    # two one-thread workers on a 2-core host: one core each
    assert _thread_shares({"a": w("h", 1), "b": w("h", 1)}, {"a": 2, "b": 2}) == {"a": 1, "b": 1}
    # one one-thread worker: the whole host
    assert _thread_shares({"a": w("h", 1)}, {"a": 2}) == {"a": 2}
    # a worker's share grows with its threads; hosts are counted apart
    workers = {"a": w("h1", 1), "b": w("h1", 3), "c": w("h2", 2)}
    assert _thread_shares(workers, {"a": 8, "b": 8, "c": 4}) == {"a": 2, "b": 6, "c": 4}
    # more threads than cores: still one
    assert _thread_shares({"a": w("h", 4), "b": w("h", 4)}, {"a": 2, "b": 2}) == {"a": 1, "b": 1}
    # a host's cores come from any of its workers; a host none reported gets no limit
    workers = {"a": w("h1", 1), "b": w("h1", 1), "c": w("h2", 1)}
    assert _thread_shares(workers, {"a": 4}) == {"a": 2, "b": 2, "c": None}


def test_each_rank_takes_its_own_gpu():
    """Rank % device count put two ranks on one GPU under dask-cuda, which shows
    each worker its own GPU first."""
    from xorbit.training.distributed import _gpu_indices

    info = {w: {"host": "h"} for w in ("a", "b", "c")}
    rotated = {"a": "0,1,2", "b": "1,2,0", "c": "2,0,1"}  # LocalCUDACluster
    assert _gpu_indices(["a", "b", "c"], info, rotated) == {"a": 0, "b": 0, "c": 0}
    shared = dict.fromkeys(info, "0,1,2")  # every worker sees every GPU
    assert _gpu_indices(["a", "b", "c"], info, shared) == {"a": 0, "b": 1, "c": 2}
    unset = dict.fromkeys(info)
    assert _gpu_indices(["a", "b", "c"], info, unset) == {"a": 0, "b": 1, "c": 2}
    # two hosts: the place among the host's own ranks, not the global rank
    two = {"a": {"host": "h1"}, "b": {"host": "h2"}, "c": {"host": "h2"}}
    assert _gpu_indices(["a", "b", "c"], two, unset) == {"a": 0, "b": 0, "c": 1}
