import pytest

from xorbit import Reslim, ReslimConfig
from xorbit.model.config import REFERENCE_IN_VARS, REFERENCE_OUT_VARS, REFERENCE_STATIC_VARS


def test_reference_variables_are_23_in_3_out():
    assert len(REFERENCE_IN_VARS) == 23
    assert len(set(REFERENCE_IN_VARS)) == 23
    assert set(REFERENCE_OUT_VARS) <= set(REFERENCE_IN_VARS)
    assert list(REFERENCE_IN_VARS[:4]) == list(REFERENCE_STATIC_VARS)


@pytest.mark.parametrize(("preset", "target"), [("9.5m", 9.5e6), ("126m", 126e6)])
def test_preset_parameter_counts_match_paper(preset, target):
    # 23 inputs, 3 outputs, 180 x 360 input grid: the position table is counted.
    cfg = ReslimConfig.preset(preset, img_size=(180, 360))
    assert len(cfg.in_vars) == 23 and len(cfg.out_vars) == 3
    n = Reslim(cfg).num_params()
    assert abs(n - target) / target < 0.02, n
    # the position table alone: (90 * 180) tokens x embed_dim, frozen
    assert Reslim(cfg).pos_embed.numel() == 90 * 180 * cfg.embed_dim


def test_exact_parameter_count_of_9_5m():
    # hand count: see docs/model.md
    assert Reslim(ReslimConfig.preset("9.5m", img_size=(180, 360))).num_params() == 9_501_571


def test_preset_fields_follow_the_paper_table():
    c = ReslimConfig.preset("126m", factor=2, in_vars=["a", "b"], out_vars=["a"])
    assert (c.embed_dim, c.depth, c.decoder_depth, c.num_heads) == (1024, 8, 4, 16)
    assert (c.patch_size, c.cnn_ratio, c.mlp_ratio, c.drop_path, c.drop_rate) == (
        2,
        4,
        4.0,
        0.1,
        0.1,
    )
    assert c.factor == 2
    assert ReslimConfig.preset("10b").embed_dim == 8192


def test_unknown_preset_lists_known_ones():
    with pytest.raises(KeyError, match=r"known presets: \['10b', '126m', '1b', '9.5m', 'tiny'\]"):
        ReslimConfig.preset("2b")


def test_dict_and_yaml_round_trip():
    c = ReslimConfig.preset(
        "tiny", in_vars=["t", "z"], out_vars=["t"], static_vars=["z"], drop_rate=0.0
    )
    assert ReslimConfig.from_dict(c.to_dict()) == c
    assert ReslimConfig.from_yaml(c.to_yaml()) == c
    assert isinstance(ReslimConfig.from_yaml(c.to_yaml()).img_size, tuple)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(in_vars=["a"], out_vars=["b"]), r"\['b'\] feed the residual path"),
        (dict(in_vars=["a"], out_vars=["a"], static_vars=["z"]), r"\['z'\] feed the residual"),
        (dict(in_vars=["a", "a"], out_vars=["a"]), r"in_vars lists \['a'\] more than once"),
        (dict(in_vars=["a"], out_vars=["a"], embed_dim=30, num_heads=4), "not divisible"),
        (dict(in_vars=["a"], out_vars=["a"], unpatchify="flat"), "unpatchify must be"),
        (dict(in_vars=[], out_vars=["a"]), "in_vars is empty"),
        (dict(in_vars=["a"], out_vars=["a"], noise_members="paired"), "noise_members must be"),
        (dict(in_vars=["a"], out_vars=["a"], noise_channels=-1), "noise_channels must be"),
    ],
)
def test_invalid_configs_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReslimConfig(**kwargs)


def test_old_stochastic_configs_keep_drawing_independent_members():
    new = ReslimConfig(in_vars=["a"], out_vars=["a"], noise_channels=2)
    assert new.noise_members == "antithetic"
    d = new.to_dict()
    assert ReslimConfig.from_dict(d).noise_members == "antithetic"
    del d["noise_members"]  # saved before the field existed
    assert ReslimConfig.from_dict(d).noise_members == "independent"


def test_from_dict_rejects_unknown_keys():
    d = ReslimConfig(in_vars=["a"], out_vars=["a"]).to_dict()
    d["superres_mag"] = 4
    with pytest.raises(ValueError, match=r"unknown keys \['superres_mag'\]"):
        ReslimConfig.from_dict(d)


def test_config_holds_the_architecture_only():
    """Training options moved to TrainOptions: an old config dict still loads."""
    from xorbit.training import TrainOptions

    with pytest.raises(TypeError, match=r"\['lr'\] are training options"):
        ReslimConfig.preset("tiny", in_vars=["a"], out_vars=["a"], lr=1e-3)
    old = ReslimConfig.preset("9.5m", in_vars=["a"], out_vars=["a"]).to_dict()
    old.update(lr=2e-3, batch_size=32, weight_decay=1e-5, warmup_epochs=2, tv_lambda=0.02)
    old["var_weights"] = {}
    cfg = ReslimConfig.from_dict(old)
    assert "lr" not in cfg.to_dict() and cfg.embed_dim == 256
    assert cfg.preset_name() == "9.5m"
    opts = TrainOptions.for_config(cfg)
    assert (opts.lr, opts.batch_size) == (2e-3, 32)
    big = TrainOptions.for_config(ReslimConfig.preset("126m", in_vars=["a"], out_vars=["a"]))
    assert (big.lr, big.batch_size) == (5e-4, 8)
    assert TrainOptions.for_config(cfg, lr=1e-4).lr == 1e-4
    with pytest.raises(TypeError, match=r"unknown training options \['lrate'\]"):
        opts.replace(lrate=1)
