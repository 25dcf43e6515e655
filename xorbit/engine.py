"""Run a Reslim over one numpy block: tiles → batches → device → weighted partial.

No xarray here.  `predict_block` takes a block of normalized coarse fields
``[..., C, ny + 2 hy, nx + 2 hx]`` (the core plus the tile halo on each side),
runs every tile the block owns through the model in batches, and returns the
block's weighted *partial* ``[..., V_out, (ny + 2 hy) k, (nx + 2 hx) k]`` that
`xorbit.tiles.fold` completes with the neighbours' strips.

`ModelHandle` is how a model reaches Dask tasks: the task graph holds one
handle (one key every task depends on), and a handle that is pickled to
another process carries the weights once and rebuilds the model once per
process and device (`get`), however many tasks use it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .model.checkpoint import weights_hash
from .model.config import ReslimConfig
from .model.reslim import Reslim
from .tiles import TilePlan, merge, split

__all__ = ["ModelHandle", "default_device", "predict_block", "run_model"]

_CACHE: OrderedDict[tuple[str, str], Reslim] = OrderedDict()
_CACHE_SIZE = 4
_LOCK = threading.Lock()


def default_device() -> str:
    """``"cuda"`` when a GPU is visible to torch, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class ModelHandle:
    """A picklable reference to a `Reslim` model.

    In the process that made it, the handle points at the live model (nothing
    copied).  Pickled, it carries the config and the weights as safetensors
    bytes; unpickled, it rebuilds the model at most once per process.
    """

    def __init__(self, model: Reslim, weights_sha256: str | None = None) -> None:
        # the config is part of the key: equal weights under other variable names
        # are another model.  Pass the weights' hash when it is already known:
        # hashing a large model's weights is not free.
        config = json.dumps(model.config.to_dict(), sort_keys=True)
        weights = weights_sha256 or weights_hash(model.state_dict())
        self.key = hashlib.sha256((config + weights).encode()).hexdigest()
        self._model: Reslim | None = model
        self._payload: tuple[dict[str, Any], bytes] | None = None

    def __repr__(self) -> str:
        return f"ModelHandle({self.key[:12]})"

    def __reduce__(self):
        model = self._model
        if model is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            payload = (model.config.to_dict(), st_save(state))
        else:
            payload = self._payload
        return _rebuild_handle, (self.key, payload)

    def get(self, device: str | torch.device = "cpu") -> Reslim:
        """The model on ``device`` in eval mode, built once per process."""
        dev = str(torch.device(device))
        with _LOCK:
            model = _CACHE.get((self.key, dev))
            if model is not None:
                _CACHE.move_to_end((self.key, dev))
                return model
            if self._model is not None:
                base = self._model
            else:
                config, data = self._payload
                base = Reslim(ReslimConfig.from_dict(config))
                base.load_state_dict(st_load(data))
            model = base if str(_device_of(base)) == dev else _copy_to(base, dev)
            model.eval()
            _CACHE[(self.key, dev)] = model
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
            return model


def _rebuild_handle(key: str, payload: tuple[dict[str, Any], bytes]) -> ModelHandle:
    handle = ModelHandle.__new__(ModelHandle)
    handle.key, handle._model, handle._payload = key, None, payload
    return handle


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _copy_to(model: Reslim, device: str) -> Reslim:
    clone = Reslim(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.to(device)


def run_model(
    model: Reslim,
    x: np.ndarray,
    variables: Sequence[str],
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Model forward over ``x [N, C, h, w]`` in batches; float32 numpy out."""
    dev = torch.device(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    outs = []
    with torch.inference_mode(), amp:
        for i in range(0, x.shape[0], max(1, int(batch_size))):
            xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])).to(dev)
            outs.append(model(xb, variables).float().cpu().numpy())
    return np.concatenate(outs, axis=0)


def predict_block(
    block: np.ndarray,
    *,
    handle: ModelHandle,
    plan: TilePlan,
    origin: tuple[int, int],
    core_shape: tuple[int, int],
    variables: Sequence[str],
    batch_size: int = 16,
    device: str = "cpu",
) -> np.ndarray:
    """Weighted partial of one block (see the module docstring).

    Parameters
    ----------
    block
        ``[..., C, ny + 2 hy, nx + 2 hx]`` normalized, NaN-free coarse fields.
    handle
        The model.
    plan
        The global tile plan.
    origin
        Global coarse index of the block core's first row and column.
    core_shape
        ``(ny, nx)`` of the block core.
    variables
        Names of the ``C`` channels.
    """
    model = handle.get(device)
    lead = block.shape[:-3]
    c, ny_ext, nx_ext = block.shape[-3:]
    flat = block.reshape(-1, c, ny_ext, nx_ext).astype(np.float32, copy=False)
    tiles = plan.owned(origin[0], origin[0] + core_shape[0], origin[1], origin[1] + core_shape[1])
    windows = np.stack(list(split(flat, plan, origin, tiles)))  # [T, B, C, wy, wx]
    t, b = windows.shape[:2]
    pred = run_model(
        model,
        windows.reshape(t * b, *windows.shape[2:]),
        variables,
        batch_size=batch_size,
        device=device,
    )
    pred = pred.reshape(t, b, *pred.shape[1:])
    partial = merge(list(pred), plan, origin, tiles, core_shape, dtype=np.float32)
    return partial.reshape(*lead, *partial.shape[1:])
