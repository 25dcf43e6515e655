"""One-process training loop: AdamW, warm-up + cosine, Bayesian TV loss, resume.

`fit` trains a `Downscaler`'s model in place on `PairedCrops` and validates each
epoch on whole held-out fields (tiled like ``.orbit.downscale``) against bicubic
interpolation.  It is also the body of every DDP rank (`xorbit.training.distributed`):
with ``world_size > 1`` each rank takes every ``world_size``-th sample of one
shared permutation, so the ranks together see exactly the global batches a
single process would.

With validation data and ``keep_best`` (default), the weights of the epoch with
the lowest validation RMSE (relative to bicubic, averaged over variables) are
restored at the end: small regional training sets overfit within a few dozen
epochs.

Validation is split over the DDP ranks by time step; the ranks add their sums
of squared error (`validation_sums`) so that all get the scores of the whole set.

Checkpoints (``checkpoint_dir/state.pt``: model, optimizer, scheduler, the RNG
of every rank, epoch, history; and ``checkpoint_dir/model.xorbit``, the
Downscaler) are written atomically after each epoch by rank 0; ``resume=``
continues exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import atomic_write
from ..downscaler import Downscaler
from ..engine import downscale_array
from ..model.config import ReslimConfig
from ..model.loss import bayesian_tv_loss, fair_crps_loss, mirror
from ..regrid import upsample_array
from .samples import CropMix, PairedArrays, PairedCrops
from .sharding import (
    full_model_state,
    hollow,
    is_sharded,
    load_optimizer_state,
    load_sharded,
    optimizer_state,
    save_sharded,
    set_model_state,
)

__all__ = [
    "TRAIN_PRESETS",
    "TrainOptions",
    "fit",
    "lr_factor",
    "rmse_scores",
    "validate",
    "validation_sums",
]

STATE_FILE = "state.pt"
SHARDED_KEY = "sharded"  # in a sharded run's state.pt: its shards' directory
MODEL_FILE = "model.xorbit"


# Training defaults per preset (the reference's for the paper's sizes).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "9.5m": dict(lr=2e-3, batch_size=32),
    "126m": dict(lr=5e-4, batch_size=8),
    "1b": dict(lr=5e-4, batch_size=4),
    "10b": dict(lr=5e-4, batch_size=1),
    "tiny": dict(lr=3e-3, batch_size=8),
}


@dataclass
class TrainOptions:
    """Everything `fit` needs besides the model and the data.

    Training hyper-parameters live here, not in `ReslimConfig` (the architecture):
    `for_config` gives a preset's defaults.
    """

    epochs: int = 10
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_epochs: float = 2
    warmup_start_lr: float = 1e-7
    min_lr: float = 1e-8
    tv_lambda: float = 1e-3
    var_weights: dict[str, float] = field(default_factory=dict)
    lat_weighted: bool = True
    clip_grad: float = 1.0
    seed: int = 0
    device: str = "cpu"
    checkpoint_dir: str | None = None
    progress: bool = True
    tile: tuple[int, int] | None = None
    halo: tuple[int, int] | None = None
    keep_best: bool = True
    # amplitude augmentation of anomaly fields (`PairedCrops`): "auto" = on when
    # the model works on anomalies from a climatology, "scale", or "none"
    augment: str = "auto"
    augment_scale: tuple[float, float] = (0.0, 3.0)
    augment_mix: tuple[float, float] | None = None
    # torch intra-op threads of each DDP rank, at most; None: the rank's worker's
    # share of its host's cores (one-process training leaves torch's setting alone)
    threads: int | None = None
    # batches read ahead in a background thread while the model trains (0: none)
    prefetch: int = 2
    # validate on at most this many time steps, evenly spaced and the same every
    # epoch (None: all), read a batch of time steps at a time
    val_steps: int | None = None
    # load the training data whole (True), read each sample from its store or
    # Dask graph (False), or decide by size (None: `samples.IN_MEMORY_BYTES`)
    in_memory: bool | None = None
    # a linear path fitted in closed form before the network trains (one grid,
    # a config without one of its own): the model contains the ridge map
    linear_path: bool = True
    # keep the network's correction only if it beats the linear path on held-out
    # years (`xorbit.training.linear.fit_gated`)
    gate: bool = True
    # fine-tuning (`xorbit.train(init=)`): the learning rate of parameters copied
    # whole from the pretrained model, as a fraction of ``lr``
    pretrained_lr_scale: float = 1.0
    # with a Dask client: "ddp" (every rank holds the whole model), "fsdp" (the
    # model, its gradients and AdamW state sharded over the ranks,
    # `xorbit.training.sharding`), or "auto" (FSDP when `plan` says one rank's
    # whole training state would not fit its worker's memory)
    strategy: str = "auto"
    # experimental: train the network on out-of-fold residuals of the linear
    # path, ``cross_fit`` blocks of years (`xorbit.training.linear.cross_fitted`);
    # 0: off
    cross_fit: int = 0
    # recompute each transformer block's activations in backward (less memory,
    # about a third more compute)
    checkpoint_activations: bool = False
    # a stochastic model trained on the fair CRPS of this many members per
    # sample, each from its own draw of the noise (`fair_crps_loss`); 0: the
    # deterministic Bayesian TV loss
    ensemble: int = 0

    def __post_init__(self) -> None:
        m = self.ensemble
        if isinstance(m, bool) or not isinstance(m, int) or m < 0 or m == 1:
            raise ValueError(
                f"ensemble must be 0 (deterministic) or a number of members >= 2, got {m!r}"
            )

    @classmethod
    def for_config(cls, config: ReslimConfig, **overrides: Any) -> TrainOptions:
        """The defaults of ``config``'s preset (matched by architecture), then ``overrides``."""
        base = TRAIN_PRESETS.get(config.preset_name() or "", {})
        return cls(**{**base, **overrides})

    def replace(self, **changes: Any) -> TrainOptions:
        """A copy with some fields changed; unknown names raise a ``TypeError`` naming them."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"unknown training options {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **changes)


def lr_factor(step: int, warmup: int, total: int, lr: float, start: float, end: float) -> float:
    """Multiplier of ``lr`` at ``step``: linear warm-up from ``start``, cosine to ``end``."""
    if step < warmup:
        return (start + (lr - start) * step / max(1, warmup)) / lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return (end + 0.5 * (lr - end) * (1 + math.cos(math.pi * progress))) / lr


def validate(
    dsr: Downscaler,
    data: PairedArrays,
    *,
    tile: tuple[int, int] | None = None,
    halo: tuple[int, int] | None = None,
    device: str = "cpu",
    batch_size: int = 16,
) -> dict[str, float]:
    """RMSE per output variable (physical units) of the model and of bicubic.

    Whole fields are predicted tile by tile, as ``.orbit.downscale`` would.
    """
    sums = validation_sums(dsr, data, tile=tile, halo=halo, device=device, batch_size=batch_size)
    return rmse_scores(dsr, sums)


def rmse_scores(dsr: Downscaler, sums: np.ndarray) -> dict[str, float]:
    """``rmse_{v}`` and ``rmse_bicubic_{v}`` (physical units) from `validation_sums`.

    Sums of several time shards (DDP ranks) may be added first: the RMSE of the
    total is the RMSE over all their time steps.  No valid pixel gives NaN.
    """
    scores = {}
    for (sse, sse_bicubic, count), v in zip(sums, dsr.config.out_vars, strict=True):
        s = dsr.std[v]
        scores[f"rmse_{v}"] = math.sqrt(sse / count) * s if count else math.nan
        scores[f"rmse_bicubic_{v}"] = math.sqrt(sse_bicubic / count) * s if count else math.nan
    return scores


def validation_sums(
    dsr: Downscaler,
    data: PairedArrays | Sequence[PairedArrays],
    *,
    tile: tuple[int, int] | None = None,
    halo: tuple[int, int] | None = None,
    device: str = "cpu",
    batch_size: int = 16,
) -> np.ndarray:
    """Per output variable: squared error of the model, of bicubic, valid pixels.

    A float64 array ``[V, 3]`` in normalized units (rows: ``config.out_vars``),
    to be added over time shards before `rmse_scores`.  The model is run by
    `xorbit.engine.downscale_array`, exactly as ``.orbit.downscale`` runs it
    (tiles, halo blending, periodic longitude, NaN masks), and bicubic is
    `xorbit.regrid.upsample_array`, as ``.orbit.interpolate`` computes it.
    Pixels where the truth or either prediction is missing are left out of
    both sums.  Data read sample by sample (`FieldStack`) are read and scored
    ``batch_size`` time steps at a time.  Several sets (grids of other
    resolutions) add their sums.
    """
    cfg = dsr.config
    total = np.zeros((len(cfg.out_vars), 3))
    if not isinstance(data, PairedArrays):
        for part in data:
            total += validation_sums(
                dsr, part, tile=tile, halo=halo, device=device, batch_size=batch_size
            )
        return total
    parts: Iterable[tuple[np.ndarray, np.ndarray]]
    if isinstance(data.coarse, np.ndarray):
        # loaded together: fine is an array too (asarray returns it as it is)
        parts = [(data.coarse, np.asarray(data.fine))] if len(data) else []
    else:
        step = max(1, int(batch_size))
        parts = (
            (np.asarray(p.coarse), np.asarray(p.fine))
            for p in (data.select(slice(i, i + step)) for i in range(0, len(data), step))
        )
    for coarse, fine in parts:
        total += _chunk_sums(
            dsr,
            coarse,
            fine,
            data.periodic,
            # models from before the embedding read the grid: their constant
            res_km=data.res_km if "res_km" in dsr.grid else None,
            tile=tile,
            halo=halo,
            device=device,
            batch_size=batch_size,
        )
    return total


def _chunk_sums(
    dsr: Downscaler,
    coarse: np.ndarray,
    fine: np.ndarray,
    periodic: bool,
    *,
    res_km: float | None = None,
    tile: tuple[int, int] | None,
    halo: tuple[int, int] | None,
    device: str,
    batch_size: int,
) -> np.ndarray:
    """`validation_sums` of normalized arrays in memory."""
    cfg = dsr.config
    in_mean, in_std = dsr._stats(cfg.in_vars, 4, 1)
    out_mean, out_std = dsr._stats(cfg.out_vars, 4, 1)
    coarse = coarse * in_std + in_mean  # physical units, NaN kept
    model = dsr.model
    was_training = model.training
    model.eval()  # in eval mode on its device the engine uses it as it is, no copy
    try:
        pred = downscale_array(
            coarse,
            dsr,
            tile=tile,
            halo=halo,
            periodic=periodic,
            batch_size=batch_size,
            device=device,
            # the weights change every epoch: no need to hash them for a cache key
            weights_sha256=f"validation-{id(model)}",
            res_km=res_km,
        )
    finally:
        model.train(was_training)
    out_idx = [cfg.in_vars.index(v) for v in cfg.out_vars]
    bicubic = upsample_array(coarse[:, out_idx], cfg.factor, "bicubic", periodic)
    return _error_sums((pred - out_mean) / out_std, (bicubic - out_mean) / out_std, fine)


def _error_sums(pred: np.ndarray, bicubic: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``[V, 3]``: sums of squared error of ``pred`` and ``bicubic``, and the pixel count
    where all three are finite."""
    out = np.zeros((truth.shape[1], 3))
    for i in range(truth.shape[1]):
        ok = np.isfinite(truth[:, i]) & np.isfinite(pred[:, i]) & np.isfinite(bicubic[:, i])
        target = truth[:, i][ok].astype(np.float64)
        out[i, 0] = np.sum((pred[:, i][ok] - target) ** 2)
        out[i, 1] = np.sum((bicubic[:, i][ok] - target) ** 2)
        out[i, 2] = np.count_nonzero(ok)
    return out


