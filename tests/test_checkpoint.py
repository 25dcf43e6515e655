import json
import struct

import pytest
import torch
import yaml
from safetensors.torch import save_file

import xorbit
from tests.datasets import tiny_config
from xorbit import CheckpointError, Downscaler, Reslim
from xorbit.downscaler import training_grid
from xorbit.model.checkpoint import (
    import_orbit2,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)


@pytest.fixture
def model():
    torch.manual_seed(3)
    return Reslim(tiny_config()).eval()


def test_round_trip_is_bit_for_bit(model, tmp_path):
    path = save_checkpoint(tmp_path / "m.xorbit", model, extra={"note": "hi"})
    loaded, meta = load_checkpoint(path)
    assert meta["extra"] == {"note": "hi"}
    assert meta["config"] == model.config.to_dict()
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    x = torch.randn(1, 2, 9, 11)
    with torch.no_grad():
        assert torch.equal(model(x, ["tas", "orog"]), loaded(x, ["tas", "orog"]))
    # no temporary files left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.xorbit"]


def test_downscaler_round_trip_keeps_metadata(tmp_path):
    dsr = Downscaler.from_config(
        tiny_config(),
        mean={"tas": 280.5, "orog": 300.0},
        std={"tas": 12.25, "orog": 250.0},
        units={"tas": "K", "orog": "m"},
        attrs={"tas": {"standard_name": "air_temperature"}},
        grid=training_grid([60.0, 55.0, 50.0], [0.0, 7.5, 15.0, 22.5]),
    )
    dsr.save(tmp_path / "d.xorbit")
    back = xorbit.load(tmp_path / "d.xorbit")
    assert back.metadata() == dsr.metadata()
    assert back.weights_sha256 == dsr.weights_sha256
    assert back.factor == 4 and back.out_vars == ["tas"]
    assert back.grid == {
        "multi_resolution": False,
        "y_ascending": False,
        "dy": 5.0,
        "x_ascending": True,
        "dx": 7.5,
    }


def test_a_checkpoint_of_xorbit_0_1_still_loads(tmp_path):
    """0.1 configs carried training options and no grid facts."""
    dsr = Downscaler.from_config(tiny_config(), mean={"tas": 280.0})
    meta = dsr.metadata()
    del meta["grid"]
    config = dsr.config.to_dict() | {"lr": 2e-3, "batch_size": 16, "tv_lambda": 0.02}
    config["var_weights"] = {}
    path = tmp_path / "old.xorbit"
    state = {k: v.contiguous() for k, v in dsr.model.state_dict().items()}
    header = {
        "format": "xorbit-checkpoint",
        "format_version": 1,
        "xorbit_version": "0.1.0",
        "config": config,
        "weights_sha256": dsr.weights_sha256,
        "extra": meta,
    }
    save_file(state, path, metadata={"xorbit": json.dumps(header)})
    back = xorbit.load(path)
    assert back.grid == {} and back.config == dsr.config and back.mean["tas"] == 280.0


def test_flipped_weight_byte_is_detected(model, tmp_path):
    path = save_checkpoint(tmp_path / "m.xorbit", model)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # inside the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)


def test_truncated_and_foreign_files_give_clear_errors(model, tmp_path):
    path = save_checkpoint(tmp_path / "m.xorbit", model)
    (tmp_path / "cut.xorbit").write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a readable xorbit checkpoint"):
        load_checkpoint(tmp_path / "cut.xorbit")
    (tmp_path / "junk.xorbit").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable xorbit checkpoint"):
        load_checkpoint(tmp_path / "junk.xorbit")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "absent.xorbit")
    # a plain safetensors file without our metadata
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="carries no xorbit metadata"):
        load_checkpoint(tmp_path / "plain.safetensors")


def rewrite_metadata(path, change):
    """Edit the JSON in a safetensors header in place (same file otherwise)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["xorbit"])
    change(meta)
    header["__metadata__"]["xorbit"] = json.dumps(meta)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def test_config_that_does_not_fit_the_weights_is_named(model, tmp_path):
    path = save_checkpoint(tmp_path / "m.xorbit", model)
    rewrite_metadata(path, lambda m: m["config"].update(embed_dim=64))
    assert read_metadata(path)["config"]["embed_dim"] == 64
    with pytest.raises(CheckpointError, match=r"shape mismatch \['blocks.0"):
        load_checkpoint(path)
    rewrite_metadata(path, lambda m: m["config"].update(embed_dim=32, depth=3))
    with pytest.raises(CheckpointError, match=r"missing \['blocks.2"):
        load_checkpoint(path)
    rewrite_metadata(path, lambda m: m["config"].update(depth=2, out_vars=["nope"]))
    with pytest.raises(CheckpointError, match="invalid model config"):
        load_checkpoint(path)
    rewrite_metadata(path, lambda m: m.update(format_version=99))
    with pytest.raises(CheckpointError, match="upgrade xorbit"):
        load_checkpoint(path)


def test_save_refuses_non_json_metadata(model, tmp_path):
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path / "m.xorbit", model, extra={"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_file(model, tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "m.xorbit", model)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("xorbit.model.checkpoint.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.xorbit"]


def test_import_published_orbit2_checkpoint(tmp_path):
    # a stand-in for a published checkpoint: reference layout, 1:2 training grid
    # (the reference feeds the resolution embedding kilometres)
    cfg = tiny_config(unpatchify="reference", img_size=(8, 16), res_embed="km")
    torch.manual_seed(0)
    ref = Reslim(cfg).eval()
    torch.save(
        {"model_state_dict": ref.state_dict(), "epoch": 3, "optimizer_state_dict": {}},
        tmp_path / "ckpt.pth",
    )
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model": dict(
                    superres_mag=4,
                    cnn_ratio=4,
                    patch_size=2,
                    embed_dim=32,
                    depth=2,
                    decoder_depth=1,
                    num_heads=4,
                    mlp_ratio=4,
                    drop_path=0.0,
                    drop_rate=0.0,
                ),
                "tiling": dict(do_tiling=True, div=2, overlap=2),
            }
        )
    )
    model = import_orbit2(
        tmp_path / "ckpt.pth",
        tmp_path / "config.yaml",
        in_vars=["tas", "orog"],
        out_vars=["tas"],
        static_vars=["orog"],
    )
    assert model.config.img_size == (8, 16) and model.config.unpatchify == "reference"
    x = torch.randn(1, 2, 8, 16)
    with torch.no_grad():
        assert torch.equal(model(x, ["tas", "orog"]), ref(x, ["tas", "orog"]))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        import_orbit2(
            tmp_path / "ckpt.pth",
            tmp_path / "config.yaml",
            in_vars=["tas", "orog", "pr"],
            out_vars=["tas"],
            static_vars=["orog"],
        )


def test_written_files_are_readable_by_others(model, tmp_path):
    """mkstemp made every checkpoint and netCDF file private (0600)."""
    import os

    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "m.xorbit", model)
        assert path.stat().st_mode & 0o777 == 0o644
        path.chmod(0o640)  # an existing file keeps its mode when rewritten
        save_checkpoint(path, model)
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
