"""Shape-generic token-map helpers."""

from __future__ import annotations

import torch

from effvision.models.layers.window import pad_to_multiple, round_up, to_nchw


def test_round_up_and_pad():
    assert [round_up(n, 7) for n in (1, 7, 8, 14)] == [7, 7, 14, 14]
    x = torch.ones(1, 5, 9, 2)
    y = pad_to_multiple(x, 4, dims=(1, 2))
    assert y.shape == (1, 8, 12, 2) and y.sum() == x.sum()


def test_to_nchw():
    x = torch.randn(2, 3, 5, 4)
    assert torch.equal(to_nchw(x), x.permute(0, 3, 1, 2))
    assert to_nchw(x).is_contiguous()