def _prefetched(load: Callable[[int], Any], n: int, depth: int) -> Generator[Any, None, None]:
    """``load(0), ..., load(n - 1)`` in order, up to ``depth`` of them read ahead
    in a background thread (reading the next batches from a store while the
    model trains on this one)."""
    if depth <= 0 or n <= 1:
        for i in range(n):
            yield load(i)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="xorbit-prefetch") as pool:
        pending = deque(pool.submit(load, i) for i in range(min(depth, n)))
        ahead = len(pending)
        try:
            while pending:
                done = pending.popleft()
                if ahead < n:
                    pending.append(pool.submit(load, ahead))
                    ahead += 1
                yield done.result()
        finally:
            for f in pending:
                f.cancel()


def _rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG: CPU, and every CUDA device's when training on CUDA."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda" and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(saved: Any, rank: int, seed: int) -> None:
    """Set this rank's RNG from a state's ``rng`` (a list indexed by rank)."""
    if isinstance(saved, torch.Tensor):
        # a state from before per-rank RNG: only rank 0's CPU generator was
        # saved; the other ranks seed as a fresh run does, so dropout draws of
        # those ranks differ from the uninterrupted run's
        saved = [{"cpu": saved}]
    if rank >= len(saved):
        # more ranks than the run that wrote the state: as a fresh run
        torch.manual_seed(seed + rank)
        return
    torch.set_rng_state(saved[rank]["cpu"])
    cuda = saved[rank].get("cuda", [])
    if cuda and torch.cuda.is_available():
        # a host with fewer devices restores those it has
        for i, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)


