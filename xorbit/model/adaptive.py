"""Adaptive (quadtree) tokens for Reslim: few large tokens where the input is smooth.

With ``ReslimConfig(tokens="adaptive")`` the token grid of a window is cut into
square leaves of 1, 2, 4, ... ``max_leaf`` tokens a side.  The cut starts from
the ``max_leaf x max_leaf`` blocks (the roots) and repeatedly splits, in every
sample at once, the leaf with the most edge pixels into its four children.
Each leaf becomes one token: its region of the input averaged down to one
``p x p`` patch, embedded by the same per-variable patch embedding as a uniform
token.  The head's ``(k p) x (k p)`` output of a leaf is resized bilinearly to
cover the leaf's region of the fine grid.

Every sample of a batch gets the same number of splits, so the same number of
tokens ``N = n_roots + 3 m``: no padding tokens, no attention masks.  With
``N`` equal to the uniform count every leaf is one token and the model computes
what the uniform model computes.

The partition is a function of the input only (edges of the output variables'
normalized coarse fields), computed under ``torch.no_grad`` on the input's
device; gradients reach every parameter through the tokens and the head.

Layout of a quadtree here: the nodes of all levels in one flat index, coarsest
level first (level 0: the roots, side ``max_leaf``; the last level: side 1),
row-major within a level.  A leaf set is a sorted ``[B, N]`` tensor of node ids.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "EDGE_QUANTILE",
    "Partition",
    "QuadTree",
    "edge_pixels",
    "leaf_boxes",
    "leaf_positions",
    "leaf_tokens",
    "n_leaves",
    "partition",
    "paste_leaves",
    "per_level",
    "quadtree",
]

# Pixels whose gradient magnitude exceeds this quantile of their window count as
# edges.  A quantile rather than a fixed threshold: it needs no tuning per
# variable or normalization, and the split order only depends on where the
# strongest gradients are.
EDGE_QUANTILE = 0.8


# --------------------------------------------------------------------------- the tree
@dataclass(frozen=True, eq=False)
class QuadTree:
    """Every node of the quadtrees of a ``grid`` of tokens with roots of side ``max_leaf``.

    Attributes
    ----------
    grid
        ``(gh, gw)``, multiples of ``max_leaf``.
    max_leaf
        Side of a root, in tokens.
    offsets, shapes
        Per level: first flat node id, and ``(rows, cols)`` of its node grid.
    level, row, col
        ``[T]`` per node: its level and position in that level's node grid.
    children
        ``[T, 4]`` the ids of a node's children (a node of side 1: itself).
    parent
        ``[T]`` the id of a node's parent (-1 for a root).
    """

    grid: tuple[int, int]
    max_leaf: int
    offsets: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]
    level: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    children: torch.Tensor
    parent: torch.Tensor

    @property
    def n_levels(self) -> int:
        return len(self.shapes)

    @property
    def n_roots(self) -> int:
        return self.shapes[0][0] * self.shapes[0][1]

    @property
    def n_nodes(self) -> int:
        return int(self.level.numel())

    def side(self, level: int) -> int:
        """Side of a node of ``level``, in tokens."""
        return self.max_leaf >> level

    @property
    def node_side(self) -> torch.Tensor:
        """``[T]`` side of every node, in tokens."""
        return torch.bitwise_right_shift(torch.full_like(self.level, self.max_leaf), self.level)

    @property
    def scale_index(self) -> torch.Tensor:
        """``[T]`` log2 of every node's side: 0 for one token, the row of ``leaf_embed``."""
        return (self.n_levels - 1) - self.level


