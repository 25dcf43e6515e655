import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xorbit.tiles import (
    AxisPlan,
    TilePlan,
    apply_tiled,
    block_chunks,
    fold,
    gather_halo,
    merge,
    pad_halo,
    split,
)


def upsample(k):
    """An identity-like 'model': each coarse pixel repeated k x k times."""
    return lambda w: np.repeat(np.repeat(w, k, axis=-2), k, axis=-1)


axis_sizes = st.integers(1, 40)
tiles_ = st.integers(1, 16)
halos = st.integers(0, 6)


@settings(max_examples=150, deadline=None)
@given(size=axis_sizes, tile=tiles_, halo=halos, periodic=st.booleans(), k=st.integers(1, 4))
def test_weights_cover_every_pixel_and_sum_to_one(size, tile, halo, periodic, k):
    plan = AxisPlan(size, tile, halo, periodic)
    assert plan.starts[0] == 0 and plan.starts[-1] + plan.tile == size
    covered = np.zeros(size, bool)
    for s in plan.starts:
        covered[s : s + plan.tile] = True
    assert covered.all()  # every pixel lies in some core
    total = np.zeros(size * k)
    sums = plan.weight_sum(k)
    assert (sums > 0).all()
    for i in range(len(plan)):
        w = plan.weights(i, k, sums)
        assert w.shape == (plan.window * k,) and (w >= 0).all()
        pos = (plan.starts[i] - plan.halo) * k + np.arange(w.size)
        if periodic:
            np.add.at(total, pos % total.size, w)
        else:
            inside = (pos >= 0) & (pos < total.size)
            assert (w[~inside] == 0).all()
            np.add.at(total, pos[inside], w[inside])
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(
    ny=axis_sizes,
    nx=axis_sizes,
    tile=tiles_,
    halo=halos,
    periodic=st.booleans(),
    k=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_identity_model_reproduces_the_input(ny, nx, tile, halo, periodic, k, seed):
    x = np.random.default_rng(seed).standard_normal((2, ny, nx))
    plan = TilePlan.build((ny, nx), tile, halo, k, periodic=(False, periodic))
    out = apply_tiled(x, plan, upsample(k))
    np.testing.assert_allclose(out, upsample(k)(x), rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(4, 40),
    tile=st.integers(2, 8),
    halo=st.integers(0, 4),
    preferred=st.integers(1, 20),
    periodic=st.booleans(),
)
def test_blocks_and_fold_equal_the_whole_array(n, tile, halo, preferred, periodic):
    """Cutting into blocks (Dask chunks) and folding gives the one-block answer."""
    k = 2
    rng = np.random.default_rng(n * 100 + tile)
    x = rng.standard_normal((1, 3, n))

    def model(w):  # not identity: mixes the whole tile, like attention does
        up = upsample(k)(w)
        return up + w.mean(axis=(-2, -1), keepdims=True)

    plan = TilePlan.build((3, n), tile, (0, halo), k, periodic=(False, periodic))
    whole = apply_tiled(x, plan, model)
    chunks = block_chunks(plan.x, preferred)
    assert sum(chunks) == n and all(c >= min(plan.x.tile, n) for c in chunks)
    assert all(c >= plan.x.halo for c in chunks) or len(chunks) == 1
    h = plan.x.halo
    ext = np.pad(x, [(0, 0), (0, 0), (h, h)], mode="wrap" if periodic else "edge")
    partials, a = [], 0
    for c in chunks:
        tiles = plan.owned(0, 3, a, a + c)
        blk = ext[..., a : a + c + 2 * h]
        partials.append(
            merge([model(w) for w in split(blk, plan, (0, a), tiles)], plan, (0, a), tiles, (3, c))
        )
        a += c
    # fold each partial with its neighbours' strips (what the Dask overlap provides)
    d = h * k
    out = []
    for i, p in enumerate(partials):
        if d == 0:
            out.append(p)
            continue
        left = partials[i - 1] if (i > 0 or periodic) else None
        right = partials[(i + 1) % len(partials)] if (i + 1 < len(partials) or periodic) else None
        out.append(fold([[None] * 3, [left, p, right], [None] * 3], (0, d)))
    np.testing.assert_allclose(np.concatenate(out, axis=-1), whole, rtol=0, atol=1e-12)


def test_plan_geometry_by_hand():
    p = AxisPlan(10, 4, 1)
    assert p.starts == (0, 4, 6)  # last tile shifted inward to end at 10
    assert p.window == 6
    assert p.owned(0, 4) == [0] and p.owned(4, 10) == [1, 2]
    assert AxisPlan(3, 8, 5).tile == 3 and AxisPlan(3, 8, 5).halo == 3
    # a regular interior overlap is sin^2 / cos^2: 0.5 exactly at the core boundary
    q = AxisPlan(12, 4, 2, periodic=True)
    w0, w1 = q.raw_weights(0, 1), q.raw_weights(1, 1)
    np.testing.assert_allclose(w0[4:8] + w1[0:4], 1.0)
    # pixel 5 of window 0: centre 5.5, 2.5 from the right edge, ramp width 4
    assert q.weights(0, 1)[5] == pytest.approx(np.sin(np.pi / 2 * 2.5 / 4) ** 2)


def test_split_refuses_a_block_without_halo():
    plan = TilePlan.build((8, 8), 4, 2, 1)
    with pytest.raises(ValueError, match="must be extended by the halo"):
        list(split(np.zeros((8, 8)), plan, (0, 0), [(1, 1)]))


def test_bad_plans_are_named():
    with pytest.raises(ValueError, match="tile must be >= 1"):
        AxisPlan(5, 0, 1)
    with pytest.raises(ValueError, match="halo must be >= 0"):
        AxisPlan(5, 2, -1)
    with pytest.raises(ValueError, match="factor must be >= 1"):
        TilePlan.build((4, 4), 2, 1, 0)


@pytest.mark.parametrize("periodic", [False, True])
def test_a_block_gathers_its_halo_from_its_neighbours_as_the_whole_array_pads(periodic):
    rng = np.random.default_rng(0)
    field_ = rng.normal(size=(2, 3, 13, 17))
    plan = TilePlan.build((13, 17), (3, 4), (2, 3), 4, periodic=(False, periodic))
    ys, xs = (5, 4, 4), (6, 5, 6)  # every chunk at least as long as the halo
    yo, xo = np.cumsum((0, *ys)), np.cumsum((0, *xs))
    blocks = [
        [field_[..., yo[i] : yo[i + 1], xo[j] : xo[j + 1]] for j in range(3)] for i in range(3)
    ]
    whole = pad_halo(field_, plan)
    for iy in range(3):
        for ix in range(3):
            grid = [[None] * 3 for _ in range(3)]
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    jy, jx = iy + dy, ix + dx
                    jx = jx % 3 if periodic else jx
                    if 0 <= jy < 3 and 0 <= jx < 3:
                        grid[dy + 1][dx + 1] = blocks[jy][jx]
            got = gather_halo(grid, (2, 3))
            want = whole[..., yo[iy] : yo[iy + 1] + 4, xo[ix] : xo[ix + 1] + 6]
            np.testing.assert_array_equal(got, want)