def _all_ranks(obj: Any, world_size: int) -> list[Any]:
    """``obj`` of every rank, indexed by rank (a collective: every rank calls it)."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _sum_over_ranks(sums: np.ndarray, world_size: int, device: torch.device) -> np.ndarray:
    """`validation_sums` added over all ranks (a collective: every rank calls it)."""
    if world_size == 1:
        return sums
    import torch.distributed as dist

    # on the training device: NCCL reduces CUDA tensors only
    total = torch.from_numpy(sums).to(device)
    dist.all_reduce(total)
    return total.cpu().numpy()


def _save_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training state written by `fit` (restricted unpickler: tensors only)."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no training state to resume from at {str(path)!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if SHARDED_KEY in state:  # where the shards are, for the ranks to read
        state[SHARDED_KEY] = str(path.parent.resolve() / state[SHARDED_KEY])
    return state


def fit(
    dsr: Downscaler,
    train: PairedCrops | CropMix,
    val: PairedArrays | Sequence[PairedArrays] | None,
    opts: TrainOptions,
    *,
    resume: dict[str, Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    stop_after: int | None = None,
) -> list[dict[str, float]]:
    """Train ``dsr.model`` in place; returns the per-epoch history.

    Parameters
    ----------
    dsr
        The model with its normalization (training mutates its weights).
    train, val
        Training crops; held-out whole fields (or None; or one set per grid).  With several ranks
        each validates every ``world_size``-th time step of ``val`` and the
        error sums are all-reduced: every rank must get the same ``val``.
    opts
        Hyper-parameters and run settings.
    resume
        A state from `load_state`: continue after its epoch, exactly.
    rank, world_size, wrap
        Set by `xorbit.training.distributed`: this rank's index, the number of
        ranks, and a function wrapping the model (DDP).  With a
        ``checkpoint_dir`` every rank must get it (all send their RNG state to
        rank 0, which alone writes).
    stop_after
        Stop after this epoch (counting from 1) as if killed: for tests.
    """
    dsr.config.check_ensemble(opts.ensemble)
    device = torch.device(opts.device)
    model = dsr.model.to(device).train()
    model.checkpoint_activations = bool(opts.checkpoint_activations)
    _freeze(dsr, model)  # before DDP, which registers the parameters that train
    if resume is not None and "model" in resume:
        set_model_state(model, resume["model"])  # every rank has the whole state
    net = wrap(model) if wrap is not None else model
    run = _Run.start(dsr, model, len(train), opts, world_size)
    if resume is not None:
        run.restore(resume, rank, opts, model)
    else:
        torch.manual_seed(opts.seed + rank)
    # a sharded model's forward is a collective: every rank validates every step
    vals = _validation_parts(val, opts, rank, 1 if run.sharded else world_size)
    ckpt_dir = Path(opts.checkpoint_dir) if opts.checkpoint_dir else None
    for epoch in range(run.start_epoch, opts.epochs):
        loss = _train_epoch(dsr, net, run, train, epoch, opts, rank, world_size, device)
        record = {"epoch": epoch + 1, "loss": loss, "lr": float(run.scheduler.get_last_lr()[0])}
        if any(len(v) for v in vals):
            record.update(_validate_epoch(dsr, model, run, vals, epoch, opts, rank, world_size))
        run.history.append(record)
        if ckpt_dir is not None:
            _checkpoint(dsr, model, run, ckpt_dir, epoch, rank, world_size, device)
        if stop_after is not None and epoch + 1 >= stop_after:
            model.eval()
            return run.history
    if run.best["model"] is not None or (run.sharded and run.best["epoch"]):
        # early stopping after the fact: the epoch that validated best (rank 0's
        # copy, sent to the others' shards)
        set_model_state(model, run.best["model"] or {})
        if ckpt_dir is not None:
            _save_downscaler(dsr, model, ckpt_dir / MODEL_FILE, rank)
    model.eval()
    return run.history


def _save_downscaler(dsr: Downscaler, model: torch.nn.Module, path: Path, rank: int) -> None:
    """Rank 0 saves ``dsr`` (a sharded model's weights gathered first: every rank calls)."""
    if not is_sharded(model):
        if rank == 0:
            dsr.save(path)
        return
    state = full_model_state(model)
    if rank == 0:
        whole_model_copy(dsr, state).save(path)


def whole_model_copy(dsr: Downscaler, state: dict[str, torch.Tensor]) -> Downscaler:
    """``dsr`` with an unsharded `Reslim` holding ``state`` (built on meta: no copy made)."""
    plain = hollow(dsr.model)
    plain.load_state_dict(state, assign=True)
    return dataclasses.replace(dsr, model=plain.eval())


def _freeze(dsr: Downscaler, model: torch.nn.Module) -> None:
    """Fix the pretrained parameters ``dsr.provenance`` lists as frozen."""
    frozen = set(dsr.provenance.get("frozen", ()))
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)


