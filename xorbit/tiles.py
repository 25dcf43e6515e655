"""TILES: the tile plan, its blend weights, and split / merge / fold of plain arrays.

No xarray and no torch here: numpy arrays in, numpy arrays out.

**The tile grid is global.**  Along each horizontal axis of ``size`` coarse pixels,
tile cores start at ``0, tile, 2 tile, ...``; when ``size`` is not a multiple of
``tile`` one more tile is shifted inward to end at ``size`` (as in the ORBIT-2
reference), so every tile has the same shape.  Each tile is read with a ``halo``
of context on every side: its *window* is ``[start - halo, start + tile + halo)``.
Because the plan depends only on the whole array's size, a pixel's value never
depends on how the array is chunked.

**Blending, not cropping.**  Each tile's fine prediction is weighted by a
separable ramp, ``sin²`` rising over ``2 halo`` coarse pixels from each window
edge; where two regular windows overlap the two ramps are ``sin²`` and ``cos²``
of the same angle, so they sum to one.  Weights are then divided by the sum over
all tiles, so they form an exact partition of unity everywhere (also around the
shifted tile, at the domain edges, and across the wrap of a periodic axis).  A
domain edge of a non-periodic axis has no neighbour to blend with: there the
ramp is one.

**Blocks.**  The array may be cut into blocks along tile boundaries (Dask
chunks).  A block ``[a, b)`` *owns* the tiles whose core starts in it; their
windows lie inside ``[a - halo, b + halo)``, so a block needs only ``halo`` of
context (`split`).  Its weighted predictions cover ``[a - halo, b + halo)`` at fine
resolution (`merge`): a *partial* whose outer ``halo * factor`` strips belong to
the neighbours.  `fold` adds the neighbours' strips into a block's core, which
gives the final field.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "AxisPlan",
    "TilePlan",
    "apply_tiled",
    "block_chunks",
    "fold",
    "fold_alone",
    "gather_halo",
    "merge",
    "pad_halo",
    "split",
]


@dataclass(frozen=True)
class AxisPlan:
    """The tiles along one axis.

    Parameters
    ----------
    size
        Number of coarse pixels along the axis.
    tile
        Core length of a tile; reduced to ``size`` when the axis is shorter.
    halo
        Context on each side of a core; reduced to ``size`` when larger.
    periodic
        Whether the axis wraps around (a global longitude).
    """

    size: int
    tile: int
    halo: int
    periodic: bool = False
    starts: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"tile plan: axis size must be >= 1, got {self.size}")
        if self.tile < 1:
            raise ValueError(f"tile plan: tile must be >= 1, got {self.tile}")
        if self.halo < 0:
            raise ValueError(f"tile plan: halo must be >= 0, got {self.halo}")
        object.__setattr__(self, "tile", min(int(self.tile), int(self.size)))
        object.__setattr__(self, "halo", min(int(self.halo), int(self.size)))
        starts = list(range(0, self.size - self.tile + 1, self.tile))
        if starts[-1] + self.tile < self.size:
            starts.append(self.size - self.tile)  # shifted inward: same shape
        object.__setattr__(self, "starts", tuple(starts))

    @property
    def window(self) -> int:
        """Length of a tile window (core plus two halos)."""
        return self.tile + 2 * self.halo

    def __len__(self) -> int:
        return len(self.starts)

    def owned(self, a: int, b: int) -> list[int]:
        """Indices of the tiles whose core starts in ``[a, b)``."""
        return [i for i, s in enumerate(self.starts) if a <= s < b]

    def raw_weights(self, i: int, factor: int) -> np.ndarray:
        """Un-normalized ramp weights of tile ``i`` at fine resolution (float64)."""
        n = self.window * factor
        u = (np.arange(n) + 0.5) / factor  # fine pixel centres, coarse units
        w = np.ones(n)
        ramp = 2 * self.halo
        if ramp == 0:
            return w
        left_edge = not self.periodic and self.starts[i] == 0
        right_edge = not self.periodic and self.starts[i] + self.tile == self.size
        if not left_edge:
            w *= np.sin(0.5 * np.pi * np.minimum(u / ramp, 1.0)) ** 2
        if not right_edge:
            w *= np.sin(0.5 * np.pi * np.minimum((self.window - u) / ramp, 1.0)) ** 2
        return w

    def weight_sum(self, factor: int) -> np.ndarray:
        """Sum of raw weights of all tiles at each fine pixel of the axis."""
        total = np.zeros(self.size * factor)
        for i in range(len(self)):
            pos, w = self._fine_positions(i, factor), self.raw_weights(i, factor)
            if self.periodic:
                np.add.at(total, pos % total.size, w)
            else:
                inside = (pos >= 0) & (pos < total.size)
                np.add.at(total, pos[inside], w[inside])
        return total

    def weights(self, i: int, factor: int, total: np.ndarray | None = None) -> np.ndarray:
        """Normalized blend weights of tile ``i``; zero outside a non-periodic domain."""
        total = self.weight_sum(factor) if total is None else total
        pos, w = self._fine_positions(i, factor), self.raw_weights(i, factor)
        if self.periodic:
            return w / total[pos % total.size]
        out = np.zeros_like(w)
        inside = (pos >= 0) & (pos < total.size)
        out[inside] = w[inside] / total[pos[inside]]
        return out

    def _fine_positions(self, i: int, factor: int) -> np.ndarray:
        start = (self.starts[i] - self.halo) * factor
        return start + np.arange(self.window * factor)


def _pair(value: Any) -> tuple[Any, ...]:
    """``(value, value)`` for a scalar (NumPy's included), else ``tuple(value)``."""
    # a function rather than an inline conditional: np.isscalar narrows only
    # its True branch for mypy, so the sequence branch would not type-check
    return (value, value) if np.isscalar(value) else tuple(value)


@dataclass(frozen=True)
class TilePlan:
    """Tiles over a 2-D ``(ny, nx)`` grid: the product of two axis plans."""

    y: AxisPlan
    x: AxisPlan
    factor: int

    @classmethod
    def build(
        cls,
        shape: Sequence[int],
        tile: int | Sequence[int],
        halo: int | Sequence[int],
        factor: int,
        periodic: bool | Sequence[bool] = (False, False),
    ) -> TilePlan:
        """Plan for a grid of ``shape = (ny, nx)``; scalars apply to both axes."""
        tile, halo, periodic = _pair(tile), _pair(halo), _pair(periodic)
        if int(factor) < 1:
            raise ValueError(f"tile plan: factor must be >= 1, got {factor}")
        return cls(
            AxisPlan(int(shape[0]), int(tile[0]), int(halo[0]), bool(periodic[0])),
            AxisPlan(int(shape[1]), int(tile[1]), int(halo[1]), bool(periodic[1])),
            int(factor),
        )

    @property
    def halo(self) -> tuple[int, int]:
        return self.y.halo, self.x.halo

    @property
    def window(self) -> tuple[int, int]:
        return self.y.window, self.x.window

    def __len__(self) -> int:
        return len(self.y) * len(self.x)

    def tile_weights(self, iy: int, ix: int) -> np.ndarray:
        """Normalized 2-D weights ``[wy * k, wx * k]`` of tile ``(iy, ix)``."""
        return np.outer(*_axis_weights(self, iy, ix))

    def owned(self, y0: int, y1: int, x0: int, x1: int) -> list[tuple[int, int]]:
        """Tiles whose core starts inside the block ``[y0, y1) x [x0, x1)``."""
        return [(iy, ix) for iy in self.y.owned(y0, y1) for ix in self.x.owned(x0, x1)]


@functools.lru_cache(maxsize=4096)
def _axis_weights(plan: TilePlan, iy: int, ix: int) -> tuple[np.ndarray, np.ndarray]:
    """1-D weights of a tile, cached: plans are frozen and reused by every block."""
    sy, sx = _weight_sums(plan)
    return plan.y.weights(iy, plan.factor, sy), plan.x.weights(ix, plan.factor, sx)


@functools.lru_cache(maxsize=64)
def _weight_sums(plan: TilePlan) -> tuple[np.ndarray, np.ndarray]:
    return plan.y.weight_sum(plan.factor), plan.x.weight_sum(plan.factor)


def block_chunks(plan: AxisPlan, preferred: int) -> tuple[int, ...]:
    """Chunk sizes along an axis that cut only at tile boundaries.

    Each chunk is a multiple of the tile near ``preferred`` and at least as long
    as the halo; a short remainder is merged into the last chunk, so that the
    shifted last tile and every halo stay within one neighbour.
    """
    t = plan.tile
    step = max(t, round(max(preferred, 1) / t) * t, -(-plan.halo // t) * t)
    bounds = list(range(0, plan.size, step))
    chunks = [min(step, plan.size - b) for b in bounds]
    if len(chunks) > 1 and chunks[-1] < max(step, plan.halo):
        last = chunks.pop()
        chunks[-1] += last
    return tuple(chunks)


def split(
    block: np.ndarray, plan: TilePlan, origin: tuple[int, int], tiles: Sequence[tuple[int, int]]
) -> Iterator[np.ndarray]:
    """Windows of ``tiles`` cut from a block extended by the halo.

    ``block[..., i, j]`` holds coarse pixel ``(origin[0] - halo_y + i,
    origin[1] - halo_x + j)``.  Yields views of shape ``[..., wy, wx]``.
    """
    hy, hx = plan.halo
    wy, wx = plan.window
    for iy, ix in tiles:
        r = plan.y.starts[iy] - hy - (origin[0] - hy)
        c = plan.x.starts[ix] - hx - (origin[1] - hx)
        if r < 0 or c < 0 or r + wy > block.shape[-2] or c + wx > block.shape[-1]:
            raise ValueError(
                f"tile ({iy}, {ix}) window does not fit the block of shape "
                f"{block.shape[-2:]} at origin {origin}: the block must be extended by the halo"
            )
        yield block[..., r : r + wy, c : c + wx]


def merge(
    preds: Sequence[np.ndarray] | Iterator[np.ndarray],
    plan: TilePlan,
    origin: tuple[int, int],
    tiles: Sequence[tuple[int, int]],
    block_shape: tuple[int, int],
    dtype=None,
) -> np.ndarray:
    """Weighted sum of fine tile predictions over the block's extended area.

    ``preds[n]`` has shape ``[..., wy k, wx k]`` and belongs to ``tiles[n]``;
    ``block_shape`` is the block's *core* ``(ny, nx)``.  The sum is kept in
    ``dtype`` (default: the predictions' dtype, at least float32).  Returns the partial
    ``[..., (ny + 2 hy) k, (nx + 2 hx) k]`` to be completed by `fold`.
    """
    k = plan.factor
    hy, hx = plan.halo
    wy, wx = plan.window
    out = None
    for pred, (iy, ix) in zip(preds, tiles, strict=True):
        if out is None:
            shape = (*pred.shape[:-2], (block_shape[0] + 2 * hy) * k, (block_shape[1] + 2 * hx) * k)
            out = np.zeros(shape, dtype=dtype or np.result_type(pred.dtype, np.float32))
        r = (plan.y.starts[iy] - origin[0]) * k
        c = (plan.x.starts[ix] - origin[1]) * k
        out[..., r : r + wy * k, c : c + wx * k] += pred * plan.tile_weights(iy, ix)
    if out is None:
        raise ValueError(f"block at {origin} owns no tile")
    return out


def _strip(pos: int, d: int, n_nb: int, n_core: int):
    """Source and destination slices along one axis for neighbour position 0/1/2."""
    if pos == 1:
        return slice(d, n_nb - d), slice(0, n_core)
    if d == 0:
        return None
    if pos == 0:  # the neighbour before us: its last d pixels are our first d
        return slice(n_nb - d, n_nb), slice(0, d)
    return slice(0, d), slice(n_core - d, n_core)  # the one after: its first d


def fold(neighbours: Sequence[Sequence[np.ndarray | None]], depth: tuple[int, int]) -> np.ndarray:
    """Complete a partial: its core plus the strips its neighbours spill into it.

    ``neighbours`` is the 3 x 3 grid of partials (from `merge`) around a block,
    ``neighbours[1][1]`` the block itself, ``None`` where there is no neighbour
    (beyond a non-periodic edge).  Each partial covers its core plus ``depth``
    fine pixels on every side; the outer ``depth`` strips of a neighbour belong to
    us.  Returns the finished core.  The one fold of xorbit: the Dask stage 2,
    the in-memory path and training validation all go through it.
    """
    dy, dx = depth
    centre = neighbours[1][1]
    assert centre is not None, "fold: the block itself (neighbours[1][1]) is missing"
    out = centre[..., dy : centre.shape[-2] - dy, dx : centre.shape[-1] - dx].copy()
    ny, nx = out.shape[-2:]
    for i, row in enumerate(neighbours):
        for j, nb in enumerate(row):
            if nb is None or (i == 1 and j == 1):
                continue
            ys = _strip(i, dy, nb.shape[-2], ny)
            xs = _strip(j, dx, nb.shape[-1], nx)
            if ys is None or xs is None:
                continue
            (src_y, dst_y), (src_x, dst_x) = ys, xs
            out[..., dst_y, dst_x] += nb[..., src_y, src_x]
    return out


def gather_halo(
    neighbours: Sequence[Sequence[np.ndarray | None]],
    halo: tuple[int, int],
) -> np.ndarray:
    """A block extended by its halo, from its 3 x 3 neighbours: stage 1's input.

    ``neighbours`` is the 3 x 3 grid of blocks ``[..., ny_i, nx_j]`` around a
    block (``neighbours[1][1]``), ``None`` beyond a non-periodic edge, where the
    edge values are repeated (as `pad_halo` does for a whole array; on a
    periodic axis the caller passes the wrapped-around neighbours).  Each
    neighbour must be at least ``halo`` long where it is read.
    """
    hy, hx = halo

    def row(i: int, rows: slice) -> np.ndarray | None:
        centre = neighbours[i][1]
        if centre is None:
            return None
        parts = [centre[..., rows, :]]
        if hx:
            left, right = neighbours[i][0], neighbours[i][2]
            mid = parts[0]
            parts.insert(0, left[..., rows, -hx:] if left is not None else _edge(mid, -1, hx, 0))
            parts.append(right[..., rows, :hx] if right is not None else _edge(mid, -1, hx, -1))
        return np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]

    middle = row(1, slice(None))
    assert middle is not None, "gather_halo: the block itself (neighbours[1][1]) is missing"
    if not hy:
        return middle
    top = row(0, slice(-hy, None))
    bottom = row(2, slice(0, hy))
    top = top if top is not None else _edge(middle, -2, hy, 0)
    bottom = bottom if bottom is not None else _edge(middle, -2, hy, -1)
    return np.concatenate([top, middle, bottom], axis=-2)


def _edge(a: np.ndarray, axis: int, n: int, at: int) -> np.ndarray:
    """The first (``at=0``) or last (``at=-1``) slice of ``a`` along ``axis``,
    repeated ``n`` times."""
    index = [slice(None)] * a.ndim
    index[axis] = slice(0, 1) if at == 0 else slice(-1, None)
    return np.repeat(a[tuple(index)], n, axis=axis)


def pad_halo(field_: np.ndarray, plan: TilePlan) -> np.ndarray:
    """A whole ``[..., ny, nx]`` array extended by the halo: wrapped on a periodic
    axis, edge values otherwise (what Dask's overlap gives a block at the edge)."""
    ext = field_
    for axis, h, periodic in (
        (-2, plan.y.halo, plan.y.periodic),
        (-1, plan.x.halo, plan.x.periodic),
    ):
        width = [(0, 0)] * field_.ndim
        width[axis] = (h, h)
        ext = np.pad(ext, width, mode="wrap" if periodic else "edge")
    return ext


def fold_alone(partial: np.ndarray, plan: TilePlan) -> np.ndarray:
    """`fold` for one block that covers the whole array: on a periodic axis it is
    its own neighbour."""
    k = plan.factor
    grid: list[list[np.ndarray | None]] = [[None] * 3 for _ in range(3)]
    grid[1][1] = partial
    if plan.x.periodic:
        grid[1][0] = grid[1][2] = partial
    if plan.y.periodic:
        grid[0][1] = grid[2][1] = partial
        if plan.x.periodic:
            grid[0][0] = grid[0][2] = grid[2][0] = grid[2][2] = partial
    return fold(grid, (plan.y.halo * k, plan.x.halo * k))


def apply_tiled(
    field_: np.ndarray,
    plan: TilePlan,
    predict: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """Run ``predict`` over every tile of a whole ``[..., ny, nx]`` array in memory.

    The reference path for tests and small arrays: pads by the halo (wrap on a
    periodic axis, edge values otherwise), splits, predicts, merges and folds.
    """
    ny, nx = field_.shape[-2:]
    tiles = plan.owned(0, ny, 0, nx)
    ext = pad_halo(field_, plan)
    partial = merge(
        (predict(w) for w in split(ext, plan, (0, 0), tiles)), plan, (0, 0), tiles, (ny, nx)
    )
    return fold_alone(partial, plan)