@functools.lru_cache(maxsize=32)
def _quadtree(gh: int, gw: int, max_leaf: int, device: str) -> QuadTree:
    if gh % max_leaf or gw % max_leaf:
        raise ValueError(f"token grid {(gh, gw)} is not a multiple of max_leaf={max_leaf}")
    n_levels = int(math.log2(max_leaf)) + 1
    offsets, shapes, levels, rows, cols = [], [], [], [], []
    start = 0
    for lev in range(n_levels):
        side = max_leaf >> lev
        nr, nc = gh // side, gw // side
        r, c = torch.meshgrid(torch.arange(nr), torch.arange(nc), indexing="ij")
        offsets.append(start)
        shapes.append((nr, nc))
        levels.append(torch.full((nr * nc,), lev))
        rows.append(r.reshape(-1))
        cols.append(c.reshape(-1))
        start += nr * nc
    level, row, col = torch.cat(levels), torch.cat(rows), torch.cat(cols)
    children = torch.arange(start).unsqueeze(1).repeat(1, 4)
    for lev in range(n_levels - 1):
        lo, (nr, nc) = offsets[lev], shapes[lev]
        ids = slice(lo, lo + nr * nc)
        ncc = shapes[lev + 1][1]
        r2, c2 = 2 * row[ids], 2 * col[ids]
        children[ids] = offsets[lev + 1] + torch.stack(
            [r2 * ncc + c2, r2 * ncc + c2 + 1, (r2 + 1) * ncc + c2, (r2 + 1) * ncc + c2 + 1], dim=1
        )
    parent = torch.full((start,), -1, dtype=torch.long)
    inner = torch.arange(offsets[-1])  # every node above the last level
    parent[children[inner].reshape(-1)] = inner.repeat_interleave(4)
    dev = torch.device(device)
    return QuadTree(
        grid=(gh, gw),
        max_leaf=max_leaf,
        offsets=tuple(offsets),
        shapes=tuple(shapes),
        level=level.to(dev),
        row=row.to(dev),
        col=col.to(dev),
        children=children.to(dev),
        parent=parent.to(dev),
    )


def quadtree(grid: Sequence[int], max_leaf: int, device: torch.device | str = "cpu") -> QuadTree:
    """The (cached) `QuadTree` of a token ``grid``, on ``device``."""
    return _quadtree(int(grid[0]), int(grid[1]), int(max_leaf), str(torch.device(device)))


def n_leaves(grid: Sequence[int], max_leaf: int, max_tokens: int | None) -> int:
    """Tokens per window: ``n_roots + 3 m``, the most up to ``max_tokens``.

    ``max_tokens=None``: a quarter of the uniform count ``gh * gw``.  A
    ``max_tokens`` at or above ``gh * gw`` gives ``gh * gw`` (every leaf one
    token).
    """
    gh, gw = int(grid[0]), int(grid[1])
    n_tok = gh * gw
    n_roots = n_tok // max_leaf**2
    budget = n_tok // 4 if max_tokens is None else int(max_tokens)
    if budget < n_roots:
        raise ValueError(
            f"max_tokens={budget}{' (None: a quarter of the grid)' if max_tokens is None else ''} "
            f"is below n_roots={n_roots}, the number of max_leaf x max_leaf blocks "
            f"(max_leaf={max_leaf}) of the {gh} x {gw} token grid: raise max_tokens or max_leaf"
        )
    all_splits = (n_tok - n_roots) // 3
    return n_roots + 3 * min(all_splits, (budget - n_roots) // 3)


# --------------------------------------------------------------------------- partition
def edge_pixels(image: torch.Tensor, quantile: float = EDGE_QUANTILE) -> torch.Tensor:
    """Edge pixels ``[B, H, W]`` (bool) of images ``[B, H, W]``.

    3 x 3 binomial blur, min-max normalization per sample, Sobel gradient
    magnitude; a pixel is an edge where the magnitude reaches the sample's
    ``quantile`` and is not flat (above 1e-6).  Ties at the quantile count as
    edges, so a clean step is all edge along its line; a constant image has
    none.  (The normalization does not change which pixels pass a quantile; it
    puts the magnitudes in [0, 4] whatever the field's scale, which is what
    makes one flatness threshold fit every field.)
    """
    x = image.unsqueeze(1).float()
    one = torch.tensor([1.0, 2.0, 1.0], device=x.device)
    blur = (one[:, None] * one[None, :] / 16).view(1, 1, 3, 3)
    x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), blur)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-12)
    diff = torch.tensor([-1.0, 0.0, 1.0], device=x.device)
    sobel = torch.stack([one[:, None] * diff[None, :], diff[:, None] * one[None, :]]).unsqueeze(1)
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), sobel)
    mag = torch.sqrt((g * g).sum(1))  # [B, H, W]
    flat = mag.flatten(1)
    # kthvalue, not torch.quantile: no limit on the number of pixels
    k = min(flat.shape[1], max(1, math.ceil(quantile * flat.shape[1])))
    thr = flat.kthvalue(k, dim=1).values
    return (mag >= thr.view(-1, 1, 1)) & (mag > 1e-6)


