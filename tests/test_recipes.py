"""The recipes of docs/cluster.md run as written."""

import re
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import xorbit

CLUSTER_MD = Path(__file__).resolve().parents[1] / "docs" / "cluster.md"


def python_block(markdown: str, heading: str) -> str:
    """The first ```python block under the section ``heading`` (a ``##`` title)."""
    section = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    assert section, f"no section {heading!r} in {CLUSTER_MD.name}"
    block = re.search(r"^```python\n(.*?)^```", section.group(1), re.M | re.S)
    assert block, f"no python block under {heading!r}"
    return block.group(1)


def test_python_block_is_found_under_its_heading():
    text = "# t\n## A\nx\n```python\na = 1\n```\n## B\n```python\nb = 2\n```\n"
    assert python_block(text, "A") == "a = 1\n"
    assert python_block(text, "B") == "b = 2\n"
    with pytest.raises(AssertionError, match="no section"):
        python_block(text, "C")


@pytest.mark.distributed
def test_the_local_cluster_recipe_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("distributed")
    code = python_block(CLUSTER_MD.read_text(), "A LocalCluster on a workstation")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    exec(compile(code, str(CLUSTER_MD), "exec"), namespace)

    out_path = Path(namespace["out_path"])
    assert (tmp_path / out_path).is_dir()
    # complete: renamed from <store>.partial, no markers left beside it
    assert not (tmp_path / "cluster-recipe" / "tas_fine.zarr.partial").exists()
    assert not (tmp_path / "cluster-recipe" / "tas_fine.zarr.partial-done").exists()
    result = xr.open_zarr(tmp_path / out_path, consolidated=False)["tas"]
    assert dict(result.sizes) == {"time": 8, "lat": 64, "lon": 128}
    values = result.values
    assert np.isfinite(values).all()
    assert 230 < values.min() and values.max() < 320  # K: 300 - 40 sin(lat) ± anomalies

    dsr = namespace["dsr"]
    assert isinstance(dsr, xorbit.Downscaler)
    assert [h["epoch"] for h in dsr.history] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in dsr.history)
    # the stored climatology puts back the detail bicubic cannot
    assert namespace["rmse"] < 0.5 * namespace["rmse_bicubic"]
    printed = capsys.readouterr().out
    assert "{'time': 8, 'lat': 64, 'lon': 128} [1, 2]" in printed
    assert re.search(r"RMSE \d+\.\d{3} K, bicubic \d+\.\d{3} K", printed)


def test_the_1b_memory_plan_recipe_prints_what_the_page_says(capsys):
    md = CLUSTER_MD.read_text()
    exec(python_block(md, "A `1b` model on GPU nodes (SLURM, FSDP)"), {})
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6 and all(line.endswith("True") for line in out)
    # the figures the page quotes are the ones the plan gives
    assert out[0] in md.replace("`", "") and out[4] in md.replace("`", "")
