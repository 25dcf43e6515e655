"""Adaptive (quadtree) tokens: config, partition, equivalence with uniform tokens, gradients, tiles."""

import dask.array as da
import numpy as np
import pytest
import torch

import xorbit
from tests.datasets import powerlaw_field, tiny_config
from xorbit.engine import downscale_array
from xorbit.model import adaptive
from xorbit.model.reslim import Reslim

VARS = ["tas", "orog"]


def adaptive_config(**overrides):
    params = dict(tokens="adaptive", max_leaf=4, max_tokens=None)
    return tiny_config(**{**params, **overrides})


def with_nonzero_outputs(model):
    """Random weights in the layers a skip config starts at zero, so every path counts."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for last in (model.conv_out, model.path2[-1]):
            last.weight.copy_(0.1 * torch.randn(last.weight.shape, generator=gen))
            last.bias.copy_(0.1 * torch.randn(last.bias.shape, generator=gen))
    return model


def front(b=2, h=16, w=24, seed=0):
    """A smooth field with one sharp vertical front at column 14, plus a static channel."""
    gen = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(h) / h, torch.arange(w) / w, indexing="ij")
    tas = 0.3 * torch.sin(2 * torch.pi * y) * torch.cos(torch.pi * x) + 2.0 * (x >= 14 / w)
    tas = tas + 0.01 * torch.randn(b, h, w, generator=gen)
    orog = 0.1 * torch.randn(b, h, w, generator=gen)
    return torch.stack([tas, orog], dim=1)


# --------------------------------------------------------------------------- config
def test_config_defaults_validation_and_round_trip():
    cfg = tiny_config()
    assert (cfg.tokens, cfg.max_tokens, cfg.max_leaf) == ("uniform", None, 8)
    ada = adaptive_config(max_tokens=40)
    again = xorbit.ReslimConfig.from_dict(ada.to_dict())
    assert again == ada and again.tokens == "adaptive" and again.max_tokens == 40
    assert xorbit.ReslimConfig.from_yaml(ada.to_yaml()) == ada
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("tokens", "max_tokens", "max_leaf")}
    assert xorbit.ReslimConfig.from_dict(old) == cfg  # configs saved before the keys
    for bad, field in [
        (dict(tokens="quad"), "tokens"),
        (dict(max_leaf=6), "max_leaf"),
        (dict(max_leaf=0), "max_leaf"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=2.5), "max_tokens"),
        (dict(unpatchify="reference"), "unpatchify"),
    ]:
        with pytest.raises(ValueError, match=field):
            adaptive_config(**bad)
    # the uniform model has no new parameter: reference names are unchanged
    assert "leaf_embed" not in Reslim(cfg).state_dict()
    assert Reslim(ada).leaf_embed.shape == (3, cfg.embed_dim)  # sides 1, 2, 4


def test_num_tokens_and_too_small_budget():
    model = Reslim(adaptive_config(max_tokens=40))
    # 16 x 24 pixels, patch 2: 8 x 12 = 96 tokens, 2 x 3 = 6 roots of 4 x 4 tokens
    assert Reslim(tiny_config()).num_tokens((16, 24)) == 96
    assert model.num_tokens((16, 24)) == 39  # 6 + 3 * 11 <= 40
    assert Reslim(adaptive_config()).num_tokens((16, 24)) == 24  # None: L / 4
    assert Reslim(adaptive_config(max_tokens=10**6)).num_tokens((16, 24)) == 96
    # 13 x 17 pads to 16 x 24: a multiple of max_leaf * patch
    assert model.num_tokens((13, 17)) == 39
    small = Reslim(adaptive_config(max_tokens=5))
    with pytest.raises(ValueError, match=r"max_tokens=5.*n_roots=6.*max_leaf=4"):
        small(front())


# --------------------------------------------------------------------------- partition
def test_partition_covers_every_token_once_with_n_leaves():
    model = Reslim(adaptive_config(max_tokens=40))
    x = torch.randn(3, 2, 16, 24)
    part = model.partition(x, VARS)
    assert part.leaves.shape == (3, 39) and not part.leaves.requires_grad
    cover = torch.zeros(3, 8, 12, dtype=torch.int64)
    for b, boxes in enumerate(part.boxes()):
        for r, c, s in boxes.tolist():
            cover[b, r : r + s, c : c + s] += 1
    assert (cover == 1).all()
    sides = part.boxes()[..., 2]
    assert set(sides.unique().tolist()) <= {1, 2, 4}
    # the area adds up: 96 tokens per sample
    assert (sides**2).sum(1).tolist() == [96, 96, 96]


def test_small_leaves_follow_a_sharp_front():
    model = Reslim(adaptive_config(max_tokens=30))
    part = model.partition(front(), VARS)
    boxes = part.boxes()
    # the front sits between pixel columns 13 and 14: token column 6 / 7
    near = (boxes[..., 1] <= 7) & (boxes[..., 1] + boxes[..., 2] >= 7)
    side = boxes[..., 2].float()
    for b in range(boxes.shape[0]):
        assert side[b][near[b]].mean() < 2.0 < side[b][~near[b]].mean(), boxes[b]
    # and with no edges at all the cut is even, coarse to fine
    even = model.partition(torch.zeros(1, 2, 16, 24), VARS).boxes()[0, :, 2]
    # 30 tokens: the 6 roots split into 24, then two more splits in the first row
    assert even.tolist().count(4) == 0 and even.tolist().count(2) == 22
    assert even.tolist().count(1) == 8


def test_edge_pixels_of_a_constant_image_are_none():
    assert not adaptive.edge_pixels(torch.full((2, 8, 8), 3.0)).any()
    step = torch.zeros(1, 8, 8)
    step[:, :, 4:] = 1.0
    edges = adaptive.edge_pixels(step)[0]
    assert edges[:, 3:5].all() and not edges[:, :2].any() and not edges[:, 6:].any()


# --------------------------------------------------------------------------- equivalence
def test_all_leaves_one_token_is_the_uniform_model():
    torch.manual_seed(0)
    uniform = with_nonzero_outputs(Reslim(tiny_config(interp_skip="bicubic"))).eval()
    ada = Reslim(adaptive_config(interp_skip="bicubic", max_tokens=10**6)).eval()
    missing = ada.load_state_dict(uniform.state_dict(), strict=False).missing_keys
    assert missing == ["leaf_embed"] and (ada.leaf_embed == 0).all()
    x = front(b=3, h=16, w=24)
    with torch.no_grad():
        ref, out = uniform(x, VARS), ada(x, VARS)
    assert out.shape == (3, 1, 64, 96)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # fewer tokens: a different, finite answer
    few = Reslim(adaptive_config(interp_skip="bicubic", max_tokens=30)).eval()
    few.load_state_dict(ada.state_dict())
    with torch.no_grad():
        approx = few(x, VARS)
    assert torch.isfinite(approx).all() and (approx - ref).abs().max() > 1e-4


def test_batch_invariance():
    torch.manual_seed(1)
    model = with_nonzero_outputs(Reslim(adaptive_config(max_tokens=30))).eval()
    x = torch.cat([front(b=2, seed=4), torch.randn(2, 2, 16, 24)])
    with torch.no_grad():
        batch = model(x, VARS)
        alone = torch.cat([model(x[i : i + 1], VARS) for i in range(4)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_stage():
    torch.manual_seed(2)
    model = with_nonzero_outputs(Reslim(adaptive_config(max_tokens=30)))
    x = front(b=2).requires_grad_(True)
    model(x, VARS).square().mean().backward()
    for name in (
        "token_embeds.0.proj.weight",
        "var_embed",
        "var_agg.q.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.1.mlp.fc2.weight",
        "head.0.weight",
        "head.2.weight",
        "conv_out.weight",
        "leaf_embed",
        "pos_embed",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # every leaf side present gets its own gradient row
    sides = model.partition(x, VARS).boxes()[..., 2].unique()
    rows = torch.log2(sides.float()).long()
    assert (model.leaf_embed.grad[rows].abs().sum(1) > 0).all()


# --------------------------------------------------------------------------- tiles
def test_downscale_array_with_tiles_is_chunk_invariant():
    cfg = adaptive_config(in_vars=["tas", "orog"], img_size=(8, 8), max_tokens=7)
    dsr = xorbit.Downscaler.from_config(
        cfg, seed=5, mean={"tas": 280.0, "orog": 500.0}, std={"tas": 10.0, "orog": 100.0},
        units={"tas": "K"},
    )  # fmt: skip
    with_nonzero_outputs(dsr.model)
    assert dsr.model.num_tokens((8, 8)) == 7  # 16 uniform tokens, 1 root of 4 x 4
    x = (280 + 10 * powerlaw_field((2, 2, 12, 16), seed=0)).astype(np.float32)
    eager = downscale_array(x, dsr, tile=4, halo=2, device="cpu")
    assert eager.shape == (2, 1, 48, 64) and np.isfinite(eager).all()
    lazy = downscale_array(da.from_array(x, chunks=(1, 2, 5, 7)), dsr, tile=4, halo=2)
    np.testing.assert_allclose(lazy.compute(), eager, rtol=0, atol=1e-4)
    other = downscale_array(da.from_array(x, chunks=(2, 2, 12, 8)), dsr, tile=4, halo=2)
    np.testing.assert_allclose(other.compute(), eager, rtol=0, atol=1e-4)
    # the tokens matter: the uniform model with the same weights differs
    uni = xorbit.Downscaler.from_config(
        cfg.replace(tokens="uniform"), seed=5, mean={"tas": 280.0, "orog": 500.0},
        std={"tas": 10.0, "orog": 100.0}, units={"tas": "K"},
    )  # fmt: skip
    uni.model.load_state_dict(dsr.model.state_dict(), strict=False)
    assert np.abs(downscale_array(x, uni, tile=4, halo=2, device="cpu") - eager).max() > 1e-3


def _greedy(counts, tree, n_tokens):
    """The definition, one split at a time: the leaf of side > 1 with the most
    edge pixels (ties: the first in node order, i.e. the larger leaf)."""
    b, t = counts.shape
    leaf = torch.zeros(b, t, dtype=torch.bool)
    leaf[:, : tree.n_roots] = True
    splittable = (tree.level < tree.n_levels - 1).unsqueeze(0)
    rows = torch.arange(b)
    for _ in range((n_tokens - tree.n_roots) // 3):
        best = torch.where(leaf & splittable, counts.float(), -1.0).argmax(dim=1)
        leaf[rows, best] = False
        leaf[rows.unsqueeze(1), tree.children[best]] = True
    return leaf.nonzero()[:, 1].reshape(b, n_tokens)


@pytest.mark.parametrize("density", [0.0, 0.05, 0.3])
def test_the_sorted_partition_is_the_greedy_one(density):
    """One sort gives exactly the leaves of the step-by-step greedy definition
    (with ties, and for every budget)."""
    gen = torch.Generator().manual_seed(3)
    tree = adaptive.quadtree((8, 16), 4)
    edges = torch.rand(5, 16, 32, generator=gen) < density
    edges[1] = False  # nothing to choose by: ties everywhere
    counts = adaptive.node_counts(edges, tree, patch_size=2)
    for n_tokens in range(tree.n_roots, 8 * 16 + 1, 3):
        torch.testing.assert_close(
            adaptive.partition(counts, tree, n_tokens), _greedy(counts, tree, n_tokens)
        )
