import numpy as np
import pytest
import torch

from xorbit.model.loss import bayesian_tv_loss, latitude_weights, total_variation

PRED = torch.tensor([[1.0, 2.0, 4.0], [0.0, 3.0, 3.0], [2.0, 2.0, 1.0]])
TARGET = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])


def test_total_variation_by_hand():
    # forward differences: down, right, down-right (x0.7), down-left (x0.7)
    tv = total_variation(PRED)
    expected = torch.tensor(
        [
            # (0,0): |0-1| + |2-1| + .7|3-1| + 0           = 1 + 1 + 1.4
            # (0,1): |3-2| + |4-2| + .7|3-2| + .7|0-2|     = 1 + 2 + .7 + 1.4
            # (0,2): |3-4| + 0     + 0       + .7|3-4|     = 1 + .7
            [3.4, 5.1, 1.7],
            # (1,0): |2-0| + |3-0| + .7|2-0|               = 2 + 3 + 1.4
            # (1,1): |2-3| + |3-3| + .7|1-3| + .7|2-3|     = 1 + 0 + 1.4 + .7
            # (1,2): |1-3| + 0     + 0       + .7|2-3|     = 2 + .7
            [6.4, 3.1, 2.7],
            # last row: only horizontal differences
            [0.0, 1.0, 0.0],
        ]
    )
    torch.testing.assert_close(tv, expected)


def test_loss_by_hand_on_3x3():
    pred, target = PRED[None, None], TARGET[None, None]
    se = (PRED - TARGET).square().sum()  # 0+1+9 + 1+4+4 + 1+1+0 = 21
    assert se == 21
    tv = 3.4 + 5.1 + 1.7 + 6.4 + 3.1 + 2.7 + 1.0  # 23.4
    loss = bayesian_tv_loss(pred, target, lam=0.02)
    assert loss.item() == pytest.approx((21 + 0.02 * tv) / 9, rel=1e-6)
    assert bayesian_tv_loss(pred, target, lam=0).item() == pytest.approx(21 / 9)


def test_nan_targets_and_mask_drop_out_of_the_mean():
    pred, target = PRED[None, None].clone(), TARGET[None, None].clone()
    target[0, 0, 0, 2] = float("nan")  # its squared error would be 9
    loss = bayesian_tv_loss(pred, target, lam=0.0)
    assert loss.item() == pytest.approx((21 - 9) / 8)
    mask = torch.ones_like(pred, dtype=torch.bool)
    mask[0, 0, 1, 1] = False  # squared error 4
    assert bayesian_tv_loss(pred, target, lam=0.0, mask=mask).item() == pytest.approx(8 / 7)
    with pytest.raises(ValueError, match="no valid pixel"):
        bayesian_tv_loss(pred, target, mask=torch.zeros_like(mask))


def test_latitude_and_variable_weights():
    lat = [-60.0, 0.0, 60.0]
    w = latitude_weights(lat)
    np.testing.assert_allclose(w.numpy(), np.array([0.5, 1, 0.5]) / (2 / 3), rtol=1e-6)
    assert w.mean().item() == pytest.approx(1.0)
    pred, target = PRED[None, None], TARGET[None, None]
    rows = (PRED - TARGET).square().sum(1)  # [10, 9, 2]
    loss = bayesian_tv_loss(pred, target, lam=0.0, lat_weights=w)
    assert loss.item() == pytest.approx(float((rows * w).sum() / 9), rel=1e-6)
    two = torch.cat([pred, 2 * pred], 1), torch.cat([target, target], 1)
    lv = bayesian_tv_loss(*two, lam=0.0, var_weights=[10.0, 1.0])
    se2 = (2 * PRED - TARGET).square().sum()
    assert lv.item() == pytest.approx(float((10 * 21 + se2) / 18), rel=1e-6)


def test_shape_errors_are_explicit():
    with pytest.raises(ValueError, match=r"prediction shape \(1, 1, 3, 3\) differs"):
        bayesian_tv_loss(PRED[None, None], TARGET[None, None, :2])
    with pytest.raises(
        ValueError, match=r"lat_weights has shape \(2,\), expected \(3,\) or \(1, 3\)"
    ):
        bayesian_tv_loss(PRED[None, None], TARGET[None, None], lat_weights=torch.ones(2))
    with pytest.raises(ValueError, match=r"var_weights has shape \(2,\)"):
        bayesian_tv_loss(PRED[None, None], TARGET[None, None], var_weights=[1.0, 2.0])


def test_loss_gradient_flows_to_prediction():
    pred = PRED[None, None].clone().requires_grad_(True)
    bayesian_tv_loss(pred, TARGET[None, None]).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
