"""`Downscaler`: a Reslim model with everything needed to apply it to real fields.

A bare model maps normalized tensors to normalized tensors.  A `Downscaler`
adds the per-variable normalization statistics, the units the model works in,
the CF attributes of its outputs and which outputs are physically non-negative.
It is what `xorbit.train` returns, what `.orbit.downscale` takes and what
`save` / `xorbit.load` write and read (one safetensors file, no pickle).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from . import transforms as _transforms
from .fields import decode, encode
from .grid import unwrap_longitude
from .model.checkpoint import load_checkpoint, save_checkpoint, weights_hash
from .model.config import ReslimConfig
from .model.constraints import KINDS
from .model.reslim import Reslim

__all__ = ["Downscaler", "check_constraints", "load", "training_grid"]


@dataclass
class Downscaler:
    """A trained (or freshly initialized) model plus its variable metadata.

    Parameters
    ----------
    model
        The `Reslim` network.
    mean, std
        Normalization per variable name (every input variable).
    units
        Units string per variable as the model sees them (``None``: unknown).
    attrs
        CF attributes (``standard_name``, ``long_name``, ...) per output variable,
        copied onto downscaled results.
    nonnegative
        Output variables clamped at zero after denormalization (precipitation).
    history
        Per-epoch training record (loss, validation RMSE) when trained.
    grid
        Facts about the coarse grid it was trained on (`training_grid`):
        ``y_ascending`` / ``x_ascending`` (coordinate order), ``dy`` / ``dx``
        (spacing in the coordinates' units), ``multi_resolution``, ``window``
        (the coarse size of the training crops).  Downscaling
        flips inputs to the training orientation and back, and warns on a
        spacing far from the training one.  Empty for models saved before
        xorbit 0.2 (then inputs are used as they come).
    input_climatology, output_climatology
        Per-pixel training means (`xorbit.fields`) by variable name: the model
        works on anomalies from them.  Downscaling subtracts the first from
        each input (on the coarse grid) and adds the second to each output (on
        the fine grid), both matched by coordinate value; data outside their
        domain is refused.  Empty: the model sees the fields as they are.
    static
        Static fields stored with the model (orography, land-sea mask, ...),
        by name, on the coarse or the fine grid; ``static_packing`` says which
        (``"coarse"`` or ``"fine"``).  A fine field enters the model as
        ``factor²`` coarse channels ``name[i,j]`` (`xorbit.fields.pack`).
        ``static=`` at downscale replaces them.
    transforms
        Variables the model sees transformed (`xorbit.transforms`), by name:
        ``{"pr": "log1p"}``.  Their ``units`` are the transform's (``mm/day``);
        downscaling applies the transform to such inputs and its inverse to
        such outputs.
    constraints
        Coarse-consistency constraint per output variable
        (`xorbit.model.constraints`): ``"multiplicative"`` or ``"additive"``;
        ``.orbit.downscale`` applies them by default (``constrain=``).
        `xorbit.train` sets `constraint_kinds` (multiplicative for
        non-negative outputs, additive for the others) for the outputs whose
        coarse training data are cell averages of the fine ones.
    provenance
        Where the weights came from when training started from a pretrained
        model (`xorbit.training.finetune.provenance`): the file or object and
        its weights' hash, which parameters were copied whole, in part or
        new, which were frozen.  Empty for a model trained from scratch.
    """

    model: Reslim
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    units: dict[str, str | None] = field(default_factory=dict)
    attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    nonnegative: list[str] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    grid: dict[str, Any] = field(default_factory=dict)
    input_climatology: dict[str, xr.DataArray] = field(default_factory=dict)
    output_climatology: dict[str, xr.DataArray] = field(default_factory=dict)
    static: dict[str, xr.DataArray] = field(default_factory=dict)
    static_packing: dict[str, str] = field(default_factory=dict)
    transforms: dict[str, str] = field(default_factory=dict)
    constraints: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def constraint_kinds(self) -> dict[str, str]:
        """The coarse-consistency constraint that suits each output variable:
        ``"multiplicative"`` for the non-negative ones, ``"additive"`` for the others."""
        return {
            v: "multiplicative" if v in self.nonnegative else "additive"
            for v in self.config.out_vars
        }

    def __post_init__(self) -> None:
        self.transforms = _transforms.check(
            self.transforms, [*self.config.in_vars, *self.config.out_vars]
        )
        for v in self.config.in_vars:
            self.mean.setdefault(v, 0.0)
            self.std.setdefault(v, 1.0)
            self.units.setdefault(v, None)
        bad = [v for v, s in self.std.items() if not (np.isfinite(s) and s > 0)]
        if bad:
            raise ValueError(f"Downscaler: std must be finite and > 0; not so for {bad}")
        unknown = sorted(set(self.nonnegative) - set(self.config.out_vars))
        if unknown:
            raise ValueError(f"Downscaler: nonnegative names non-output variables {unknown}")
        for role, clim, allowed in (
            ("input_climatology", self.input_climatology, self.config.in_vars),
            ("output_climatology", self.output_climatology, self.config.out_vars),
        ):
            stray = sorted(set(clim) - set(allowed))
            if stray:
                raise ValueError(f"Downscaler: {role} names variables {stray} the model lacks")
        self.constraints = check_constraints(self.constraints, self.config.out_vars)
        odd = {k: v for k, v in self.static_packing.items() if v not in ("coarse", "fine")}
        if odd or set(self.static_packing) != set(self.static):
            raise ValueError(
                "Downscaler: static_packing must say 'coarse' or 'fine' for each static field "
                f"{sorted(self.static)}; got {self.static_packing}"
            )

    # ------------------------------------------------------------------ views
    @property
    def config(self) -> ReslimConfig:
        return self.model.config

    @property
    def factor(self) -> int:
        return self.config.factor

    @property
    def in_vars(self) -> list[str]:
        return list(self.config.in_vars)

    @property
    def out_vars(self) -> list[str]:
        return list(self.config.out_vars)

    @property
    def weights_sha256(self) -> str:
        """Hash of the weights: identifies the model in output file histories."""
        return weights_hash(self.model.state_dict())

    def drawn(self, noise_members: str) -> Downscaler:
        """A copy of this stochastic model whose members are drawn another way:
        ``"independent"`` or ``"antithetic"`` (`ReslimConfig.noise_members`).

        Both give members of the same distribution, so a model trained one
        way may be drawn the other.  Mirrored members are a property of how a
        model is trained, and are refused here.

        >>> anti = dsr.drawn("antithetic")                      # doctest: +SKIP
        >>> members = coarse.orbit.downscale(anti, samples=16)  # doctest: +SKIP
        """
        c = self.config
        ways = ("independent", "antithetic")
        if not c.noise_channels:
            raise ValueError("drawn(): this model is deterministic (noise_channels=0)")
        if noise_members not in ways or c.noise_members not in ways:
            raise ValueError(
                f"drawn(): members are drawn {ways}, from a model trained either way; got "
                f"{noise_members!r} for a model with noise_members={c.noise_members!r} "
                "(mirrored members need a model trained mirrored)"
            )
        model = Reslim(c.replace(noise_members=noise_members))
        model.load_state_dict(self.model.state_dict())
        model.train(self.model.training)
        return dataclasses.replace(self, model=model)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"<xorbit.Downscaler x{c.factor} {c.in_vars} -> {c.out_vars}, "
            f"{self.model.num_params() / 1e6:.2f}M parameters>"
        )

    # ------------------------------------------------------------------ numerics
    def normalize(self, x: np.ndarray, variables: Sequence[str], axis: int = -3) -> np.ndarray:
        """``(x - mean) / std`` per variable along ``axis`` (float32)."""
        m, s = self._stats(variables, x.ndim, axis)
        return ((x - m) / s).astype(np.float32, copy=False)

    def denormalize(self, y: np.ndarray, variables: Sequence[str], axis: int = -3) -> np.ndarray:
        """Inverse of `normalize`; clamps non-negative variables at zero."""
        m, s = self._stats(variables, y.ndim, axis)
        out = y * s + m
        neg = [i for i, v in enumerate(variables) if v in self.nonnegative]
        if neg:
            idx: list[slice | list[int]] = [slice(None)] * out.ndim
            idx[axis] = neg
            out[tuple(idx)] = np.maximum(out[tuple(idx)], 0)
        return out

    def _stats(self, variables: Sequence[str], ndim: int, axis: int) -> tuple[np.ndarray, ...]:
        shape = [1] * ndim
        shape[axis] = len(variables)
        m = np.array([self.mean[v] for v in variables], dtype=np.float32).reshape(shape)
        s = np.array([self.std[v] for v in variables], dtype=np.float32).reshape(shape)
        return m, s

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(
        cls, config: ReslimConfig, *, seed: int | None = 0, **kwargs: Any
    ) -> Downscaler:
        """A Downscaler around a freshly initialized model (seeded)."""
        if seed is not None:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = Reslim(config)
        else:
            model = Reslim(config)
        return cls(model=model.eval(), **kwargs)

    # ------------------------------------------------------------------ files
    def metadata(self) -> dict[str, Any]:
        return {
            "mean": {k: float(v) for k, v in self.mean.items()},
            "std": {k: float(v) for k, v in self.std.items()},
            "units": dict(self.units),
            "attrs": {k: dict(v) for k, v in self.attrs.items()},
            "nonnegative": list(self.nonnegative),
            "history": [dict(h) for h in self.history],
            "grid": dict(self.grid),
            "input_climatology": {k: encode(v) for k, v in self.input_climatology.items()},
            "output_climatology": {k: encode(v) for k, v in self.output_climatology.items()},
            "static": {k: encode(v) for k, v in self.static.items()},
            "static_packing": dict(self.static_packing),
            "transforms": dict(self.transforms),
            "constraints": dict(self.constraints),
            "provenance": dict(self.provenance),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write weights and metadata to one safetensors file, atomically."""
        return save_checkpoint(path, self.model, extra=self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str = "cpu") -> Downscaler:
        """Read a file written by `save` (no pickle involved)."""
        model, meta = load_checkpoint(path, map_location=map_location)
        extra: Mapping[str, Any] = meta.get("extra", {})
        return cls(
            model=model,
            mean=dict(extra.get("mean", {})),
            std=dict(extra.get("std", {})),
            units=dict(extra.get("units", {})),
            attrs={k: dict(v) for k, v in extra.get("attrs", {}).items()},
            nonnegative=list(extra.get("nonnegative", [])),
            history=[dict(h) for h in extra.get("history", [])],
            grid=dict(extra.get("grid", {})),
            input_climatology={k: decode(v) for k, v in extra.get("input_climatology", {}).items()},
            output_climatology={
                k: decode(v) for k, v in extra.get("output_climatology", {}).items()
            },
            static={k: decode(v) for k, v in extra.get("static", {}).items()},
            static_packing=dict(extra.get("static_packing", {})),
            transforms=dict(extra.get("transforms", {})),
            constraints=dict(extra.get("constraints", {})),
            provenance=dict(extra.get("provenance", {})),
        )


def check_constraints(constraints: Mapping[str, str], out_vars: Sequence[str]) -> dict[str, str]:
    """``constraints`` checked: output variables only, known kinds (errors name them)."""
    out = dict(constraints or {})
    stray = sorted(set(out) - set(out_vars))
    if stray:
        raise ValueError(
            f"coarse-consistency constraints name {stray}, which are not outputs {list(out_vars)}"
        )
    odd = {k: v for k, v in out.items() if v not in KINDS}
    if odd:
        raise ValueError(f"unknown coarse-consistency constraints {odd}; choose one of {KINDS}")
    return out


def training_grid(y: Any, x: Any, multi_resolution: bool = False) -> dict[str, Any]:
    """The grid facts a `Downscaler` records: orientation and spacing of ``y`` and ``x``.

    ``y``, ``x`` are 1-D coordinate arrays (latitude, longitude) of the coarse
    training grid; a longitude across the seam of its convention is read
    unwrapped (`xorbit.grid.unwrap_longitude`).
    """
    facts: dict[str, Any] = {"multi_resolution": bool(multi_resolution)}
    for name, coord in (("y", y), ("x", x)):
        values = np.asarray(coord, dtype=np.float64)
        if name == "x":
            values = unwrap_longitude(values)
        steps = np.diff(values)
        facts[f"{name}_ascending"] = bool(values.size < 2 or steps[0] > 0)
        facts[f"d{name}"] = float(np.median(np.abs(steps))) if steps.size else None
    return facts


def load(path: str | os.PathLike, map_location: str = "cpu") -> Downscaler:
    """Load a `Downscaler` saved with ``Downscaler.save``."""
    return Downscaler.load(path, map_location=map_location)
