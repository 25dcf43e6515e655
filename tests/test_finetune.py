"""Fine-tuning from pretrained weights: `xorbit.train(init=, freeze=)`."""

import numpy as np
import pytest
import torch
import xarray as xr

import xorbit
from tests.test_train import fine_field, max_diff, small_config, weights
from xorbit import coarsen
from xorbit.cli import main
from xorbit.model.reslim import Reslim
from xorbit.training import TrainOptions, finetune, loop

KW = dict(epochs=2, batch_size=4, progress=False, device="cpu")


@pytest.fixture(scope="module")
def pretrained_dsr():
    fine = fine_field(nt=24, n=32, seed=1)
    return xorbit.train(coarsen(fine, 4), fine, small_config(), seed=3, **KW)


@pytest.fixture(scope="module")
def new_region():
    fine = fine_field(nt=24, n=32, seed=2) + 5.0
    return coarsen(fine, 4), fine


def seeded(config, seed=0):
    torch.manual_seed(seed)
    return Reslim(config)


def test_transfer_moves_rows_by_variable_name():
    src = seeded(small_config(in_vars=["a", "b"], out_vars=["a"]), 1)
    dst = seeded(small_config(in_vars=["b", "c", "a"], out_vars=["c", "a"]), 2)
    fresh = {k: v.clone() for k, v in dst.state_dict().items()}
    status = finetune.transfer(src, dst)
    s, d = src.state_dict(), dst.state_dict()
    # token embeddings by name: b was 1 and is 0, a was 0 and is 2, c is new
    assert torch.equal(d["token_embeds.0.proj.weight"], s["token_embeds.1.proj.weight"])
    assert torch.equal(d["token_embeds.2.proj.weight"], s["token_embeds.0.proj.weight"])
    assert torch.equal(d["token_embeds.1.proj.weight"], fresh["token_embeds.1.proj.weight"])
    assert status["token_embeds.1.proj.weight"] == "new"
    assert status["token_embeds.0.proj.weight"] == "pretrained"
    # var_embed rows: b and a copied, c left as initialized
    assert torch.equal(d["var_embed"][0, 0], s["var_embed"][0, 1])
    assert torch.equal(d["var_embed"][0, 2], s["var_embed"][0, 0])
    assert torch.equal(d["var_embed"][0, 1], fresh["var_embed"][0, 1])
    assert status["var_embed"] == "partial"
    # head: per pixel (n_out fastest) the rows of output a; c's rows fresh
    hs = s["head.2.weight"].reshape(-1, 1, 16)
    hd = d["head.2.weight"].reshape(-1, 2, 16)
    assert torch.equal(hd[:, 1], hs[:, 0])
    assert torch.equal(hd[:, 0], fresh["head.2.weight"].reshape(-1, 2, 16)[:, 0])
    assert status["head.2.weight"] == "partial"
    # conv_out [a, a] and the upsampler's output row of a
    assert torch.equal(d["conv_out.weight"][1, 1], s["conv_out.weight"][0, 0])
    assert torch.equal(d["path2.3.weight"][1], s["path2.3.weight"][0])
    assert torch.equal(d["path2.0.weight"][:, 1], s["path2.0.weight"][:, 0])
    # variable-free parameters are copied whole
    assert torch.equal(d["blocks.0.attn.qkv.weight"], s["blocks.0.attn.qkv.weight"])
    assert status["blocks.0.attn.qkv.weight"] == "pretrained"


def test_transfer_resizes_the_position_table_to_a_new_window():
    src = seeded(small_config(), 1)
    dst = seeded(small_config(img_size=(16, 8)), 2)
    status = finetune.transfer(src, dst)
    expected = src.position_embedding(dst.token_grid((16, 8)))
    assert dst.pos_embed.shape == (1, 32, 16)
    torch.testing.assert_close(dst.pos_embed.data, expected.data)
    assert status["pos_embed"] == "pretrained"


