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
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch

if TYPE_CHECKING:
    from ..model.reslim import Reslim

M = TypeVar("M", bound=torch.nn.Module)

__all__ = [
    "STRATEGIES",
    "check_strategy",
    "full_model_state",
    "hollow",
    "is_sharded",
    "load_optimizer_state",
    "load_sharded",
    "optimizer_state",
    "save_sharded",
    "set_model_state",
    "shard",
    "shard_from_parts",
    "split_state",
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


def shard(model: M, world_size: int, device: torch.device) -> M:
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
    alone = not torch.distributed.is_initialized()  # one process reads every shard
    with warnings.catch_warnings():
        # torch warns that it "assumes" one process: that is the case here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(
            {"model": model_state, "optimizer": optim_state},
            checkpoint_id=str(path),
            no_dist=alone,
        )
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


def split_state(model: torch.nn.Module, world_size: int) -> list[dict[str, torch.Tensor]]:
    """Each rank's part of ``model``'s weights as `shard` lays them out: every
    parameter cut along its first dimension as ``torch.chunk`` cuts it (a rank
    past the last chunk gets an empty one), buffers whole.  The client sends
    each rank only its part, so no rank receives the whole model."""
    buffers = dict(model.named_buffers())
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(world_size)]
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if name in buffers:
            for part in parts:
                part[name] = tensor
            continue
        chunks = list(torch.chunk(tensor, world_size, dim=0))
        for r, part in enumerate(parts):
            part[name] = chunks[r].clone() if r < len(chunks) else tensor[:0].clone()
    return parts


def hollow(model: Reslim) -> Reslim:
    """A copy of a `Reslim` with its tensors on ``meta``: the architecture, no weights."""
    from ..model.reslim import Reslim

    with torch.device("meta"):
        empty = Reslim(model.config)
    for name, param in model.named_parameters():  # frozen flags travel
        empty.get_parameter(name).requires_grad_(param.requires_grad)
    return empty


def shard_from_parts(
    model: M, part: dict[str, torch.Tensor], world_size: int, device: torch.device
) -> M:
    """`shard` a model built on ``meta``, then give this rank's shards the values of
    its `split_state` part (in place; returned).  ``part`` is consumed: emptied."""
    shard(model, world_size, device)
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in part.items():
            if name in params:
                local = cast(Any, params[name]).to_local()  # a DTensor shard
                if local.shape != value.shape:
                    raise RuntimeError(
                        f"the shard of {name!r} has shape {tuple(local.shape)} on this rank, "
                        f"the client sent {tuple(value.shape)}"
                    )
                local.copy_(value)
            else:
                buffers[name].copy_(value)
    # emptied in place: the worker's store holds this very dict (the scattered
    # part) for as long as the run lasts, and would keep a second copy alive
    part.clear()
    return model
