"""Reslim: the residual slim vision transformer of ORBIT-2, in plain torch.

Reads top to bottom: building blocks, the model, its weight initialisation.
The model maps normalized coarse fields ``[B, V_in, h, w]`` to normalized fine
fields ``[B, V_out, h*k, w*k]``.  It knows nothing of xarray, units or tiles.

Parameter names follow the published ``model_state_dict`` so that reference
checkpoints load with ``unpatchify="reference"`` (see `xorbit.model.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import adaptive
from .config import ReslimConfig, noise_names
from .linear import LinearPath

__all__ = ["RES_SCALE", "Reslim", "sincos_pos_embed_2d", "unpatchify"]

# With ``res_embed="relative"`` the resolution embedding reads this on the model's
# own grid (``config.res_km``): the reference's value for 1 degree.
RES_SCALE = 111.0


# --------------------------------------------------------------------------- blocks
def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D sine-cosine position table ``[grid_h * grid_w, embed_dim]``.

    Half of the channels encode the row, half the column (MAE / ClimaX recipe).
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim % 4 == 0, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(
        np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij"
    )

    def encode(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # the column code first, then the row code, as in the reference
    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


def unpatchify(
    pixels: torch.Tensor, grid: tuple[int, int], n_out: int, k: int, p: int, layout: str
) -> torch.Tensor:
    """Head output ``[B, L, n_out*(k p)^2]`` on a token ``grid`` → ``[B, n_out, H k, W k]``.

    ``layout="local"``: token (i, j) fills the ``(k p) x (k p)`` fine block above
    its own patch.  ``layout="reference"``: the published code's flat reshape to
    ``[B, H k/p, W k/p, p, p, n_out]``, where consecutive tokens fill consecutive
    ``p x p`` patches along fine rows — not above their own input patch.
    """
    b = pixels.shape[0]
    gh, gw = grid
    if layout == "local":
        out = pixels.reshape(b, gh, gw, k * p, k * p, n_out)
    elif layout == "reference":
        out = pixels.reshape(b, gh * k, gw * k, p, p, n_out)
    else:
        raise ValueError(f"unknown unpatchify layout {layout!r}; use 'local' or 'reference'")
    return torch.einsum("nhwpqc->nchpwq", out).reshape(b, n_out, gh * k * p, gw * k * p)


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class PatchEmbed(nn.Module):
    """One variable's ``[B, 1, h, w]`` image → ``[B, L, D]`` tokens."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VariableAggregation(nn.Module):
    """Cross-attention from one learnt query over the variable tokens of each patch."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # query [1, 1, D]; x [N, V, D] with N = batch * tokens
        n, v, d = x.shape
        h = self.num_heads
        q = self.q(query).expand(n, -1, -1).reshape(n, 1, h, d // h).transpose(1, 2)
        k, val = self.kv(x).reshape(n, v, 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, val)  # [N, h, 1, d/h]
        return self.proj(out.transpose(1, 2).reshape(n, d))


class Attention(nn.Module):
    """Multi-head self-attention over the tokens of one tile."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block (timm naming)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# --------------------------------------------------------------------------- model