def node_counts(edges: torch.Tensor, tree: QuadTree, patch_size: int) -> torch.Tensor:
    """Edge pixels ``[B, H, W]`` → edge pixels per node ``[B, T]`` (sum-pooled per level)."""
    b = edges.shape[0]
    gh, gw = tree.grid
    p = patch_size
    per_token = edges.reshape(b, gh, p, gw, p).sum(dim=(2, 4), dtype=torch.float32)
    counts = []
    for lev in range(tree.n_levels):
        s = tree.side(lev)
        counts.append(per_token.reshape(b, gh // s, s, gw // s, s).sum(dim=(2, 4)).flatten(1))
    return torch.cat(counts, dim=1)


def partition(counts: torch.Tensor, tree: QuadTree, n_tokens: int) -> torch.Tensor:
    """Leaves ``[B, n_tokens]`` (sorted node ids) from edge counts per node ``[B, T]``.

    Start from the roots; ``(n_tokens - n_roots) / 3`` times, split in every
    sample the leaf of side > 1 with the most edge pixels.  Ties go to the
    larger leaf, then the first in row-major order (``argmax`` takes the first
    maximum and larger leaves come first), so a window without edges is cut
    evenly, coarse to fine.
    """
    b, t = counts.shape
    n_split, rest = divmod(n_tokens - tree.n_roots, 3)
    if rest or n_split < 0 or n_tokens > tree.grid[0] * tree.grid[1]:
        raise ValueError(
            f"n_tokens={n_tokens} is not n_roots + 3 m <= {tree.grid[0] * tree.grid[1]} "
            f"with n_roots={tree.n_roots}"
        )
    # One sort instead of n_split steps (each a few kernel launches: on a GPU
    # the loop took longer than the whole uniform forward).  The same leaves:
    # a child never has more edge pixels than its parent and comes later in
    # node order, so it ranks below it by (count, then lower id) and the
    # greedy sequence is the top n_split splittable nodes in that order --
    # each one's parent ranks higher, so it is split already when its turn
    # comes (tested against the step-by-step loop).
    splittable = tree.level < tree.n_levels - 1
    ids = torch.arange(t, device=counts.device)
    # float64 holds count * T + (T - 1 - id) exactly (counts <= pixels per window)
    key = counts.double() * t + (t - 1 - ids).double()
    key = torch.where(splittable.unsqueeze(0), key, -1.0)
    split = torch.zeros(b, t, dtype=torch.bool, device=counts.device)
    if n_split:
        split.scatter_(1, key.topk(n_split, dim=1).indices, True)
    parent = tree.parent.clamp(min=0)
    opened = (tree.parent < 0).unsqueeze(0) | split[:, parent]  # a root, or a split parent
    leaf = opened & ~split
    # every sample has exactly n_tokens leaves: nonzero's row-major order
    # gives each sample's leaves sorted by node id
    return leaf.nonzero()[:, 1].reshape(b, n_tokens)


def leaf_boxes(leaves: torch.Tensor, tree: QuadTree) -> torch.Tensor:
    """``[B, N, 3]`` (top row, left column, side) of each leaf, in tokens."""
    side = tree.node_side[leaves]
    return torch.stack([tree.row[leaves] * side, tree.col[leaves] * side, side], dim=-1)


@dataclass(frozen=True, eq=False)
class Partition:
    """The leaves of a batch of windows: ``leaves [B, N]`` node ids of ``tree``."""

    tree: QuadTree
    leaves: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.leaves.shape[1])

    def boxes(self) -> torch.Tensor:
        """``[B, N, 3]`` (top row, left column, side) of each leaf, in tokens."""
        return leaf_boxes(self.leaves, self.tree)


# --------------------------------------------------------------------------- model stages
# The pieces of Reslim's adaptive encoder and head that do not need the model:
# `Reslim.forward` calls them with its own embeddings (this module imports no model).
def per_level(image: torch.Tensor, tree: QuadTree) -> list[torch.Tensor]:
    """``image [B, C, H, W]`` average-pooled by each level's node side, root level first.

    A node of side s embeds its ``(s p) x (s p)`` pixels resized to ``p x p``:
    the node tokens of every level cost about 4/3 of the uniform embedding.
    """
    return [
        image if tree.side(lev) == 1 else F.avg_pool2d(image, tree.side(lev))
        for lev in range(tree.n_levels)
    ]


def leaf_tokens(nodes: torch.Tensor, leaves: torch.Tensor) -> torch.Tensor:
    """Each leaf's token ``[B, N, D]`` from the node tokens of every level ``[B, T, D]``."""
    b, n = leaves.shape
    return nodes.gather(1, leaves.unsqueeze(-1).expand(b, n, nodes.shape[-1]))


def leaf_positions(pe: torch.Tensor, part: Partition, leaf_embed: torch.Tensor) -> torch.Tensor:
    """Each leaf's position ``[B, N, D]``: the table ``pe [1, L, D]`` (the token grid's)
    averaged over the leaf's node, plus the learnt embedding of the node's side."""
    tree = part.tree
    gh, gw = tree.grid
    d = pe.shape[-1]
    image = pe.reshape(1, gh, gw, d).permute(0, 3, 1, 2)
    nodes = torch.cat([p.flatten(2) for p in per_level(image, tree)], dim=2)[0].T  # [T, D]
    return (nodes + leaf_embed[tree.scale_index])[part.leaves]


def paste_leaves(pix: torch.Tensor, part: Partition) -> torch.Tensor:
    """Each leaf's fine patch ``pix [B, N, n_out, kp, kp]`` → fine fields (padded size).

    Each token's patch per output is resized bilinearly to its leaf's
    ``(s k p) x (s k p)`` region and pasted there.  Leaves tile the grid, so the
    canvas is the sum of one canvas per level.
    """
    tree, leaves = part.tree, part.leaves
    b, _, n_out, kp, _ = pix.shape
    gh, gw = tree.grid
    leaf_level = tree.level[leaves]
    out = None
    for lev in range(tree.n_levels):
        s = tree.side(lev)
        bi, ni = (leaf_level == lev).nonzero(as_tuple=True)
        if bi.numel() == 0:
            continue
        patches = pix[bi, ni]  # [M, n_out, kp, kp]
        if s > 1:
            patches = F.interpolate(
                patches, size=(s * kp, s * kp), mode="bilinear", align_corners=False
            )
        nr, nc = tree.shapes[lev]
        canvas = pix.new_zeros(b, nr * nc, n_out, s * kp, s * kp)
        canvas = canvas.index_put((bi, leaves[bi, ni] - tree.offsets[lev]), patches)
        canvas = canvas.reshape(b, nr, nc, n_out, s * kp, s * kp)
        image = torch.einsum("nhwcpq->nchpwq", canvas).reshape(b, n_out, gh * kp, gw * kp)
        out = image if out is None else out + image
    assert out is not None  # there is at least one leaf
    return out
