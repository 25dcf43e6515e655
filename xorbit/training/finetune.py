"""Starting from pretrained weights: `xorbit.train(..., init=, freeze=)`.

A pretrained model (a `Downscaler`, a saved ``.xorbit`` file or a `Reslim`
from `xorbit.model.checkpoint.import_orbit2`) decides the architecture; the
new data decide the variables, the normalization, the climatologies and the
linear path.  Weights move by name:

- each input the pretrained model knows keeps its token embedding and its row
  of ``var_embed``; new inputs (new static fields included) start fresh;
  inputs the new data lack are dropped;
- each output it knows keeps its rows of the head's last layer, of
  ``conv_out`` and of the residual upsampler (``path2``); new outputs start as
  a new model's do (a zero correction to the interpolation where the model
  has one, ``interp_skip`` not ``"none"``);
- the position table is resized to a new training window
  (`Reslim.position_embedding`, bicubic, as the reference does for other
  grids); a new grid spacing goes through the resolution embedding, read
  relative to the pretrained model's own ``res_km``;
- the linear path (`xorbit.model.linear`) is never copied: where the model
  has one it is fitted on the new data (and judged by the gate) like a new
  model's.

Parameters copied whole are "pretrained": ``freeze=`` can fix them, and they
train at ``pretrained_lr_scale`` times the learning rate of the others
(`TrainOptions`).  Parameters copied in part (a new variable's row) and new
ones train at the full rate.  What happened is recorded in
``Downscaler.provenance`` and shown by ``xorbit info``.
"""

from __future__ import annotations

import fnmatch
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model.config import ReslimConfig
from ..model.reslim import Reslim
from ..variables import COORDINATE_FIELDS

__all__ = [
    "FREEZE_GROUPS",
    "Pretrained",
    "default_config",
    "default_transforms",
    "finetune_config",
    "frozen_names",
    "pretrained",
    "provenance",
    "transfer",
]

# ``freeze=`` by name: the encoder is everything before the head
FREEZE_GROUPS: dict[str, tuple[str, ...]] = {
    "encoder": (
        "token_embeds.*",
        "var_embed",
        "var_query",
        "var_agg.*",
        "pos_embed",
        "spatial_embed.*",
        "leaf_embed",
        "blocks.*",
        "norm.*",
    ),
    "blocks": ("blocks.*",),
}
# config fields that the data decide: the variables, then what `train` sets
# from the data (the rest is the pretrained architecture)
_VARIABLES = ("in_vars", "out_vars", "static_vars")
_FROM_DATA = (*_VARIABLES, "linear_window", "linear_half", "res_km")


@dataclass
class Pretrained:
    """A pretrained network and where it came from (`pretrained`)."""

    model: Reslim
    source: str
    weights_sha256: str
    transforms: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> ReslimConfig:
        return self.model.config


def pretrained(init: Any) -> Pretrained:
    """``init`` as a `Pretrained`: a `Downscaler`, a `Reslim` (an imported ORBIT-2
    checkpoint) or the path of a saved ``.xorbit`` file."""
    from ..downscaler import Downscaler

    if isinstance(init, (str, os.PathLike)):
        source, dsr = str(Path(init)), Downscaler.load(init)
    elif isinstance(init, (Downscaler, Reslim)):
        source = type(init).__name__
        dsr = init if isinstance(init, Downscaler) else Downscaler(model=init)
    else:
        raise TypeError(
            "init must be a Downscaler, a Reslim (xorbit.model.checkpoint.import_orbit2) or the "
            f"path of a .xorbit file, got {type(init).__name__}"
        )
    return Pretrained(dsr.model, source, dsr.weights_sha256, dict(dsr.transforms))


def default_config(
    source: ReslimConfig, coarse_names: Sequence[str], fine_names: Sequence[str]
) -> ReslimConfig:
    """The variables to fine-tune on when no config is given: the pretrained
    model's dynamic inputs that the coarse data have (or that are made from the
    coordinates, `xorbit.variables.COORDINATE_FIELDS`), then the fine data's
    other variables; the fine data's variables as outputs."""
    known = [
        v
        for v in source.in_vars
        if v not in source.static_vars and (v in coarse_names or v in COORDINATE_FIELDS)
    ]
    return source.replace(
        in_vars=[*known, *(v for v in fine_names if v not in known)],
        out_vars=list(fine_names),
        static_vars=[],
    )


