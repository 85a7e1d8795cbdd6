"""DeepLabPolyLR: kMaX-DeepLab's TF2WarmupPolyLR curve, step by step."""

from __future__ import annotations

import math

import pytest
import torch

from effvision.engine import DeepLabPolyLR
from effvision.registry import PARAM_SCHEDULERS


def _official(step: int, max_iters: int, warmup: int, factor: float, power: float) -> float:
    """bytedance/kmax-deeplab train_net_utils.TF2WarmupPolyLR.get_lr, written out."""
    if step < warmup:
        alpha = step / warmup
        return factor * (1 - alpha) + alpha
    return math.pow(1.0 - step / max_iters, power)


def test_follows_the_official_curve_for_every_group():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(
        [{'params': [model.weight], 'lr': 5e-4}, {'params': [model.bias], 'lr': 5e-5}]
    )
    scheduler = PARAM_SCHEDULERS.build(
        dict(type='DeepLabPolyLR', optimizer=optimizer, max_iters=40, warmup_iters=10)
    )
    assert isinstance(scheduler, DeepLabPolyLR)
    for step in range(40):
        expected = _official(step, 40, 10, 1e-3, 0.9)
        assert optimizer.param_groups[0]['lr'] == pytest.approx(5e-4 * expected, rel=1e-12)
        assert optimizer.param_groups[1]['lr'] == pytest.approx(5e-5 * expected, rel=1e-12)
        optimizer.step()
        scheduler.step()
    # the poly part is counted from iteration 0: just after warmup it is already below 1
    assert _official(10, 40, 10, 1e-3, 0.9) < 0.8


def test_rejects_epochs_and_bad_lengths():
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match='by_epoch=False'):
        DeepLabPolyLR(optimizer, max_iters=10, by_epoch=True)
    with pytest.raises(ValueError, match='warmup_iters'):
        DeepLabPolyLR(optimizer, max_iters=10, warmup_iters=20)
