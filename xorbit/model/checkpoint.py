"""Saving and loading Reslim models without pickle.

An xorbit checkpoint is one safetensors file: the weights as tensors, and in the
file's string metadata a JSON document with the config, the xorbit version, a
SHA-256 of the weights and whatever else the caller adds (variable units,
normalization statistics, ...).  Loading parses JSON and raw tensors only:
nothing is ever unpickled, and a weight file that was altered after writing
fails the hash check instead of giving wrong numbers.

`import_orbit2` reads a checkpoint of the published ORBIT-2 code (a
``torch.save`` dictionary beside a YAML config).  That one format is pickle
based; it is read with ``torch.load(weights_only=True)``, which refuses
arbitrary objects.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._files import atomic_write
from .._version import __version__
from .config import ReslimConfig
from .reslim import Reslim

__all__ = [
    "CheckpointError",
    "import_orbit2",
    "load_checkpoint",
    "save_checkpoint",
    "weights_hash",
]

FORMAT = "xorbit-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not match its model."""


def weights_hash(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of a state dict."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(
    path: str | os.PathLike, model: Reslim, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model`` (weights + config) and JSON-able ``extra`` metadata atomically.

    Returns the path written.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "xorbit_version": __version__,
        "config": model.config.to_dict(),
        "weights_sha256": weights_hash(state),
        "extra": dict(extra or {}),
    }
    try:
        text = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"checkpoint metadata is not JSON-serialisable: {err}") from err
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"xorbit": text}))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without loading its weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("xorbit")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{str(path)!r} is not a readable xorbit checkpoint (safetensors said: {err})"
        ) from err
    if raw is None:
        raise CheckpointError(
            f"{str(path)!r} is a safetensors file but carries no xorbit metadata; "
            "for published ORBIT-2 checkpoints use xorbit.model.checkpoint.import_orbit2"
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{str(path)!r}: xorbit metadata is not valid JSON ({err})") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r}: unknown checkpoint format {meta.get('format')!r}")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} was written by xorbit {meta.get('xorbit_version')} in checkpoint "
            f"format {meta['format_version']}; this xorbit ({__version__}) reads up to "
            f"{FORMAT_VERSION}: upgrade xorbit"
        )
    return meta


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[Reslim, dict[str, Any]]:
    """Rebuild a model from a checkpoint written by `save_checkpoint`.

    Returns
    -------
    tuple of (Reslim, dict)
        (model, metadata): the model in eval mode on ``map_location`` and the full
        metadata dictionary (``metadata["extra"]`` is what the writer added).

    Raises
    ------
    FileNotFoundError
        If there is no file.
    CheckpointError
        If the file is not an xorbit checkpoint, is corrupted (hash mismatch), or
        its weights do not fit the model its config describes.
    """
    meta = read_metadata(path)
    try:
        # before xorbit 0.2 a config without interp_skip meant none (now bicubic)
        config = ReslimConfig.from_dict({"interp_skip": "none", **meta["config"]})
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{str(path)!r}: invalid model config in metadata: {err}") from err
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{str(path)!r}: weights cannot be read ({err})") from err
    expected = meta.get("weights_sha256")
    if expected is not None and weights_hash(state) != expected:
        raise CheckpointError(
            f"{str(path)!r}: weights do not match the hash recorded when the checkpoint was "
            "written; the file is corrupted"
        )
    model = Reslim(config)
    load_state(model, state, source=str(path))
    return model.to(map_location).eval(), meta


def load_state(model: Reslim, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with an error that lists what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(f"shape mismatch {wrong[:5]}{' ...' if len(wrong) > 5 else ''}")
        raise CheckpointError(
            f"{source}: weights do not fit a Reslim of this config: " + "; ".join(parts)
        )
    model.load_state_dict(state, strict=True)


def import_orbit2(
    checkpoint: str | os.PathLike,
    config_yaml: str | os.PathLike,
    *,
    in_vars: Sequence[str],
    out_vars: Sequence[str],
    static_vars: Sequence[str] = (),
    res_km: float = 111.0,
) -> Reslim:
    """Load a checkpoint of the published ORBIT-2 code into a `Reslim`.

    Parameters
    ----------
    checkpoint
        ``torch.save`` file holding ``model_state_dict``.
    config_yaml
        The YAML config written beside it (``model:`` keys ``superres_mag``,
        ``cnn_ratio``, ``patch_size``, ``embed_dim``, ``depth``, ``decoder_depth``,
        ``num_heads``, ``mlp_ratio``, ``drop_path``, ``drop_rate``).
    in_vars, out_vars, static_vars
        Variable names in the order the published model was trained with.

    Notes
    -----
    The training grid is recovered from ``pos_embed`` the way the reference does
    it: ``L`` tokens on a grid twice as wide as high.
    """
    with open(config_yaml) as f:
        ycfg = yaml.safe_load(f) or {}
    m = ycfg.get("model", ycfg)
    try:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{str(checkpoint)!r} cannot be read as a torch checkpoint: {err}"
        ) from err
    state = obj.get("model_state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or "pos_embed" not in state:
        raise CheckpointError(f"{str(checkpoint)!r} holds no ORBIT-2 model_state_dict")
    n_tok = state["pos_embed"].shape[1]
    gh = round(math.sqrt(n_tok / 2))
    if 2 * gh * gh != n_tok:
        raise CheckpointError(
            f"{str(checkpoint)!r}: pos_embed has {n_tok} tokens, not a 1:2 grid as the "
            "reference assumes"
        )
    p = int(m.get("patch_size", 2))
    config = ReslimConfig(
        in_vars=list(in_vars),
        out_vars=list(out_vars),
        static_vars=list(static_vars),
        factor=int(m.get("superres_mag", 4)),
        img_size=(gh * p, 2 * gh * p),
        patch_size=p,
        cnn_ratio=int(m.get("cnn_ratio", 4)),
        embed_dim=int(m.get("embed_dim", state["pos_embed"].shape[-1])),
        depth=int(m.get("depth", 6)),
        decoder_depth=int(m.get("decoder_depth", 4)),
        num_heads=int(m.get("num_heads", 4)),
        mlp_ratio=float(m.get("mlp_ratio", 4.0)),
        drop_path=float(m.get("drop_path", 0.1)),
        drop_rate=float(m.get("drop_rate", 0.1)),
        res_km=res_km,
        res_embed="km",
        unpatchify="reference",
        interp_skip="none",
        learn_pos_embed=False,
    )
    model = Reslim(config)
    load_state(model, state, source=str(checkpoint))
    return model.eval()