def default_transforms(source: Pretrained, config: ReslimConfig) -> dict[str, str]:
    """The pretrained model's transforms of the variables ``config`` keeps
    (its weights were learnt on them)."""
    keep = {*config.in_vars, *config.out_vars}
    return {v: t for v, t in source.transforms.items() if v in keep}


def finetune_config(source: ReslimConfig, wanted: ReslimConfig, explicit: bool) -> ReslimConfig:
    """The pretrained architecture over ``wanted``'s variables (a fresh linear path).

    ``explicit``: ``wanted`` was the caller's (not the default one): its
    ``img_size`` is the new training window, and architecture fields that
    differ from the pretrained ones are named in a warning (they are ignored).
    """
    changes: dict[str, Any] = {f: getattr(wanted, f) for f in _VARIABLES}
    changes.update(linear_window=None, linear_half=None)
    if explicit:
        changes["img_size"] = tuple(wanted.img_size)
        theirs, ours = source.to_dict(), wanted.to_dict()
        ignored = sorted(
            k for k in theirs if k not in (*_FROM_DATA, "img_size") and theirs[k] != ours.get(k)
        )
        if ignored:
            warnings.warn(
                f"init= decides the architecture: config's {ignored} differ from the pretrained "
                "model's and are ignored (config names the variables and the window only)",
                UserWarning,
                stacklevel=3,
            )
    return source.replace(**changes)


def _rows(keys_from: Sequence[Any], keys_to: Sequence[Any]) -> tuple[list[int], list[int]]:
    """Indices of the keys both sides have: (from, to)."""
    at = {k: i for i, k in enumerate(keys_from)}
    pairs = [(at[k], j) for j, k in enumerate(keys_to) if k in at]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _copy_indexed(
    dst: torch.Tensor, src: torch.Tensor, maps: dict[int, tuple[list[int], list[int]]]
) -> None:
    """``dst[to...] = src[from...]`` along the leading axes in ``maps`` (any devices)."""
    sub = src
    for axis, (fr, _) in maps.items():
        sub = sub.index_select(axis, torch.tensor(fr, dtype=torch.long, device=src.device))
    index: list[Any] = [slice(None)] * dst.ndim
    axes = sorted(maps)
    for n, axis in enumerate(axes):
        shape = [1] * len(axes)
        shape[n] = -1
        to = torch.tensor(maps[axis][1], dtype=torch.long, device=dst.device)
        index[axis] = to.reshape(shape)
    dst[tuple(index)] = sub.to(device=dst.device, dtype=dst.dtype)


def _variable_axes(model: Reslim) -> dict[str, dict[int, list[Any]]]:
    """Per parameter whose rows belong to variables: the key of each index, by axis."""
    c = model.config
    n_head = len(model.head) - 1
    pixels = (c.factor * c.patch_size) ** 2
    head_rows = [(p, v) for p in range(pixels) for v in c.out_vars]  # n_out fastest
    out, res = list(c.out_vars), [*c.out_vars, *c.static_vars, *model.noise_vars]
    return {
        "var_embed": {1: [*c.in_vars, *model.noise_vars]},
        f"head.{n_head}.weight": {0: head_rows},
        f"head.{n_head}.bias": {0: head_rows},
        "conv_out.weight": {0: out, 1: out},
        "conv_out.bias": {0: out},
        "path2.0.weight": {1: res},
        "path2.3.weight": {0: out},
        "path2.3.bias": {0: out},
    }