def param_groups(
    dsr: Downscaler, model: torch.nn.Module, opts: TrainOptions
) -> list[dict[str, Any]]:
    """The optimizer's groups: every parameter at ``lr``; for a fine-tuned model
    (``dsr.provenance``) those copied whole from the pretrained one in a second
    group at ``pretrained_lr_scale`` times it.  Each group carries its ``lr_scale``."""
    pretrained = set(dsr.provenance.get("pretrained", ()))
    if not pretrained:
        return [{"params": list(model.parameters()), "lr": opts.lr, "lr_scale": 1.0}]
    scale = float(opts.pretrained_lr_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"pretrained_lr_scale must be a positive number, got {scale}")
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n not in pretrained], "lr": opts.lr, "lr_scale": 1.0},
        {
            "params": [p for n, p in named if n in pretrained],
            "lr": opts.lr * scale,
            "lr_scale": scale,
        },
    ]


@dataclass
class _Run:
    """The state of one `fit`: optimizer, schedule, history, best epoch so far."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    local_batch: int
    warmup: int
    total: int
    var_weights: torch.Tensor
    sharded: bool = False  # the model is FSDP-sharded over the ranks
    history: list[dict[str, float]] = field(default_factory=list)
    start_epoch: int = 0
    best: dict[str, Any] = field(
        default_factory=lambda: {"score": math.inf, "epoch": 0, "model": None}
    )

    @classmethod
    def start(
        cls, dsr: Downscaler, model: torch.nn.Module, n: int, opts: TrainOptions, world_size: int
    ) -> _Run:
        """AdamW and warm-up + cosine for ``n`` training samples, the batches checked."""
        if opts.batch_size % world_size:
            raise ValueError(
                f"batch_size {opts.batch_size} is not divisible by the {world_size} ranks"
            )
        steps = n // opts.batch_size
        if steps < 1:
            raise ValueError(f"batch_size {opts.batch_size} exceeds the {n} training samples")
        total = steps * opts.epochs
        warmup = round(opts.warmup_epochs * steps)
        optimizer = torch.optim.AdamW(
            param_groups(dsr, model, opts), betas=opts.betas, weight_decay=opts.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_factor(s, warmup, total, opts.lr, opts.warmup_start_lr, opts.min_lr),
        )
        out_vars = dsr.config.out_vars
        unknown = sorted(set(opts.var_weights) - set(out_vars))
        if unknown:
            raise ValueError(f"var_weights names non-output variables {unknown}")
        weights = torch.tensor([opts.var_weights.get(v, 1.0) for v in out_vars])
        device = torch.device(opts.device)
        return cls(
            optimizer,
            scheduler,
            steps,
            opts.batch_size // world_size,
            warmup,
            total,
            weights.to(device),
            sharded=is_sharded(model),
        )

    def restore(
        self, resume: dict[str, Any], rank: int, opts: TrainOptions, model: torch.nn.Module
    ) -> None:
        """Continue a saved state exactly (a new peak lr keeps the schedule's shape)."""
        if SHARDED_KEY in resume:  # a sharded run's: model and optimizer from its shards
            load_sharded(model, self.optimizer, Path(resume[SHARDED_KEY]))
        else:
            load_optimizer_state(model, self.optimizer, resume["optimizer"])
        self.scheduler.load_state_dict(resume["scheduler"])
        # a resumed run may change the peak learning rate: the schedule keeps its
        # position and shape, scaled to the new peak
        groups = self.optimizer.param_groups
        if len(groups) == 2:  # fine-tuning: a new scale for the pretrained group applies
            groups[1]["lr_scale"] = float(opts.pretrained_lr_scale)
        self.scheduler.base_lrs = [opts.lr * g.get("lr_scale", 1.0) for g in groups]
        step = self.scheduler.last_epoch
        for group, base in zip(groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * lr_factor(
                step, self.warmup, self.total, opts.lr, opts.warmup_start_lr, opts.min_lr
            )
        _restore_rng(resume["rng"], rank, opts.seed)
        self.start_epoch = int(resume["epoch"])
        self.history = [dict(h) for h in resume["history"]]
        if "best" in resume:
            self.best = dict(resume["best"])
            if rank != 0:
                self.best["model"] = None  # only rank 0's weights are kept: spare the memory


def _validation_parts(
    val: PairedArrays | Sequence[PairedArrays] | None,
    opts: TrainOptions,
    rank: int,
    world_size: int,
) -> list[PairedArrays]:
    """The validation sets this rank scores: a fixed subsample (``val_steps``), its share."""
    vals = [] if val is None else [val] if isinstance(val, PairedArrays) else list(val)
    if opts.val_steps is not None and int(opts.val_steps) < 1:
        raise ValueError(f"val_steps must be a positive number of time steps, got {opts.val_steps}")
    for i, part in enumerate(vals):
        if opts.val_steps is not None and len(part) > opts.val_steps:
            # a fixed subsample, the same every epoch (and on every rank)
            keep = np.unique(np.linspace(0, len(part) - 1, max(1, int(opts.val_steps))).round())
            part = part.select(keep.astype(int))
        if world_size > 1:
            # every rank validates its share of the time steps (a rank that waited
            # for rank 0 to validate everything could time out its collective)
            part = part.select(slice(rank, None, world_size))
        vals[i] = part
    return vals


def _train_epoch(
    dsr: Downscaler,
    net: torch.nn.Module,
    run: _Run,
    train: PairedCrops | CropMix,
    epoch: int,
    opts: TrainOptions,
    rank: int,
    world_size: int,
    device: torch.device,
) -> float:
    """One pass over this rank's share of the epoch's permutation; the mean loss of all ranks."""
    cfg = dsr.config
    train.set_epoch(epoch)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(opts.seed + epoch))
    local = order.tolist()[rank::world_size]
    bar = None
    if opts.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=run.steps_per_epoch, desc=f"epoch {epoch + 1}/{opts.epochs}", leave=False)
    running = 0.0
    b = run.local_batch

    def load(s: int) -> Any:
        return train.batch(local[s * b : (s + 1) * b])

    batches = _prefetched(load, run.steps_per_epoch, opts.prefetch)
    model = dsr.model
    try:
        for step, (x, y, rows, res) in enumerate(batches):
            x, y = x.to(device), y.to(device)
            lw = rows.to(device) if opts.lat_weighted else None
            # the grid's spacing, as downscaling will give it (`_chunk_sums`);
            # the config's constant for a model that records none (NaN: unknown)
            known = "res_km" in dsr.grid and not bool(torch.isnan(res).any())
            res_km = res.to(device) if known else None
            loss = _loss(net, cfg, x, y, lw, res_km, opts, run.var_weights)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if opts.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), opts.clip_grad)
            run.optimizer.step()
            run.scheduler.step()
            running += float(loss.detach())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running / (step + 1):.4f}")
    finally:
        batches.close()  # stop reading ahead when a step raises
        if bar is not None:
            bar.close()
    # the mean over every rank's batches (each rank sees as many), the loss
    # one process with the global batch reports
    if world_size > 1:
        running = float(_sum_over_ranks(np.array([running]), world_size, device)[0])
    return running / (run.steps_per_epoch * world_size)


