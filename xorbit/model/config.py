"""Hyper-parameters of a Reslim model, as data.

`ReslimConfig` holds every hyper-parameter of the ORBIT-2 reference model plus the
names of the variables it reads and writes.  Presets ("9.5m", "126m", "1b", "10b")
are plain dictionaries of overrides, not subclasses, so a config round-trips through
dict / YAML / JSON without loss and a checkpoint can rebuild its model from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

__all__ = [
    "NOISE_CHANNELS",
    "NOISE_MEMBERS",
    "PRESETS",
    "REFERENCE_IN_VARS",
    "REFERENCE_OUT_VARS",
    "TRAINING_KEYS",
    "ReslimConfig",
    "noise_names",
]

# The 23 inputs and 3 outputs of the published ORBIT-2 configurations, the four
# static fields first.  Useful for presets that should match the reference counts.
REFERENCE_STATIC_VARS = ("land_sea_mask", "orography", "lattitude", "landcover")
REFERENCE_IN_VARS = (
    *REFERENCE_STATIC_VARS,
    "2m_temperature",
    "2m_temperature_max",
    "2m_temperature_min",
    *(
        f"{v}_{lev}"
        for v in (
            "temperature",
            "u_component_of_wind",
            "v_component_of_wind",
            "specific_humidity",
        )
        for lev in (200, 500, 850)
    ),
    "10m_u_component_of_wind",
    "10m_v_component_of_wind",
    "total_precipitation_24hr",
    "volumetric_soil_water_layer_1",
)
REFERENCE_OUT_VARS = ("total_precipitation_24hr", "2m_temperature_min", "2m_temperature_max")

# Preset overrides: width, depth and heads follow the paper's table.  Their
# training defaults (learning rate, batch size) are `xorbit.training.TrainOptions`'.
#: noise channels of a stochastic model that `xorbit.train(ensemble=)` builds
NOISE_CHANNELS = 4


#: how a stochastic model's members are drawn (`ReslimConfig.noise_members`)
NOISE_MEMBERS = ("independent", "antithetic", "mirrored")


def noise_names(n: int) -> list[str]:
    """The internal channel names of ``n`` noise channels (never a variable's name)."""
    return [f"<noise {i}>" for i in range(int(n))]


PRESETS: dict[str, dict[str, Any]] = {
    "9.5m": dict(embed_dim=256, depth=6, decoder_depth=4, num_heads=4),
    "126m": dict(embed_dim=1024, depth=8, decoder_depth=4, num_heads=16),
    "1b": dict(embed_dim=3072, depth=8, decoder_depth=4, num_heads=24),
    "10b": dict(embed_dim=8192, depth=11, decoder_depth=4, num_heads=32),
    # Not in the paper: a model small enough to train on a laptop CPU in minutes.
    "tiny": dict(embed_dim=64, depth=2, decoder_depth=1, num_heads=4, drop_path=0.0, drop_rate=0.0),
}

# Training hyper-parameters that configs of xorbit 0.1 carried.  Old checkpoints
# and training states still hold them: `ReslimConfig.from_dict` drops them.
TRAINING_KEYS = ("lr", "batch_size", "weight_decay", "warmup_epochs", "tv_lambda", "var_weights")

Unpatchify = Literal["local", "reference"]
Tokens = Literal["uniform", "adaptive"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ReslimConfig:
    """Every hyper-parameter of a Reslim model.

    Parameters
    ----------
    in_vars
        Names of the input channels the model knows, static fields included.
        A forward pass may use any subset of them, in any order.
    out_vars
        Names of the predicted variables.  Each must also be an input: the
        residual path starts from the coarse field of the same variable.
    static_vars
        Inputs (a subset of ``in_vars``) that also feed the residual path, e.g.
        land-sea mask and orography.  The reference uses four.
    factor
        Refinement factor ``k`` between the coarse and the fine grid
        (``superres_mag`` in the reference).
    img_size
        Coarse grid ``(ny, nx)`` the model is trained on: sets the size of the
        position-embedding table, which is resized for other grids.
    res_km
        The model's own grid spacing in km: what the resolution embedding gets
        when the caller gives none.  `xorbit.train` sets it to the (first)
        training grid's spacing, computed from its coordinates
        (`xorbit.grid.spacing_km`).
    res_embed
        What the resolution embedding (a ``Linear(1, D)``) reads for a grid of
        spacing ``s`` km: ``"relative"`` (default) ``RES_SCALE * s / res_km``,
        111 on the model's own grid whatever it is, and in proportion on
        others; ``"km"`` ``s`` itself, as the reference does.  Kilometres on a
        coarse grid (1362 km for the demo's 10 x 15 degrees) add, at
        initialisation, a constant of ~27 standard deviations to every token,
        which cost the demo 12 % of RMSE; ``"relative"`` keeps every model at the
        reference's operating point for 1 degree.  Configs saved without this key
        (xorbit < 0.2, imported checkpoints) read ``"km"``.
    unpatchify
        ``"local"`` maps token (i, j) to the fine block above its own patch (use it
        for models trained with xorbit: it suits tiling); ``"reference"``
        reproduces the non-local layout of the published code, needed to load
        published weights.
    interp_skip
        ``"bicubic"`` (default) or ``"bilinear"`` adds a fixed interpolation of
        the output variables' coarse fields to the output, so the network
        learns only the correction; the layers that write the correction start
        at zero, so an untrained model is that interpolation (not in the
        reference; it extrapolates to values outside the training range, see
        docs/training.md).  ``"none"``: the reference architecture.
    tokens
        ``"uniform"`` (default): one token per ``patch_size`` patch, as in the
        reference.  ``"adaptive"``: a quadtree of the token grid, split where
        the input has edges, gives one token per leaf, so smooth regions cost
        few tokens (`xorbit.model.adaptive`; needs ``unpatchify="local"``).
    max_tokens
        Adaptive tokens only: the most tokens per window.  Every window gets
        ``n_roots + 3 m`` tokens, the largest such number up to ``max_tokens``
        (``n_roots``: the windows' ``max_leaf x max_leaf`` blocks of tokens).
        ``None``: a quarter of the window's uniform tokens.
    max_leaf
        Adaptive tokens only: the side, in tokens, of the largest leaf (a
        power of two).  The input is padded to a multiple of
        ``max_leaf * patch_size`` pixels.
    linear_window
        ``(ny, nx)``: the model has a linear path (`xorbit.model.linear`), a
        ridge regression from a window of this coarse size (every dynamic
        input, standardized) to its fine outputs, one set of coefficients per
        coarse cell, fitted in closed form by `xorbit.train` before the
        network learns what it leaves.  Its output is added to the
        interpolation and the network's correction.  ``None`` (default for a
        config built by hand): no linear path.  `xorbit.train` sets it to the
        training window (``TrainOptions.linear_path``).
    linear_half
        The linear path's predictors: every cell of the window (``None``), or
        the ``(2 h + 1)²`` cells around each cell.  On a window of more than
        `xorbit.ridge.WHOLE_DOMAIN_MAX` cells, ``None`` lets the fit choose
        (`xorbit.training.linear.fit_linear_path`: every cell or
        `xorbit.ridge.LOCAL_HALF`, by blocked cross-validation), and the
        choice is written here.
    noise_channels
        A stochastic model (`xorbit.model.reslim.Reslim` with noise): this many
        channels of standard normal noise, one value per coarse pixel, enter
        the network beside the inputs (their own token embeddings, and the
        residual path), so that one forward pass with one draw of the noise
        gives one ensemble member.  ``0`` (default): a deterministic model.
        ``xorbit.train(..., ensemble=M)`` sets it (to `NOISE_CHANNELS`) when
        the config has none.
    noise_members
        How a stochastic model's members are drawn.  ``"antithetic"``
        (default): in pairs, the noise ``z`` and ``-z``.  Each member is a
        draw of the same distribution as independent ones, and a pair's mean
        cancels the part of the response that is odd in the noise, so the
        ensemble mean carries less sampling noise (on the demo split the mean
        of 16 members scored 0.2229 K against 0.2280).  ``"independent"``:
        each member its own noise (configs saved before xorbit 0.4 read so).
        Both train on independent members.  ``"mirrored"`` (experimental):
        in pairs mirrored about the member at zero noise ``c``, a draw ``x``
        and ``2 c - x``; the predictive distribution is then symmetric about
        ``c``, which is the mean of every even number of members exactly, and
        ``N`` members cost ``N / 2 + 1`` passes.  Such a model trains on
        mirrored pairs (``fair_crps_loss(paired=True)``, an even
        ``ensemble=`` of at least 4).

    Notes
    -----
    The architecture only: training hyper-parameters (learning rate, batch
    size, TV weight ...) are `xorbit.training.TrainOptions`, with defaults per
    preset (`xorbit.training.TrainOptions.for_config`).
    """

    in_vars: list[str]
    out_vars: list[str]
    static_vars: list[str] = field(default_factory=list)
    factor: int = 4
    img_size: tuple[int, int] = (32, 64)
    patch_size: int = 2
    cnn_ratio: int = 4
    embed_dim: int = 256
    depth: int = 6
    decoder_depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    drop_path: float = 0.1
    drop_rate: float = 0.1
    res_km: float = 111.0
    res_embed: Literal["km", "relative"] = "relative"
    learn_pos_embed: bool = True
    unpatchify: Unpatchify = "local"
    interp_skip: Literal["none", "bilinear", "bicubic"] = "bicubic"
    tokens: Tokens = "uniform"
    max_tokens: int | None = None
    max_leaf: int = 8
    linear_window: tuple[int, int] | None = None
    linear_half: int | None = None
    noise_channels: int = 0
    noise_members: Literal["independent", "antithetic", "mirrored"] = "antithetic"

    def __post_init__(self) -> None:
        self.in_vars = list(self.in_vars)
        self.out_vars = list(self.out_vars)
        self.static_vars = list(self.static_vars)
        # YAML gives lists; validate() below checks that it is a pair
        self.img_size = tuple(int(s) for s in self.img_size)  # type: ignore[assignment]
        if self.linear_window is not None:
            self.linear_window = tuple(int(s) for s in self.linear_window)  # type: ignore[assignment]
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent hyper-parameter."""
        if not self.in_vars:
            raise ValueError("ReslimConfig: in_vars is empty; name at least one input variable")
        if not self.out_vars:
            raise ValueError("ReslimConfig: out_vars is empty; name at least one output variable")
        for name, names in (("in_vars", self.in_vars), ("out_vars", self.out_vars)):
            dup = sorted({v for v in names if names.count(v) > 1})
            if dup:
                raise ValueError(f"ReslimConfig: {name} lists {dup} more than once")
        missing = [v for v in self.out_vars + self.static_vars if v not in self.in_vars]
        if missing:
            raise ValueError(
                f"ReslimConfig: variables {missing} feed the residual path but are not in "
                f"in_vars {self.in_vars}; every output and static variable must be an input"
            )
        both = [v for v in self.static_vars if v in self.out_vars]
        if both:
            raise ValueError(f"ReslimConfig: {both} cannot be both static and output variables")
        if not _is_int(self.noise_channels) or self.noise_channels < 0:
            raise ValueError(
                f"ReslimConfig: noise_channels must be an int >= 0, got {self.noise_channels!r}"
            )
        if self.noise_members not in NOISE_MEMBERS:
            raise ValueError(
                f"ReslimConfig: noise_members must be one of {NOISE_MEMBERS}, "
                f"got {self.noise_members!r}"
            )
        for name in ("factor", "patch_size", "cnn_ratio", "embed_dim", "depth", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ReslimConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.decoder_depth < 0:
            raise ValueError(f"ReslimConfig: decoder_depth must be >= 0, got {self.decoder_depth}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"ReslimConfig: embed_dim={self.embed_dim} is not divisible by "
                f"num_heads={self.num_heads}"
            )
        if len(self.img_size) != 2 or min(self.img_size) < 1:
            raise ValueError(f"ReslimConfig: img_size must be (ny, nx) >= 1, got {self.img_size}")
        if self.unpatchify not in ("local", "reference"):
            raise ValueError(
                f"ReslimConfig: unpatchify must be 'local' or 'reference', got {self.unpatchify!r}"
            )
        if self.res_embed not in ("km", "relative"):
            raise ValueError(
                f"ReslimConfig: res_embed must be 'km' or 'relative', got {self.res_embed!r}"
            )
        if not self.res_km > 0:
            raise ValueError(f"ReslimConfig: res_km must be > 0 km, got {self.res_km}")
        if self.interp_skip not in ("none", "bilinear", "bicubic"):
            raise ValueError(
                "ReslimConfig: interp_skip must be 'none', 'bilinear' or 'bicubic', "
                f"got {self.interp_skip!r}"
            )
        if self.tokens not in ("uniform", "adaptive"):
            raise ValueError(
                f"ReslimConfig: tokens must be 'uniform' or 'adaptive', got {self.tokens!r}"
            )
        leaf = self.max_leaf
        if not _is_int(leaf) or leaf < 1 or leaf & (leaf - 1):
            raise ValueError(f"ReslimConfig: max_leaf must be a power of two >= 1, got {leaf!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(
                f"ReslimConfig: max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}"
            )
        if self.linear_window is not None and (
            len(self.linear_window) != 2 or min(self.linear_window) < 1
        ):
            raise ValueError(
                f"ReslimConfig: linear_window must be (ny, nx) >= 1 or None, got "
                f"{self.linear_window}"
            )
        if self.linear_half is not None and (not _is_int(self.linear_half) or self.linear_half < 0):
            raise ValueError(
                f"ReslimConfig: linear_half must be an integer >= 0 or None, got {self.linear_half!r}"
            )
        if self.tokens == "adaptive" and self.unpatchify != "local":
            raise ValueError(
                "ReslimConfig: tokens='adaptive' needs unpatchify='local' (a leaf's pixels go "
                f"above its own region), got unpatchify={self.unpatchify!r}"
            )

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(
        cls,
        name: str,
        *,
        factor: int = 4,
        in_vars: Sequence[str] | None = None,
        out_vars: Sequence[str] | None = None,
        static_vars: Sequence[str] | None = None,
        **overrides: Any,
    ) -> ReslimConfig:
        """A config of one of the published sizes.

        Parameters
        ----------
        name
            ``"9.5m"``, ``"126m"``, ``"1b"``, ``"10b"`` (the paper's sizes) or
            ``"tiny"`` (a CPU-friendly model for demos and tests).
        factor
            Refinement factor.
        in_vars, out_vars, static_vars
            Variable names.  Left out, they default to the reference's 23 inputs,
            3 outputs and 4 static fields.
        **overrides
            Any other field of `ReslimConfig`.

        Raises
        ------
        KeyError
            For an unknown preset name; the message lists the known ones.
        """
        key = str(name).lower()
        moved = sorted(set(overrides) & set(TRAINING_KEYS))
        if moved:
            raise TypeError(
                f"ReslimConfig.preset: {moved} are training options, not architecture; pass "
                "them to xorbit.train(..., lr=..., batch_size=...) or as TrainOptions"
            )
        if key not in PRESETS:
            raise KeyError(f"unknown Reslim preset {name!r}; known presets: {sorted(PRESETS)}")
        if in_vars is None:
            in_vars = REFERENCE_IN_VARS
            static_vars = REFERENCE_STATIC_VARS if static_vars is None else static_vars
        if out_vars is None:
            out_vars = REFERENCE_OUT_VARS
        params = {**PRESETS[key], **overrides}
        return cls(
            in_vars=list(in_vars),
            out_vars=list(out_vars),
            static_vars=list(static_vars or ()),
            factor=factor,
            **params,
        )

    # ------------------------------------------------------------------ round trips
    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-safe dictionary of every field."""
        d = dataclasses.asdict(self)
        d["img_size"] = list(self.img_size)
        if self.linear_window is not None:
            d["linear_window"] = list(self.linear_window)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReslimConfig:
        """Inverse of `to_dict`; unknown keys raise a ``ValueError`` naming them.

        The training keys of xorbit 0.1 configs (`TRAINING_KEYS`) are dropped, so
        old checkpoints load; a config without ``res_embed`` was made when the
        embedding read kilometres, and reads them still; a stochastic one
        without ``noise_members`` drew independent members, and still does.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k not in TRAINING_KEYS}
        d.setdefault("res_embed", "km")
        # a stochastic model saved before noise_members drew independent members
        if d.get("noise_channels"):
            d.setdefault("noise_members", "independent")
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ReslimConfig: unknown keys {unknown}; known keys: {sorted(names)}")
        return cls(**dict(d))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> ReslimConfig:
        return cls.from_dict(yaml.safe_load(text))

    def preset_name(self) -> str | None:
        """The preset whose width, depth and heads this config has, if any."""
        for name, params in PRESETS.items():
            if all(getattr(self, k) == v for k, v in params.items()):
                return name
        return None

    @property
    def mirrored(self) -> bool:
        """A stochastic model whose members are mirrored pairs (`noise_members`)."""
        return bool(self.noise_channels) and self.noise_members == "mirrored"

    def member_passes(self, members: int) -> int:
        """Forward passes ``members`` members of one sample take (`noise_members`):
        one each, or mirrored one per pair and one at zero noise."""
        if self.mirrored:
            return (int(members) + 1) // 2 + 1
        return int(members)

    def check_ensemble(self, members: int) -> None:
        """Raise ``ValueError`` unless this model trains on ``members`` members per
        sample (`xorbit.train`'s ``ensemble=``; ``0``: deterministic, always)."""
        if not members:
            return
        if not self.noise_channels:
            raise ValueError(
                f"ensemble={members} trains a stochastic model, but this model has "
                "noise_channels=0; build it with ReslimConfig(noise_channels=...) "
                "(xorbit.train does so itself)"
            )
        if self.mirrored and (members % 2 or members < 4):
            raise ValueError(
                f"ensemble={members}: a model with noise_members={self.noise_members!r} "
                "trains on pairs of members, at least two pairs: pass an even ensemble "
                ">= 4 (or noise_members='independent')"
            )

    def replace(self, **changes: Any) -> ReslimConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