def test_the_position_table_is_resized_for_the_same_number_of_tokens_on_another_grid():
    src = seeded(small_config(), 1)  # 4 x 4 tokens
    dst = seeded(small_config(img_size=(16, 4)), 2)  # 8 x 2 tokens: as many
    finetune.transfer(src, dst)
    torch.testing.assert_close(dst.pos_embed.data, src.position_embedding((8, 2)).data)
    assert not torch.equal(dst.pos_embed.data, src.pos_embed.data)


def test_without_a_config_the_coarse_only_inputs_it_knows_are_kept(new_region):
    coarse, fine = new_region
    pressure = (coarse * 0 + 1000.0).rename("psl").assign_attrs(units="hPa")
    both = xr.merge([coarse, pressure])
    cfg = small_config(in_vars=["tas", "psl"])
    pre = xorbit.train(both, fine, cfg, **KW)
    tuned = xorbit.train(both, fine, init=pre, **KW)  # psl is in the coarse data only
    assert tuned.config.in_vars == ["tas", "psl"] and not tuned.provenance["new"]


def test_freeze_names_pretrained_parameters_only():
    src = seeded(small_config(in_vars=["a"], out_vars=["a"]), 1)
    dst = seeded(small_config(in_vars=["a", "b"], out_vars=["a"]), 2)
    status = finetune.transfer(src, dst)
    frozen = finetune.frozen_names(status, "encoder")
    assert "token_embeds.0.proj.weight" in frozen and "blocks.0.mlp.fc1.weight" in frozen
    assert "token_embeds.1.proj.weight" not in frozen  # the new input's embedding trains
    assert "var_embed" not in frozen  # copied in part
    assert not any(n.startswith("head.") for n in frozen)
    assert finetune.frozen_names(status, "blocks") == sorted(
        n for n in status if n.startswith("blocks.")
    )
    assert finetune.frozen_names(status, ["norm.*"]) == ["norm.bias", "norm.weight"]
    with pytest.raises(ValueError, match=r"'nope\.\*' matches no parameter"):
        finetune.frozen_names(status, ["nope.*"])
    with pytest.raises(ValueError, match="freeze='decoder'"):
        finetune.frozen_names(status, "decoder")


def test_fine_tuning_keeps_frozen_weights_and_refits_the_rest(pretrained_dsr, new_region):
    coarse, fine = new_region
    # gate=False: the path is fitted on every new year and kept
    tuned = xorbit.train(
        coarse, fine, init=pretrained_dsr, freeze="encoder", seed=0, gate=False, **KW
    )
    src, got = pretrained_dsr.model.state_dict(), tuned.model.state_dict()
    for name in ("blocks.0.attn.qkv.weight", "token_embeds.0.proj.weight", "norm.weight"):
        assert torch.equal(got[name], src[name]), name
    assert not torch.equal(got["head.0.weight"], src["head.0.weight"])  # the head trained
    # the architecture and the spacing the embedding is relative to are the pretrained ones
    assert tuned.config.embed_dim == 16 and tuned.config.res_km == pretrained_dsr.config.res_km
    # normalization, climatology and the linear path come from the new data
    assert tuned.std["tas"] != pretrained_dsr.std["tas"]
    np.testing.assert_allclose(
        tuned.output_climatology["tas"].values, fine.mean("time").values, rtol=1e-6
    )
    assert float(got["linear.coef"].abs().sum()) > 0
    assert not torch.equal(got["linear.coef"], src["linear.coef"])
    prov = tuned.provenance
    assert prov["init"] == "Downscaler"
    assert prov["init_weights_sha256"] == pretrained_dsr.weights_sha256
    assert prov["freeze"] == "encoder" and "blocks.0.attn.qkv.weight" in prov["frozen"]
    assert "normalization" in prov and not prov["partial"] and not prov["new"]
    # from scratch, with the same seed, the model is another one
    scratch = xorbit.train(coarse, fine, small_config(), seed=0, **KW)
    assert not scratch.provenance
    assert max_diff(weights(scratch), weights(tuned)) > 1e-3


