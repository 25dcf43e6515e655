"""MC dropout: draw dropout masks in an eval-mode model, one seeded generator per sample.

`mc_dropout(model, seeds)` is a context manager: inside it, every ``nn.Dropout``
and `xorbit.model.reslim.DropPath` of ``model`` with a non-zero rate drops
units as in training, while everything else (LayerNorm, the model's mode)
stays as in evaluation.  Sample ``i`` of each batch draws its masks from its own
``torch.Generator`` seeded with ``seeds[i]``, in the order the layers run, so
its output depends on its seed and its input only, never on which other
samples share its batch.  Pure torch: the engine chooses the seeds.

The hooks are registered on the model's modules once, for as long as any
thread samples with that model, and act only in the threads that asked for
them: a model shared by the tasks of a threaded scheduler may run
deterministically in one thread while another samples.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .reslim import DropPath

__all__ = ["dropout_layers", "mc_dropout"]

_LOCK = threading.Lock()
# per model (by id; the model is held so its id cannot be reused): the hook
# handles and how many contexts use them
_HOOKED: dict[int, tuple[nn.Module, list, int]] = {}
_ACTIVE = threading.local()  # .state = (id(model), [generators]) in a sampling thread


def dropout_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` that drop anything: Dropout / DropPath with a rate > 0."""
    return [m for m in model.modules() if isinstance(m, (nn.Dropout, DropPath)) and float(m.p) > 0]


@contextmanager
def mc_dropout(model: nn.Module, seeds: Sequence[int]) -> Iterator[None]:
    """Sample dropout masks in ``model`` (in eval mode) for a batch of ``len(seeds)``.

    Parameters
    ----------
    model
        A model in eval mode (a training-mode model already drops, so sampling
        again would drop twice).
    seeds
        One non-negative integer per sample of the next forward passes' batch.
        Each sample's generator is made when the context opens: every forward
        inside the context continues the same streams.

    Raises
    ------
    ValueError
        If ``model`` is in training mode or has no dropout layer with a rate > 0;
        at forward time (RuntimeError) if a dropout layer sees a batch of another
        size than ``len(seeds)``.
    """
    if model.training:
        raise ValueError("mc_dropout needs a model in eval mode; call model.eval() first")
    layers = dropout_layers(model)
    if not layers:
        raise ValueError("mc_dropout: the model has no dropout layer with a non-zero rate")
    # the masks are drawn where the model runs (CUDA generators for a model on GPU)
    device = next(model.parameters(), torch.empty(0)).device
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    key = id(model)
    previous = getattr(_ACTIVE, "state", None)
    _acquire(model, layers)
    _ACTIVE.state = (key, gens)
    try:
        yield
    finally:
        _ACTIVE.state = previous
        _release(key)


def _acquire(model: nn.Module, layers: list[nn.Module]) -> None:
    key = id(model)
    with _LOCK:
        if key in _HOOKED:
            held, handles, count = _HOOKED[key]
            _HOOKED[key] = (held, handles, count + 1)
            return
        handles = [m.register_forward_hook(_hook(key)) for m in layers]
        _HOOKED[key] = (model, handles, 1)


def _release(key: int) -> None:
    # the hooks go under the lock: removed after it, another thread could
    # register a second set first and drop every unit twice in the meantime
    with _LOCK:
        held, handles, count = _HOOKED[key]
        if count > 1:
            _HOOKED[key] = (held, handles, count - 1)
            return
        del _HOOKED[key]
        for h in handles:
            h.remove()


def _hook(key: int):
    # registered on the Dropout and DropPath layers only (see mc_dropout)
    def hook(
        module: nn.Dropout | DropPath, args: tuple, output: torch.Tensor
    ) -> torch.Tensor | None:
        state = getattr(_ACTIVE, "state", None)
        if state is None or state[0] != key or module.training:
            return None  # another thread, another model, or training's own dropout
        x = args[0]
        gens = state[1]
        if x.shape[0] != len(gens):
            raise RuntimeError(
                f"mc_dropout: a {type(module).__name__} saw a batch of {x.shape[0]} samples "
                f"but {len(gens)} seeds were given"
            )
        keep = 1.0 - float(module.p)
        # DropPath drops a whole residual branch per sample, Dropout single units
        shape = (1,) * (x.ndim - 1) if isinstance(module, DropPath) else tuple(x.shape[1:])
        u = torch.stack([torch.rand(shape, generator=g, device=x.device) for g in gens])
        return x * ((u < keep).to(x.dtype) / keep)

    return hook
