"""CUDA paths: run on a machine with a GPU (`make test-all` there); skipped elsewhere."""

import numpy as np
import pytest
import torch

from tests.datasets import powerlaw_field
from tests.test_accessor import coarse_field, make_downscaler

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_downscale_on_cuda_matches_cpu_within_bf16():
    dsr = make_downscaler()
    field = coarse_field(280 + 10 * powerlaw_field((2, 16, 24), seed=2)).chunk(lat=8)
    cpu = field.orbit.downscale(dsr, tile=4, halo=2, device="cpu").values
    gpu = field.orbit.downscale(dsr, tile=4, halo=2, device="cuda").values
    # bf16 autocast keeps 8 mantissa bits: relative error of normalized values ~ 2^-8
    assert np.abs(gpu - cpu).max() < 10.0 * 2**-6


def test_training_on_cuda_learns():
    from tests.test_train import fine_field, small_config
    from xorbit import coarsen
    from xorbit.training import train

    fine = fine_field()
    dsr = train(
        coarsen(fine, 4),
        fine,
        small_config(),
        epochs=3,
        batch_size=4,
        device="cuda",
        progress=False,
    )
    assert dsr.history[-1]["loss"] < dsr.history[0]["loss"]
    assert next(dsr.model.parameters()).device.type == "cuda"