def transfer(src: Reslim, dst: Reslim) -> dict[str, str]:
    """Copy ``src``'s weights into ``dst`` by name; what became of each parameter.

    Returns ``{name: "pretrained" | "partial" | "new"}`` for ``dst``'s
    parameters: copied whole, copied for the variables both know, or left as
    initialized.  The linear path and the gate are never copied.
    """
    # on the CPU, whatever device each model is on (a model trained on CUDA stays there)
    theirs = {k: v.detach().cpu() for k, v in src.state_dict().items()}
    grid_from = src.token_grid(src.config.img_size)
    grid_to = dst.token_grid(dst.config.img_size)
    axes_dst, axes_src = _variable_axes(dst), _variable_axes(src)
    status: dict[str, str] = {}
    src_tok = {v: j for j, v in enumerate([*src.config.in_vars, *src.noise_vars])}
    dst_tok = [*dst.config.in_vars, *dst.noise_vars]
    with torch.no_grad():
        # parameters only: the linear path and the gate are buffers, never copied
        for name, param in dst.named_parameters():
            key = name
            if name.startswith("token_embeds."):
                _, j, rest = name.split(".", 2)
                var = dst_tok[int(j)]
                key = f"token_embeds.{src_tok[var]}.{rest}" if var in src_tok else ""
            if name in axes_dst:
                maps = {
                    axis: _rows(axes_src[name][axis], keys) for axis, keys in axes_dst[name].items()
                }
                if not all(fr for fr, _ in maps.values()):
                    status[name] = "new"
                    continue
                _copy_indexed(param.data, theirs[name], maps)
                whole = all(len(to) == param.shape[a] for a, (_, to) in maps.items())
                status[name] = "pretrained" if whole else "partial"
            elif name == "pos_embed" and grid_from != grid_to:
                # another window (the same number of tokens on another grid too)
                table = src.position_embedding(grid_to).detach().cpu()
                param.copy_(table.to(param.dtype))
                status[name] = "pretrained"
            elif key in theirs and theirs[key].shape == param.shape:
                param.copy_(theirs[key].to(param.device))
                status[name] = "pretrained"
            else:
                status[name] = "new"
    return status


def frozen_names(status: dict[str, str], freeze: str | Sequence[str] | None) -> list[str]:
    """The pretrained parameters ``freeze`` names ("encoder", "blocks" or name patterns).

    Only parameters copied whole are frozen: a new input's embedding trains
    even under ``freeze="encoder"``.  A pattern that matches no parameter is
    an error (it names it).
    """
    if freeze is None:
        return []
    if isinstance(freeze, str):
        if freeze not in FREEZE_GROUPS:
            raise ValueError(
                f"freeze={freeze!r}: give one of {sorted(FREEZE_GROUPS)} or a list of "
                "parameter-name patterns (fnmatch, e.g. ['blocks.0.*'])"
            )
        patterns: Sequence[str] = FREEZE_GROUPS[freeze]
        strict = False
    else:
        patterns, strict = list(freeze), True
    names = []
    for pattern in patterns:
        hits = [n for n in status if fnmatch.fnmatchcase(n, pattern)]
        if strict and not hits:
            raise ValueError(f"freeze pattern {pattern!r} matches no parameter of the model")
        names += [n for n in hits if status[n] == "pretrained"]
    return sorted(set(names))


def provenance(
    source: Pretrained,
    status: dict[str, str],
    frozen: Sequence[str],
    freeze: str | Sequence[str] | None,
    lr_scale: float,
) -> dict[str, Any]:
    """The record kept in ``Downscaler.provenance`` (saved with the model)."""
    return {
        "init": source.source,
        "init_weights_sha256": source.weights_sha256,
        "init_in_vars": list(source.config.in_vars),
        "init_out_vars": list(source.config.out_vars),
        "pretrained": sorted(n for n, s in status.items() if s == "pretrained"),
        "partial": sorted(n for n, s in status.items() if s == "partial"),
        "new": sorted(n for n, s in status.items() if s == "new"),
        "freeze": freeze if freeze is None or isinstance(freeze, str) else list(freeze),
        "frozen": list(frozen),
        "pretrained_lr_scale": float(lr_scale),
        "normalization": "mean, std and climatologies from the fine-tuning data",
    }
