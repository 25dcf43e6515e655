import numpy as np
import pytest
import torch

from tests.datasets import tiny_config
from xorbit import Reslim
from xorbit.model.reslim import sincos_pos_embed_2d, unpatchify


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Reslim(tiny_config(**overrides)).eval()


@pytest.mark.parametrize("layout", ["local", "reference"])
@pytest.mark.parametrize(
    ("shape", "factor", "expected"),
    [((37, 49), 4, (148, 196)), ((9, 12), 4, (36, 48)), ((5, 3), 2, (10, 6)), ((1, 1), 3, (3, 3))],
)
def test_output_shape_for_any_grid(layout, shape, factor, expected):
    model = make_model(factor=factor, unpatchify=layout)
    x = torch.randn(2, 2, *shape)
    with torch.no_grad():
        y = model(x, ["tas", "orog"])
    assert y.shape == (2, 1, *expected)
    assert torch.isfinite(y).all()


def test_reordered_variables_give_the_same_output():
    model = make_model(in_vars=["tas", "orog", "pr"])
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = model(x, ["tas", "orog", "pr"])
        perm = model(x[:, [2, 0, 1]], ["pr", "tas", "orog"])
    torch.testing.assert_close(perm, ref, rtol=1e-5, atol=1e-5)


def test_subset_of_inputs_is_accepted_and_used():
    model = make_model(in_vars=["tas", "orog", "pr"])
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        full = model(x, ["tas", "orog", "pr"])
        subset = model(x[:, :2], ["tas", "orog"])
        enc_full = model.forward_encoder(x, ["tas", "orog", "pr"])
        enc_subset = model.forward_encoder(x[:, :2], ["tas", "orog"])
    assert subset.shape == full.shape
    assert not torch.equal(subset, full)
    # dropping an input changes the tokens far above float round-off (~1e-6)
    assert (enc_subset - enc_full).abs().max() > 1e-3


def test_missing_residual_variable_is_named():
    model = make_model(in_vars=["tas", "orog", "pr"])
    with pytest.raises(KeyError, match=r"needs input variables \['orog'\]"):
        model(torch.randn(1, 2, 8, 8), ["tas", "pr"])


def test_unknown_variable_and_channel_mismatch_are_named():
    model = make_model()
    with pytest.raises(KeyError, match=r"\['huss'\] are unknown to this model"):
        model(torch.randn(1, 3, 8, 8), ["tas", "orog", "huss"])
    with pytest.raises(ValueError, match="x has 3 channels but 2 variable names"):
        model(torch.randn(1, 3, 8, 8), ["tas", "orog"])
    with pytest.raises(ValueError, match=r"shape \[B, C, h, w\]"):
        model(torch.randn(2, 8, 8), ["tas", "orog"])


def test_output_is_head_plus_residual():
    model = make_model()
    x = torch.randn(2, 2, 7, 9)  # odd: exercises padding
    with torch.no_grad():
        xp = model._pad(x)
        grid = model.token_grid(xp.shape[-2:])
        head = model.forward_head(model.forward_encoder(xp, ["tas", "orog"]), grid)
        res = model.residual(xp, ["tas", "orog"])
        out = model(x, ["tas", "orog"])
    torch.testing.assert_close(out, (head + res)[..., :28, :36])
    assert res.abs().mean() > 1e-3  # the residual path contributes


def test_zero_head_leaves_exactly_the_residual_path():
    model = make_model()
    with torch.no_grad():
        for layer in (model.head[-1], model.conv_out):
            layer.weight.zero_()
            layer.bias.zero_()
        x = torch.randn(1, 2, 8, 8)
        out = model(x, ["tas", "orog"])
        torch.testing.assert_close(out, model.residual(x, ["tas", "orog"]), rtol=0, atol=0)
        # the residual sees only the output and static channels
        y = x.clone()
        model2 = make_model(in_vars=["tas", "orog", "pr"])
        r1 = model2.residual(torch.cat([x, y[:, :1]], 1), ["tas", "orog", "pr"])
        r2 = model2.residual(torch.cat([x, 5 + y[:, :1]], 1), ["tas", "orog", "pr"])
    torch.testing.assert_close(r1, r2, rtol=0, atol=0)


@pytest.mark.parametrize("learn_pos", [False, True])
def test_gradients_reach_every_trainable_parameter(learn_pos):
    model = make_model(learn_pos_embed=learn_pos).train()
    x = torch.randn(2, 2, 8, 8)
    y = model(x, ["tas", "orog"])
    (y.square().mean()).backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert ("pos_embed" in names) is learn_pos
    dead = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    zero = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None and p.grad.abs().sum() == 0
    ]
    assert dead == [] and zero == []


def test_local_unpatchify_keeps_tokens_above_their_patch():
    b, gh, gw, k, p, v = 1, 3, 4, 2, 2, 1
    pixels = torch.arange(gh * gw, dtype=torch.float32).reshape(1, -1, 1).expand(b, -1, v * 16)
    out = unpatchify(pixels, (gh, gw), v, k, p, "local")
    assert out.shape == (1, 1, gh * k * p, gw * k * p)
    blocks = out[0, 0].reshape(gh, k * p, gw, k * p)
    for i in range(gh):
        for j in range(gw):
            assert torch.all(blocks[i, :, j, :] == i * gw + j)


def test_reference_unpatchify_is_the_published_flat_reshape():
    b, gh, gw, k, p, v = 1, 3, 4, 2, 2, 1
    pixels = torch.arange(gh * gw, dtype=torch.float32).reshape(1, -1, 1).expand(b, -1, v * 16)
    out = unpatchify(pixels, (gh, gw), v, k, p, "reference")[0, 0].numpy()
    # p x p fine patches numbered row-major over a (gh k) x (gw k) grid; patch f
    # belongs to token f // k^2 (k^2 patches per token, consecutive)
    expected = np.zeros_like(out)
    for f in range(gh * k * gw * k):
        r, c = divmod(f, gw * k)
        expected[r * p : (r + 1) * p, c * p : (c + 1) * p] = f // (k * k)
    np.testing.assert_array_equal(out, expected)
    # and so token 0 does not sit above its own patch only: it fills a whole row
    assert set(np.unique(out[:p, : k * k * p])) == {0.0}


def test_position_embedding_table_and_resize():
    model = make_model(img_size=(8, 12))
    assert model.pos_embed.shape == (1, 4 * 6, 32)
    np.testing.assert_allclose(
        model.pos_embed[0].detach().numpy(), sincos_pos_embed_2d(32, 4, 6), rtol=0, atol=0
    )
    assert model.position_embedding((4, 6)) is model.pos_embed
    resized = model.position_embedding((8, 3))
    assert resized.shape == (1, 24, 32)
    # sin-cos codes are bounded by one; bicubic overshoot stays small
    assert resized.abs().max() < 1.2


def test_eval_forward_is_deterministic_and_train_mode_uses_dropout():
    model = make_model(drop_rate=0.5)
    x = torch.randn(1, 2, 8, 8)
    with torch.no_grad():
        a, b = model(x, ["tas", "orog"]), model(x, ["tas", "orog"])
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        model.train()
        c = model(x, ["tas", "orog"])
    assert (c - a).abs().max() > 1e-4