def _loss(
    net: torch.nn.Module,
    cfg: ReslimConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    lw: torch.Tensor | None,
    res_km: torch.Tensor | None,
    opts: TrainOptions,
    var_weights: torch.Tensor | None,
) -> torch.Tensor:
    """One batch's training loss: Bayesian TV, or with ``opts.ensemble`` members of
    a stochastic model (each sample repeated, fresh noise each) the fair CRPS."""
    m = opts.ensemble
    mirrored = bool(m) and cfg.mirrored
    kw: dict[str, Any] = {}
    if m:
        # mirrored: m / 2 draws and the member at zero noise, the last
        n = cfg.member_passes(m)
        x = x.repeat_interleave(n, dim=0)
        if res_km is not None and res_km.ndim:
            res_km = res_km.repeat_interleave(n)
        noise = torch.randn(x.shape[0], cfg.noise_channels, *x.shape[-2:], device=x.device)
        # antithetic members are a choice of the draw: they train on
        # independent ones (antithetic pairs in training lost the spread,
        # docs/evaluation.md)
        if mirrored:
            noise.unflatten(0, (-1, n))[:, -1] = 0
        kw["noise"] = noise
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        pred = net(x, cfg.in_vars, res_km=res_km, **kw)
    if m:
        members = pred.float().unflatten(0, (-1, n))
        if mirrored:
            members = mirror(members[:, :-1], members[:, -1:])
        return fair_crps_loss(
            members,
            y,
            lam=opts.tv_lambda,
            lat_weights=lw,
            var_weights=var_weights,
            paired=mirrored,
        )
    return bayesian_tv_loss(
        pred.float(), y, lam=opts.tv_lambda, lat_weights=lw, var_weights=var_weights
    )


