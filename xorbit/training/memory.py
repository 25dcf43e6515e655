"""Memory plans: what one training rank holds, before anything is allocated.

`plan` adds up the bytes of one rank's training state for a `ReslimConfig`:

- **parameters, gradients, AdamW state** (fp32: 4, 4 and 8 bytes per
  parameter), whole on every rank with DDP, ``1 / workers`` of each with FSDP,
  and the buffers (the linear path's map), whole on every rank;
- **DDP's gradient buckets** (a second copy of the gradients, 4 bytes per
  trainable parameter) or, with FSDP, the **gathered unit**: the largest
  ``fully_shard`` unit's parameters gathered whole, through a flat buffer,
  twice (the unit computing and the one prefetched), and its gradients with
  the reduce-scatter's buffers: 28 bytes per parameter of that unit in fp32;
- **activations**: the tensors autograd keeps for backward, measured by running
  the model forward once on the ``meta`` device (no memory, no compute, any
  size) with ``saved_tensors_hooks`` summing their bytes, per sample, times the
  rank's share of the batch.  With ``checkpoint_activations`` each block keeps
  only its input and one block's activations exist at a time;
- **the process**: the interpreter with torch, xorbit and a Dask worker loaded
  (`PROCESS_BYTES`, measured), and the training data each rank holds.

`fits` compares the total with a memory limit (a Dask worker's, or a GPU's).
The figures were checked against the peak memory of real runs
(``benchmarks/bench_plan.py``, docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import json
import math
import unittest.mock
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..model.config import ReslimConfig

__all__ = ["PROCESS_BYTES", "MemoryPlan", "plan"]

# resident memory of a Dask worker process that has imported torch and xorbit
# and trained a tiny model (measured: bench_plan.py, docs/benchmarks.md)
PROCESS_BYTES = 460 * 2**20
_PRECISIONS = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one rank needs to train, by part; `total` and `fits` from them."""

    strategy: str
    workers: int
    batch_per_rank: int
    parameters: int  # count, whole model
    parts: dict[str, int] = field(default_factory=dict)
    limit: int | None = None

    @property
    def total(self) -> int:
        """All parts, in bytes."""
        return int(sum(self.parts.values()))

    @property
    def fits(self) -> bool:
        """Whether `total` is within `limit` (no limit: it fits)."""
        return self.limit is None or self.total <= self.limit

    def __str__(self) -> str:
        head = (
            f"memory plan: {self.parameters / 1e6:.1f} M parameters, {self.strategy} on "
            f"{self.workers} rank(s), {self.batch_per_rank} sample(s) per rank"
        )
        rows = [f"  {name:<14}{_gib(n):>10}" for name, n in self.parts.items()]
        rows.append(f"  {'total':<14}{_gib(self.total):>10}")
        if self.limit is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            rows.append(f"  {'limit':<14}{_gib(self.limit):>10}  ({verdict})")
        return "\n".join([head, *rows])


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def plan(
    config: ReslimConfig,
    *,
    batch_size: int = 1,
    workers: int = 1,
    strategy: str = "ddp",
    precision: str = "fp32",
    checkpoint_activations: bool = False,
    memory_limit: int | None = None,
    data_bytes: int = 0,
    process_bytes: int = PROCESS_BYTES,
    img_size: Sequence[int] | None = None,
) -> MemoryPlan:
    """Per-rank bytes of training ``config`` (see the module docstring).

    Parameters
    ----------
    batch_size
        The global batch, split over ``workers`` ranks (``"ddp"`` or ``"fsdp"``;
        one process trains as one DDP rank would, without buckets when
        ``workers`` is 1).
    precision
        ``"fp32"``, or ``"bf16"`` (FSDP on CUDA: parameters gathered and
        activations kept in bf16; master weights, gradients and AdamW stay fp32).
    memory_limit
        Bytes one rank may use (a Dask worker's ``memory_limit``, a GPU's memory);
        `MemoryPlan.fits` compares with it.
    img_size
        The coarse training window (default ``config.img_size``).

    Examples
    --------
    >>> from xorbit import ReslimConfig
    >>> from xorbit.training import plan
    >>> p = plan(ReslimConfig.preset("126m", in_vars=["tas"], out_vars=["tas"]),
    ...          batch_size=2, workers=2, strategy="fsdp")
    >>> p.parts["optimizer"] < p.parts["activations"] + p.parts["parameters"] * 3
    True
    """
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"plan a strategy 'ddp' or 'fsdp', got {strategy!r}")
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    workers, batch_size = int(workers), int(batch_size)
    if workers < 1 or batch_size < 1:
        raise ValueError(f"workers and batch_size must be positive, got {workers}, {batch_size}")
    m = _measure(config, img_size)
    share = 1 / workers if strategy == "fsdp" else 1.0
    per_rank = math.ceil(batch_size / workers)
    width = _PRECISIONS[precision]
    parts = {
        "parameters": math.ceil(4 * m.params * share),
        "buffers": m.buffers,  # the linear path's map, whole on every rank
        "gradients": math.ceil(4 * m.trainable * share),
        "optimizer": math.ceil(8 * m.trainable * share),
    }
    if strategy == "ddp" and workers > 1:
        parts["ddp buckets"] = 4 * m.trainable
    if strategy == "fsdp":
        # the largest unit whole: its all-gather's flat buffer and the copies
        # out of it, the same for the prefetched next unit (4 x ``width``), and
        # its unsharded gradients with the reduce-scatter's buffers (3 x fp32)
        parts["gathered unit"] = m.largest_unit * (4 * width + 3 * 4)
    kept = (
        m.outside + m.depth * m.block_input + m.block
        if checkpoint_activations
        else m.outside + m.depth * m.block
    )
    parts["activations"] = int(kept * per_rank * width / 4)
    parts["process"] = int(process_bytes)
    if data_bytes:
        parts["data"] = int(data_bytes)
    return MemoryPlan(strategy, workers, per_rank, m.params, parts, memory_limit)