class Reslim(nn.Module):
    """Residual slim ViT for k-fold downscaling.

    ``forward(x, variables)`` takes normalized coarse fields ``x [B, C, h, w]``
    whose channels are named by ``variables`` (any subset of ``config.in_vars``,
    in any order, but holding every output and static variable) and returns
    normalized fine fields ``[B, len(config.out_vars), h*k, w*k]``.  Any ``h, w``
    work: the input is padded to a multiple of the patch size (adaptive tokens:
    of ``max_leaf`` patches) and the output cropped back.

    The output is ``forward_head(forward_encoder(x)) + residual(x)``; each stage
    is a method of its own so that it can be tested and reused.  With
    ``config.tokens="adaptive"`` the encoder and head are those of
    `xorbit.model.adaptive`, on the leaves of ``partition(x)``.
    """

    # with a linear path (``config.linear_window``): the path and the correction's weight
    linear: LinearPath
    gate: torch.Tensor

    def __init__(self, config: ReslimConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        c = config
        d, p, k = c.embed_dim, c.patch_size, c.factor
        n_out = len(c.out_vars)
        # noise channels (a stochastic model) come after the inputs, each with
        # its own token embedding and variable embedding, like an input
        self.noise_vars = noise_names(c.noise_channels)
        self._var_index = {v: i for i, v in enumerate([*c.in_vars, *self.noise_vars])}
        # recompute each block's activations in backward instead of keeping them
        # (`TrainOptions.checkpoint_activations`); a training setting, not saved
        self.checkpoint_activations = False

        # encoder
        self.token_embeds = nn.ModuleList(PatchEmbed(p, d) for _ in self._var_index)
        self.var_embed = nn.Parameter(torch.zeros(1, len(self._var_index), d))
        self.var_query = nn.Parameter(torch.zeros(1, 1, d))
        self.var_agg = VariableAggregation(d, c.num_heads)
        gh, gw = self.token_grid(c.img_size)
        self.pos_embed = nn.Parameter(
            torch.tensor(sincos_pos_embed_2d(d, gh, gw)).unsqueeze(0),  # on the default device
            requires_grad=c.learn_pos_embed,
        )
        self.spatial_embed = nn.Linear(1, d)  # resolution embedding, input in km
        if c.tokens == "adaptive":
            # one learnt vector per leaf side 1, 2, 4, ... max_leaf, added to the
            # averaged position table; zero at first, so that one-token leaves
            # are exactly the uniform model's tokens
            n_scales = c.max_leaf.bit_length()
            self.leaf_embed = nn.Parameter(torch.zeros(n_scales, d))
        self.pos_drop = nn.Dropout(c.drop_rate)
        rates = np.linspace(0.0, c.drop_path, c.depth).tolist()  # no tensor: builds on meta
        self.blocks = nn.ModuleList(
            Block(d, c.num_heads, c.mlp_ratio, c.drop_rate, r) for r in rates
        )
        self.norm = nn.LayerNorm(d)

        # head: decoder_depth x (Linear + GELU), then one Linear to the pixels
        layers: list[nn.Module] = []
        for _ in range(c.decoder_depth):
            layers += [nn.Linear(d, d), nn.GELU()]
        layers.append(nn.Linear(d, n_out * (k * p) ** 2))
        self.head = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(n_out, n_out, kernel_size=3, padding=1)

        # residual path: a learnt PixelShuffle upsampler of the outputs + statics
        # (+ noise: the fine texture of a member)
        n_res = n_out + len(c.static_vars) + c.noise_channels
        self.path2 = nn.Sequential(
            nn.Conv2d(n_res, c.cnn_ratio * k * k, kernel_size=3, padding=1),
            nn.GELU(),
            nn.PixelShuffle(k),
            nn.Conv2d(c.cnn_ratio, n_out, kernel_size=3, padding=1),
        )
        # the linear path: a frozen ridge map of the dynamic inputs, and the
        # weight of the network's correction on top of it (`xorbit.model.linear`)
        self.dynamic_vars = [v for v in c.in_vars if v not in c.static_vars]
        if c.linear_window is not None:
            self.linear = LinearPath(
                c.linear_window, len(self.dynamic_vars), n_out, k, c.linear_half
            )
            self.register_buffer("gate", torch.ones(()))
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.var_embed, std=0.02)
        nn.init.trunc_normal_(self.var_query, std=0.02)
        if c.interp_skip != "none":
            # the correction to the interpolation starts at zero: an untrained
            # model is the interpolation, and training moves away from it only
            # as far as the data ask
            # Sequential's items are typed Module; path2 ends with a Conv2d
            for last in (self.conv_out, cast(nn.Conv2d, self.path2[-1])):
                nn.init.zeros_(last.weight)
                if last.bias is not None:  # always: both are Conv2d with a bias
                    nn.init.zeros_(last.bias)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ helpers
    def token_grid(self, shape: Sequence[int]) -> tuple[int, int]:
        """Token grid of a coarse ``(h, w)`` after padding to the patch size."""
        p = self.config.patch_size
        return -(-int(shape[0]) // p), -(-int(shape[1]) // p)

    def channel_indices(self, variables: Sequence[str], wanted: Sequence[str]) -> list[int]:
        """Positions in ``variables`` of each name in ``wanted`` (KeyError if absent)."""
        pos = {v: i for i, v in enumerate(variables)}
        missing = [v for v in wanted if v not in pos]
        if missing:
            raise KeyError(
                f"Reslim needs input variables {missing}, which are not among the given "
                f"variables {list(variables)}"
            )
        return [pos[v] for v in wanted]

    def _check_input(self, x: torch.Tensor, variables: Sequence[str]) -> list[str]:
        variables = list(variables)
        if x.ndim != 4:
            raise ValueError(f"Reslim expects x of shape [B, C, h, w], got {tuple(x.shape)}")
        if x.shape[1] != len(variables):
            raise ValueError(
                f"x has {x.shape[1]} channels but {len(variables)} variable names were given: "
                f"{variables}"
            )
        known = set(self.config.in_vars)
        unknown = [v for v in variables if v not in known]
        if unknown:
            raise KeyError(
                f"variables {unknown} are unknown to this model; it was built for "
                f"{self.config.in_vars}"
            )
        if len(set(variables)) != len(variables):
            raise ValueError(f"variables names repeat: {variables}")
        return variables

    def _pad_multiple(self) -> int:
        """Pixels the padded input is a multiple of: the patch, or the largest leaf."""
        c = self.config
        return c.patch_size * (c.max_leaf if c.tokens == "adaptive" else 1)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        p = self._pad_multiple()
        ph, pw = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return x

    def num_tokens(self, shape: Sequence[int]) -> int:
        """Sequence length of the blocks for a coarse window ``(h, w)``.

        Uniform tokens: the patches of the padded window.  Adaptive tokens: the
        leaves, ``n_roots + 3 m`` up to ``config.max_tokens``.
        """
        m = self._pad_multiple()
        padded = [-(-int(n) // m) * m for n in shape[-2:]]
        gh, gw = self.token_grid(padded)
        if self.config.tokens == "uniform":
            return gh * gw
        return adaptive.n_leaves((gh, gw), self.config.max_leaf, self.config.max_tokens)

    def partition(self, xp: torch.Tensor, variables: Sequence[str]) -> adaptive.Partition:
        """The quadtree leaves of padded coarse fields (adaptive tokens only).

        From the edges of the mean of the output variables' channels; computed
        without gradient on ``xp``'s device.
        """
        c = self.config
        if c.tokens != "adaptive":
            raise ValueError("Reslim.partition needs a model with tokens='adaptive'")
        grid = self.token_grid(xp.shape[-2:])
        tree = adaptive.quadtree(grid, c.max_leaf, xp.device)
        n_tok = adaptive.n_leaves(grid, c.max_leaf, c.max_tokens)
        with torch.no_grad():
            idx = self.channel_indices(variables, c.out_vars)
            edges = adaptive.edge_pixels(xp.detach()[:, idx].float().mean(dim=1))
            counts = adaptive.node_counts(edges, tree, c.patch_size)
            leaves = adaptive.partition(counts, tree, n_tok)
        return adaptive.Partition(tree, leaves)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position table for a token grid, resized bicubically if needed."""
        train_grid = self.token_grid(self.config.img_size)
        pe: torch.Tensor = self.pos_embed  # a Parameter, then reshaped Tensors
        if tuple(grid) == train_grid:
            return pe
        d = pe.shape[-1]
        pe = pe.reshape(1, *train_grid, d).permute(0, 3, 1, 2)
        pe = F.interpolate(pe, size=grid, mode="bicubic", align_corners=False)
        return pe.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d)

    def resolution_embedding(
        self, res_km: float | torch.Tensor | None, tokens: torch.Tensor
    ) -> torch.Tensor:
        """``spatial_embed`` of the grid spacing, ``[1 or B, 1, D]`` to add to tokens.

        The spacing enters as km, or as ``RES_SCALE * km / config.res_km``
        (``config.res_embed``).

        ``res_km``: one value for the batch, one per sample (a tensor ``[B]``), or
        ``None`` for ``config.res_km``.
        """
        res = self.config.res_km if res_km is None else res_km
        res_t = torch.as_tensor(res, dtype=tokens.dtype, device=tokens.device).reshape(-1, 1)
        if self.config.res_embed == "relative":
            res_t = res_t * (RES_SCALE / float(self.config.res_km))
        if res_t.shape[0] not in (1, tokens.shape[0]):
            raise ValueError(
                f"res_km has {res_t.shape[0]} values for a batch of {tokens.shape[0]} samples"
            )
        return self.spatial_embed(res_t).unsqueeze(1)

    # ------------------------------------------------------------------ stages
    def forward_encoder(
        self,
        x: torch.Tensor,
        variables: Sequence[str],
        res_km: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Padded coarse fields → normalized tokens ``[B, L, D]``."""
        grid = self.token_grid(x.shape[-2:])
        idx = [self._var_index[v] for v in variables]
        tokens = torch.stack(
            [self.token_embeds[j](x[:, i : i + 1]) for i, j in enumerate(idx)], dim=1
        )  # [B, V, L, D]
        tokens = self.aggregate_variables(tokens, idx)
        tokens = tokens + self.position_embedding(grid).to(tokens.dtype)
        return self.transform(tokens, res_km)

    def adaptive_encoder(
        self,
        x: torch.Tensor,
        variables: Sequence[str],
        res_km: float | torch.Tensor | None,
        part: adaptive.Partition,
    ) -> torch.Tensor:
        """Padded coarse fields and their partition → normalized tokens ``[B, N, D]``.

        Each level's node tokens are the patch embedding of the input average-pooled
        by the node side; each leaf takes its node's token.  The variable
        aggregation and the blocks then run on the ``N`` leaves only.
        """
        pooled = adaptive.per_level(x, part.tree)
        idx = [self._var_index[v] for v in variables]
        per_var = [
            adaptive.leaf_tokens(
                torch.cat([self.token_embeds[j](xs[:, i : i + 1]) for xs in pooled], dim=1),
                part.leaves,
            )
            for i, j in enumerate(idx)
        ]
        tokens = self.aggregate_variables(torch.stack(per_var, dim=1), idx)
        # position: the table averaged over each node, plus a learnt embedding of
        # the node's side (zero at first: one-token leaves start as uniform tokens)
        pe = self.position_embedding(part.tree.grid)
        tokens = tokens + adaptive.leaf_positions(pe, part, self.leaf_embed).to(tokens.dtype)
        return self.transform(tokens, res_km)

    def adaptive_head(self, tokens: torch.Tensor, part: adaptive.Partition) -> torch.Tensor:
        """Tokens ``[B, N, D]`` of the leaves → fine fields (padded size), before ``conv_out``."""
        c = self.config
        b, n = part.leaves.shape
        n_out, kp = len(c.out_vars), c.factor * c.patch_size
        # the uniform "local" layout: per token (kp, kp, n_out)
        pix = self.head(tokens).reshape(b, n, kp, kp, n_out).permute(0, 1, 4, 2, 3)
        return adaptive.paste_leaves(pix, part)

    def aggregate_variables(self, tokens: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
        """Per-variable tokens ``[B, V, L, D]`` of the variables ``idx`` → ``[B, L, D]``:
        ``var_embed``, then cross-attention from ``var_query`` over the variables."""
        tokens = tokens + self.var_embed[:, list(idx)].unsqueeze(2)
        b, n_var, n_tok, d = tokens.shape
        tokens = tokens.transpose(1, 2).reshape(b * n_tok, n_var, d)
        return self.var_agg(self.var_query, tokens).reshape(b, n_tok, d)

    def transform(
        self, tokens: torch.Tensor, res_km: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Positioned tokens → the blocks' normalized output: resolution embedding,
        dropout, the transformer blocks, LayerNorm (uniform and adaptive tokens)."""
        tokens = tokens + self.resolution_embedding(res_km, tokens)
        tokens = self.pos_drop(tokens)
        recompute = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            # activation checkpointing: keep only each block's input for backward
            tokens = checkpoint(blk, tokens, use_reentrant=False) if recompute else blk(tokens)
        return self.norm(tokens)

    def forward_head(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tokens ``[B, L, D]`` on a ``grid`` of patches → fine fields (padded size)."""
        c = self.config
        out = unpatchify(
            self.head(tokens), grid, len(c.out_vars), c.factor, c.patch_size, c.unpatchify
        )
        return self.conv_out(out)

    def residual(self, x: torch.Tensor, variables: Sequence[str]) -> torch.Tensor:
        """The learnt upsampling of the output and static variables' coarse fields."""
        c = self.config
        idx = self.channel_indices(variables, c.out_vars + c.static_vars + self.noise_vars)
        return self.path2(x[:, idx])

    def forward(
        self,
        x: torch.Tensor,
        variables: Sequence[str] | None = None,
        res_km: float | torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalized coarse ``[B, C, h, w]`` → normalized fine ``[B, V_out, h k, w k]``.

        Parameters
        ----------
        x
            Coarse fields, channels named by ``variables``.
        variables
            Channel names; defaults to ``config.in_vars``.
        res_km
            Coarse grid spacing in km for the resolution embedding: one value,
            or a tensor ``[B]`` of one per sample; defaults to ``config.res_km``.
        noise
            A stochastic model (``config.noise_channels > 0``): standard normal
            ``[B, noise_channels, h, w]``, one draw per member; ``None``: zeros
            (the member at the noise's centre).  A deterministic model takes none.
        """
        variables = self._check_input(x, self.config.in_vars if variables is None else variables)
        x_in = x
        x, variables = self.with_noise(x, variables, noise)
        h, w = x.shape[-2:]
        k = self.config.factor
        self.channel_indices(variables, self.config.out_vars + self.config.static_vars)
        xp = self._pad(x)
        if self.config.tokens == "adaptive":
            part = self.partition(xp, variables)
            tokens = self.adaptive_encoder(xp, variables, res_km, part)
            out = self.conv_out(self.adaptive_head(tokens, part))
        else:
            grid = self.token_grid(xp.shape[-2:])
            out = self.forward_head(self.forward_encoder(xp, variables, res_km), grid)
        out = out + self.residual(xp, variables)
        if self.config.linear_window is not None:
            out = out * self.gate
        out = (out + self.skip(xp, variables))[..., : h * k, : w * k]
        if self.config.linear_window is not None:
            out = out + self.linear_map(x_in, variables)
        return out

    def with_noise(
        self, x: torch.Tensor, variables: list[str], noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[str]]:
        """``x`` and ``variables`` with the noise channels appended (a stochastic model)."""
        n = self.config.noise_channels
        if n == 0:
            if noise is not None:
                raise ValueError(
                    "this Reslim is deterministic (noise_channels=0): it takes no noise"
                )
            return x, variables
        shape = (x.shape[0], n, *x.shape[-2:])
        if noise is None:
            noise = x.new_zeros(shape)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
        return torch.cat([x, noise.to(x.dtype)], dim=1), [*variables, *self.noise_vars]

    def skip(self, xp: torch.Tensor, variables: Sequence[str]) -> torch.Tensor:
        """The fixed interpolation of the output variables (``config.interp_skip``).

        ``xp``: padded coarse fields (zeros for ``interp_skip="none"``).
        """
        c = self.config
        idx = self.channel_indices(variables, c.out_vars)
        if c.interp_skip == "none":
            return xp.new_zeros(xp.shape[0], len(idx), *(n * c.factor for n in xp.shape[-2:]))
        return F.interpolate(
            xp[:, idx], scale_factor=c.factor, mode=c.interp_skip, align_corners=False
        )

    def linear_map(self, x: torch.Tensor, variables: Sequence[str]) -> torch.Tensor:
        """The linear path's fine fields for (unpadded) coarse fields ``x``."""
        return self.linear(x[:, self.channel_indices(variables, self.dynamic_vars)])

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
