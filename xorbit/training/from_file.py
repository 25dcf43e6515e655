"""Training described by a YAML file: what ``xorbit train CONFIG.yaml`` runs.

The file names the fine data (and optionally the coarse data; else the fine
data are cell-averaged), the variables, the model and the training options::

    fine: hadcm3.nc            # paths relative to the YAML file
    variables: [air_temperature]
    model: {preset: tiny, factor: 4, img_size: [9, 12]}
    train: {epochs: 40, lr: 3.0e-3, transforms: {pr: log1p}}
    static: orography.nc       # optional: static fields on the coarse or fine grid
    init: pretrained.xorbit    # optional: fine-tune this model (`xorbit.train(init=)`)
    output: model.xorbit

The command line (``xorbit train CONFIG --epochs 40 --transform pr=log1p
--static FILE --init M0 --freeze blocks --output M``) overrides the file's entries.
With ``init`` the model section's ``preset`` is not used: the architecture
is the pretrained model's, over the file's variables.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..downscaler import Downscaler
from ..io import open_dataset, open_static
from ..model.checkpoint import read_metadata
from ..model.config import ReslimConfig
from ..variables import select
from . import train
from .samples import coarsen

__all__ = ["train_from_file"]


def train_from_file(
    path: str | os.PathLike,
    *,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    static: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
) -> tuple[Downscaler, Path]:
    """Train as the YAML file at ``path`` says and save the model; returns it and its path.

    ``overrides`` replace entries of the file's ``train`` section (a
    ``transforms`` mapping is merged into the file's); ``static`` (a
    netCDF/zarr path) replaces its ``static`` entry and ``output`` its
    ``output``.  Paths given here are taken as given, the file's relative to it.

    Raises
    ------
    FileNotFoundError
        If the file, or a data file it names, does not exist.
    ValueError, KeyError
        For a file without ``variables``, or variables the data do not hold.
    """
    cfg_path = Path(path)
    if not cfg_path.exists():
        raise FileNotFoundError(f"no such config file: {path}")
    spec: dict[str, Any] = yaml.safe_load(cfg_path.read_text()) or {}
    base = cfg_path.parent
    if "fine" not in spec:
        raise ValueError(f"{path}: the config needs 'fine' (the high-resolution data)")
    fine = open_dataset(base / spec["fine"])
    model = dict(spec.get("model", {}))
    preset = model.pop("preset", "tiny")
    init, pre = _pretrained(spec, overrides or {}, base)
    given = model.pop("factor", spec.get("factor"))
    factor = int(given if given is not None else (pre.factor if pre is not None else 4))
    if pre is not None and factor != pre.factor:
        raise ValueError(
            f"{path}: factor {factor} differs from the pretrained model's ({pre.factor}, "
            f"{str(init)!r}); a fine-tuned model keeps its factor"
        )
    out_vars = model.pop("out_vars", spec.get("variables"))
    if not out_vars:
        raise ValueError("the config needs 'variables' (the variables to downscale)")
    fine = select(fine, out_vars, where=str(spec["fine"]))
    if spec.get("coarse"):
        coarse = open_dataset(base / spec["coarse"])
    else:
        coarse = coarsen(fine, factor)
        # rows and columns beyond a multiple of the factor have no coarse parent
        fine = fine.isel(
            {
                d: slice(0, coarse.sizes[d] * factor)
                for d in coarse.dims
                if d in fine.dims and fine.sizes[d] != coarse.sizes[d]
            }
        )
    in_vars = model.pop("in_vars", list(out_vars) + list(model.get("static_vars", [])))
    options = dict(spec.get("train", {}))
    for key, value in (overrides or {}).items():
        if key == "transforms":
            value = {**dict(options.get("transforms") or {}), **value}
        options[key] = value
    if pre is not None:
        options["init"] = init
        statics = list(model.pop("static_vars", []))
        cfg = pre.replace(in_vars=in_vars, out_vars=out_vars, static_vars=statics, **model)
    else:
        cfg = ReslimConfig.preset(
            preset, factor=factor, in_vars=in_vars, out_vars=out_vars, **model
        )
    static_path = static if static is not None else spec.get("static")
    if static_path is not None:
        options["static"] = open_static(static_path if static is not None else base / static_path)
    dsr = train(coarse, fine, cfg, progress=progress, **options)
    out = Path(output) if output is not None else base / spec.get("output", "model.xorbit")
    dsr.save(out)
    return dsr, out


def _pretrained(
    spec: dict[str, Any], overrides: dict[str, Any], base: Path
) -> tuple[Path | None, ReslimConfig | None]:
    """The model to fine-tune (``--init``, else ``init`` in the file or its
    ``train`` section, relative to the file) and its config; ``(None, None)``."""
    init = overrides.get("init") or (spec.get("train") or {}).get("init") or spec.get("init")
    if init is None:
        return None, None
    where = Path(init) if "init" in overrides else base / init
    return where, ReslimConfig.from_dict(read_metadata(where)["config"])