@dataclass(frozen=True)
class _Measured:
    params: int
    trainable: int
    buffers: int  # bytes
    largest_unit: int  # parameters of the largest fully_shard unit
    depth: int
    outside: int  # activation bytes per sample kept outside the blocks
    block: int  # ... kept inside one block
    block_input: int  # bytes of one block's input, per sample


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel keeps for backward: q, k, v, the output and
    the log-sum-exp of each row (no L x L weights).  Shapes only, for ``meta``."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # [B, H, L, d] laid out as [B, L, H, d], as the kernels write it: merging
        # the heads back (``transpose(1, 2).reshape``) is then a view, no copy
        *lead, heads, n, _ = q.shape
        out = q.new_empty(*lead, n, heads, v.shape[-1]).transpose(-3, -2)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_: Any) -> torch.Tensor:
    return _FusedAttention.apply(q, k, v)


def _measure(config: ReslimConfig, img_size: Sequence[int] | None) -> _Measured:
    """`_measured` of ``config`` on ``img_size`` (default its own), once per config:
    ``"auto"`` plans both strategies, and a gated run plans each of its two fits."""
    window = tuple(int(n) for n in (img_size or config.img_size))
    return _measured(json.dumps(config.to_dict(), sort_keys=True), window)


@functools.lru_cache(maxsize=32)
def _measured(config_json: str, window: tuple[int, ...]) -> _Measured:
    """Parameter counts and saved-activation bytes (fp32, one sample) on ``meta``.

    Adaptive tokens depend on the data (no ``meta`` kernel can say how many):
    they are planned as the uniform tokens, which they never outnumber.
    """
    from ..model.reslim import Reslim

    config = ReslimConfig.from_dict(json.loads(config_json))
    with torch.device("meta"):
        model = Reslim(config)
        # the forward that is measured: the uniform tokens of an adaptive model
        runner = Reslim(config.replace(tokens="uniform")) if config.tokens == "adaptive" else model
    runner.train()
    owned = {t.untyped_storage()._cdata for t in [*runner.parameters(), *runner.buffers()]}
    blocks = list(runner.blocks)
    block_params = [sum(p.numel() for p in b.parameters()) for b in blocks]
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    saved: dict[int, int] = {}
    where: dict[int, str] = {}
    state: dict[str, Any] = {"in": "outside", "input": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in owned and key not in saved:
            saved[key] = t.untyped_storage().nbytes()
            where[key] = state["in"]
        return t

    def enter(_mod: torch.nn.Module, args: tuple) -> None:
        state["in"] = "block"
        state["input"] = args[0].numel() * args[0].element_size()

    def leave(*_: object) -> None:
        state["in"] = "outside"

    handles = [b.register_forward_pre_hook(enter) for b in blocks]
    handles += [b.register_forward_hook(leave) for b in blocks]
    h, w = window
    x = torch.zeros(1, len(config.in_vars), int(h), int(w), device="meta")
    try:
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            # on meta, attention would take the math path and keep the L x L
            # weights; CPU and CUDA run a fused kernel, which does not
            unittest.mock.patch.object(F, "scaled_dot_product_attention", _fused_attention),
        ):
            runner(x, config.in_vars)
    finally:
        for handle in handles:
            handle.remove()
    inside = sum(n for k, n in saved.items() if where[k] == "block")
    return _Measured(
        params=params,
        trainable=trainable,
        buffers=sum(b.numel() * b.element_size() for b in model.buffers()),
        largest_unit=max([params - sum(block_params), *block_params]),
        depth=len(blocks),
        outside=sum(saved.values()) - inside,
        block=inside // max(1, len(blocks)),
        block_input=int(state["input"]),
    )


def choose_strategy(
    config: ReslimConfig,
    strategy: str,
    *,
    batch_size: int,
    workers: int,
    limit: int | None,
    **kwargs: object,
) -> tuple[str, MemoryPlan]:
    """The strategy to train with and its plan: ``strategy`` itself, or for
    ``"auto"`` DDP if it fits ``limit`` and FSDP otherwise.

    Raises
    ------
    MemoryError
        If the run (every candidate strategy) would not fit, with the plan and
        what would make it fit in the message.
    """
    from .sharding import check_strategy

    candidates = ["ddp", "fsdp"] if check_strategy(strategy) == "auto" else [strategy]
    for name in candidates:
        p = plan(
            config,
            batch_size=batch_size,
            workers=workers,
            strategy=name,
            memory_limit=limit,
            **kwargs,  # type: ignore[arg-type]
        )
        if p.fits:
            return name, p
    hints = [] if strategy == "fsdp" else ["strategy='fsdp'"]
    hints += ["more workers", "a smaller batch_size or crop"]
    if not kwargs.get("checkpoint_activations"):
        hints.append("checkpoint_activations=True")
    raise MemoryError(
        f"training would not fit the workers' memory limit ({(limit or 0) / 2**30:.3f} GiB per rank; "
        f"try {', '.join(hints)}):\n{p}"
    )