def _validate_epoch(
    dsr: Downscaler,
    model: torch.nn.Module,
    run: _Run,
    vals: list[PairedArrays],
    epoch: int,
    opts: TrainOptions,
    rank: int,
    world_size: int,
) -> dict[str, float]:
    """Scores on the held-out sets (summed over ranks), and the best epoch kept."""
    device = torch.device(opts.device)
    sums = validation_sums(dsr, vals, tile=opts.tile, halo=opts.halo, device=opts.device)
    # the ranks of a sharded model each scored every step: nothing to add
    scores = rmse_scores(dsr, _sum_over_ranks(sums, 1 if run.sharded else world_size, device))
    # validation_sums put the model back in training mode
    # one number over all variables: RMSE relative to bicubic, averaged
    out_vars = dsr.config.out_vars
    score = float(np.mean([scores[f"rmse_{v}"] / scores[f"rmse_bicubic_{v}"] for v in out_vars]))
    # an ensemble's validation scores its zero-noise member, which says nothing
    # of the spread: no epoch is picked by it
    if opts.keep_best and not opts.ensemble and score < run.best["score"]:
        # rank 0 returns the weights; the others only track the epoch (the
        # shards of a sharded model are gathered by all)
        state = full_model_state(model) if rank == 0 or run.sharded else None
        run.best = {"score": score, "epoch": epoch + 1, "model": state if rank == 0 else None}
    return {**scores, "best_epoch": run.best["epoch"]}