def test_fine_tuned_model_saves_loads_downscales_lazily_and_resumes(
    pretrained_dsr, new_region, tmp_path, capsys
):
    coarse, fine = new_region
    path = tmp_path / "pre.xorbit"
    pretrained_dsr.save(path)
    kw = dict(KW, epochs=3, seed=4, init=path, freeze="blocks", pretrained_lr_scale=0.1)
    full = xorbit.train(coarse, fine, checkpoint_dir=tmp_path / "full", **kw)
    assert full.provenance["init"] == str(path)
    # the pretrained group trains at a tenth of the rate, and keeps it when resumed
    groups = loop.load_state(tmp_path / "full")["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [1.0, 0.1]
    assert groups[1]["lr"] == pytest.approx(0.1 * groups[0]["lr"])
    # killed after one epoch, resumed: the same weights as the run in one go
    ckpt = tmp_path / "run"
    xorbit.train(coarse, fine, checkpoint_dir=ckpt, stop_after=1, **kw)
    resumed = xorbit.train(coarse, fine, checkpoint_dir=ckpt, resume=True, **kw)
    assert max_diff(weights(full), weights(resumed)) == 0.0
    # a new scale for the pretrained group applies when resuming
    ckpt3 = tmp_path / "run3"
    xorbit.train(coarse, fine, checkpoint_dir=ckpt3, stop_after=1, **kw)
    xorbit.train(
        coarse, fine, checkpoint_dir=ckpt3, resume=True, **{**kw, "pretrained_lr_scale": 0.5}
    )
    groups = loop.load_state(ckpt3)["optimizer"]["param_groups"]
    assert groups[1]["lr_scale"] == 0.5
    assert groups[1]["lr"] == pytest.approx(0.5 * groups[0]["lr"])
    with pytest.raises(ValueError, match="pass the same init= to resume"):
        xorbit.train(coarse, fine, small_config(), checkpoint_dir=ckpt, resume=True, **KW)
    # saved and loaded: provenance kept, downscaling lazy and equal to the eager result
    out = tmp_path / "tuned.xorbit"
    resumed.save(out)
    back = xorbit.load(out)
    assert back.provenance == resumed.provenance
    lazy = coarse.chunk({"time": 6}).orbit.downscale(back)
    assert lazy.chunks is not None
    np.testing.assert_allclose(
        lazy.values, coarse.orbit.downscale(resumed).values, rtol=1e-5, atol=1e-5
    )
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"fine-tuned from {path}" in text
    assert pretrained_dsr.weights_sha256 in text and "frozen 'blocks'" in text


def test_pretrained_parameters_get_their_own_learning_rate(pretrained_dsr, new_region):
    coarse, fine = new_region
    tuned = xorbit.train(coarse, fine, init=pretrained_dsr, seed=0, **KW)
    opts = TrainOptions(lr=1e-3, pretrained_lr_scale=0.2)
    groups = loop.param_groups(tuned, tuned.model, opts)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(2e-4)]
    pretrained = {id(p) for p in groups[1]["params"]}
    named = dict(tuned.model.named_parameters())
    assert id(named["blocks.0.attn.qkv.weight"]) in pretrained
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(named)
    with pytest.raises(ValueError, match="pretrained_lr_scale must be a positive"):
        loop.param_groups(tuned, tuned.model, opts.replace(pretrained_lr_scale=0.0))
    # a model from scratch has one group
    assert len(loop.param_groups(pretrained_dsr, pretrained_dsr.model, opts)) == 1


def test_one_more_input_gets_a_fresh_embedding(pretrained_dsr, new_region):
    coarse, fine = new_region
    cfg = small_config(in_vars=["tas", "coord_latitude"])
    tuned = xorbit.train(coarse, fine, cfg, init=pretrained_dsr, seed=0, **KW)
    prov = tuned.provenance
    assert tuned.config.in_vars == ["tas", "coord_latitude"]
    assert "token_embeds.1.proj.weight" in prov["new"]
    assert "var_embed" in prov["partial"]
    assert prov["init_in_vars"] == ["tas"]
    out = coarse.orbit.downscale(tuned)
    assert out.shape == fine.shape and np.isfinite(out.values).all()
    # without a config, the pretrained inputs the data have (or make) are kept
    again = xorbit.train(coarse, fine, init=tuned, seed=0, **KW)
    assert again.config.in_vars == ["tas", "coord_latitude"]
    assert not again.provenance["new"] and not again.provenance["partial"]


