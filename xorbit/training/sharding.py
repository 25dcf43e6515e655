"""Sharded data parallelism: torch's FSDP2 (``fully_shard``) on the DDP ranks.

With ``strategy="fsdp"`` each rank of `xorbit.training.distributed` wraps every
transformer block of the Reslim, then the whole model, with
``torch.distributed.fsdp.fully_shard``: parameters, gradients and the AdamW
state are split over the ranks (a rank holds ``1 / world_size`` of each), and a
block's parameters are gathered whole only while it computes.  Gradients are
averaged over the ranks as DDP averages them, so one step of either strategy
gives the same weights (to rounding).  It runs over gloo on CPUs and NCCL on
GPUs unchanged; on CUDA the parameters compute in bf16 with fp32 gradient
reductions and fp32 master weights (``MixedPrecisionPolicy``).

Weights that leave a rank whole go through the full-state helpers of
``torch.distributed.checkpoint.state_dict``, which gather the shards (on rank 0,
on the CPU): the best epoch's weights, the checkpoint's ``model.xorbit``, the
returned weights.  The training state of a sharded run is written with
``torch.distributed.checkpoint`` instead (`save_sharded`): every rank writes
its own shards of the model and the AdamW state, in parallel, and nothing is
gathered; `load_sharded` reads them back resharded to any number of ranks,
with either strategy or in one process.  Unsharded runs write the whole
state in ``state.pt``, the optimizer keyed by parameter name
(`optimizer_state`), which resumes anywhere too.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, cast

import torch

__all__ = [
    "STRATEGIES",
    "check_strategy",
    "full_model_state",
    "is_sharded",
    "load_optimizer_state",
    "load_sharded",
    "optimizer_state",
    "save_sharded",
    "set_model_state",
    "shard",
]

STRATEGIES = ("ddp", "fsdp", "auto")


def check_strategy(strategy: str) -> str:
    """``strategy`` if it is one of `STRATEGIES`; a ``ValueError`` naming them if not."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    return strategy


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``fully_shard`` has wrapped ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: torch.nn.Module, world_size: int, device: torch.device) -> torch.nn.Module:
    """``fully_shard`` each of ``model.blocks``, then ``model`` (in place; returned).

    The process group must be initialized.  On CUDA the parameters are cast to
    bf16 for compute and the gradients reduced in fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Reslim returns a crop of its padded output (a view); nothing xorbit does
    # changes it in place, which is what FSDP2 warns of
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (world_size,))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for block in getattr(model, "blocks", ()):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: torch.nn.Module, copy: bool = True) -> dict[str, torch.Tensor]:
    """The whole ``state_dict`` on the CPU: gathered to rank 0 for a sharded model
    (a collective: every rank calls it; the others get ``{}``).

    ``copy=False``: the tensors of an unsharded model on the CPU are its own
    (for a state written or returned at once, not kept while training goes on).
    """
    if not is_sharded(model):
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return {k: v.clone() for k, v in state.items()} if copy else state
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return cast(
        dict[str, torch.Tensor], get_model_state_dict(model, options=_options(cpu_offload=True))
    )


def set_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole ``state_dict``; into a sharded model from rank 0's ``state``
    (a collective: the other ranks may pass ``{}``)."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, cast(Any, state), options=_options(broadcast_from_rank0=True))


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's whole state keyed by parameter name (gathered to rank 0 for a
    sharded model: a collective, every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]
) -> None:
    """Load `optimizer_state` (by parameter name), or a plain ``optimizer.state_dict()``
    of an older checkpoint (by parameter index; unsharded models only)."""
    if all(isinstance(k, int) for k in saved.get("state", {})) and not any(
        isinstance(p, str) for g in saved.get("param_groups", ()) for p in g["params"]
    ):
        if is_sharded(model):
            raise ValueError(
                "this checkpoint's optimizer state is indexed by position (written before "
                "xorbit 0.3); resume it with strategy='ddp' or in one process"
            )
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    # torch creates the state to fill with a step on zero gradients, which it
    # skips when gradients are left over (from training this model before)
    optimizer.zero_grad(set_to_none=True)
    set_optimizer_state_dict(model, optimizer, saved, options=_options())


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Write the model and optimizer state with ``torch.distributed.checkpoint``:
    each rank its own shards, in parallel (a collective: every rank calls it).

    ``path`` is a new directory; the caller makes it the current checkpoint only
    once this returns on every rank (`xorbit.training.loop` names it by epoch
    and switches ``state.pt`` to it), so a crash leaves the previous one whole.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Fill ``model`` and ``optimizer`` from `save_sharded`'s directory, resharded to
    this run's ranks (any number, sharded or not; in one process too)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not Path(path).is_dir():
        raise FileNotFoundError(f"the sharded training state {str(path)!r} is missing")
    optimizer.zero_grad(set_to_none=True)  # see load_optimizer_state
    model_state, optim_state = get_state_dict(model, optimizer)
    # filled in place by dcp.load
    dcp.load(
        {"model": model_state, "optimizer": optim_state},
        checkpoint_id=str(path),
        no_dist=not torch.distributed.is_initialized(),  # one process reads every shard
    )
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