def _checkpoint(
    dsr: Downscaler,
    model: torch.nn.Module,
    run: _Run,
    ckpt_dir: Path,
    epoch: int,
    rank: int,
    world_size: int,
    device: torch.device,
) -> None:
    """Rank 0 writes the Downscaler and the training state (every rank's RNG).

    Unsharded: ``state.pt`` holds the model and the optimizer whole, keyed by
    name.  Sharded: every rank writes its shards of both to
    ``state-<epoch>.dcp`` (`sharding.save_sharded`), then ``state.pt`` names that
    directory and the previous one is removed: a crash at any point leaves a
    ``state.pt`` whose directory is complete.
    """
    rngs = _all_ranks(_rng_state(device), world_size)  # a collective: every rank
    state: dict[str, Any] = {}
    if run.sharded:
        shards = ckpt_dir / f"state-{epoch + 1}.dcp"
        save_sharded(model, run.optimizer, shards)  # collectives: every rank
        state[SHARDED_KEY] = shards.name
    elif rank == 0:
        state["model"] = full_model_state(model, copy=False)
        state["optimizer"] = optimizer_state(model, run.optimizer)
    _save_downscaler(dsr, model, ckpt_dir / MODEL_FILE, rank)
    if rank != 0:
        return
    _save_state(
        ckpt_dir / STATE_FILE,
        {
            **state,
            "optimizer_groups": len(run.optimizer.param_groups),
            "scheduler": run.scheduler.state_dict(),
            "rng": rngs,
            "epoch": epoch + 1,
            "history": run.history,
            "config": dsr.config.to_dict(),
            "best": run.best,
        },
    )
    for old in ckpt_dir.glob("state-*.dcp"):
        if old.name != state.get(SHARDED_KEY):
            shutil.rmtree(old, ignore_errors=True)