def test_init_errors_and_warnings(pretrained_dsr, new_region):
    coarse, fine = new_region
    with pytest.raises(ValueError, match="freeze= fixes pretrained weights: it needs init="):
        xorbit.train(coarse, fine, small_config(), freeze="blocks", **KW)
    with pytest.raises(TypeError, match="init must be a Downscaler"):
        xorbit.train(coarse, fine, init=42, **KW)
    with pytest.warns(UserWarning, match=r"config's \['embed_dim'\] differ"):
        tuned = xorbit.train(
            coarse, fine, small_config(embed_dim=32), init=pretrained_dsr, seed=0, **KW
        )
    assert tuned.config.embed_dim == 16


def test_transforms_default_to_the_pretrained_models():
    src = finetune.Pretrained(seeded(small_config(in_vars=["pr"], out_vars=["pr"])), "x", "h")
    src.transforms = {"pr": "log1p"}
    assert finetune.default_transforms(src, small_config(in_vars=["pr"], out_vars=["pr"])) == {
        "pr": "log1p"
    }
    assert finetune.default_transforms(src, small_config()) == {}  # tas only: none kept


def test_the_linear_path_follows_the_pretrained_model(pretrained_dsr, new_region):
    coarse, fine = new_region
    assert pretrained_dsr.config.linear_window is not None
    with_path = xorbit.train(coarse, fine, init=pretrained_dsr, **KW)
    assert with_path.config.linear_window == (8, 8)
    whole = xorbit.train(coarse, fine, small_config(), linear_path=False, **KW)
    assert whole.config.linear_window is None
    tuned = xorbit.train(coarse, fine, init=whole, **KW)  # learnt the whole map: no path
    assert tuned.config.linear_window is None
    forced = xorbit.train(coarse, fine, init=whole, linear_path=True, **KW)
    assert forced.config.linear_window == (8, 8)


def test_an_imported_reference_model_fine_tunes(new_region):
    # the shape of `import_orbit2`'s result: reference layout, no skip, km embedding
    ref = seeded(
        small_config(unpatchify="reference", interp_skip="none", res_embed="km", res_km=111.0)
    )
    coarse, fine = new_region
    tuned = xorbit.train(coarse, fine, init=ref, **KW)
    assert tuned.provenance["init"] == "Reslim"
    assert tuned.config.unpatchify == "reference" and tuned.config.res_embed == "km"
    assert tuned.config.linear_window is None  # the reference learnt the whole map
    assert tuned.provenance["pretrained"] and not tuned.provenance["new"]
    out = coarse.orbit.downscale(tuned)
    assert np.isfinite(out.values).all()


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_fine_tuning_on_two_ranks_matches_one_process(pretrained_dsr, new_region, client, strategy):
    # frozen parameters and the second learning-rate group reach every rank
    # (frozen flags are set on each rank's own model: sent whole with DDP, on
    # meta with FSDP)
    coarse, fine = new_region
    kw = dict(init=pretrained_dsr, freeze="blocks", seed=0, gate=False, **KW)
    kw["pretrained_lr_scale"] = 0.3
    one = xorbit.train(coarse, fine, **kw)
    two = xorbit.train(coarse, fine, client=client, strategy=strategy, **kw)
    src, got = pretrained_dsr.model.state_dict(), two.model.state_dict()
    assert torch.equal(got["blocks.0.attn.qkv.weight"], src["blocks.0.attn.qkv.weight"])
    assert not torch.equal(got["head.0.weight"], src["head.0.weight"])
    scale = max(float(v.abs().max()) for v in weights(one).values())
    assert max_diff(weights(one), weights(two)) < 1e-5 * scale
    assert two.provenance["frozen"] == one.provenance["frozen"]
