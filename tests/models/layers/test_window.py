"""Window layouts: the gather formulation equals roll + partition + reverse + crop."""

from __future__ import annotations

import pytest
import torch

from effvision.models.layers.window import (
    pad_to_multiple,
    pair,
    round_up,
    to_nchw,
    window_layout,
)


def reference_partition(x: torch.Tensor, window, shift) -> torch.Tensor:
    """The textbook Swin partition: roll by -shift, 6-D view/permute."""
    (wh, ww), (sh, sw) = pair(window), pair(shift)
    x = torch.roll(x, (-sh, -sw), (1, 2))
    b, h, w, c = x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, -1, wh * ww, c)


@pytest.mark.parametrize('size', [(7, 7), (14, 21), (9, 13), (1, 1), (3, 17)])
@pytest.mark.parametrize('shift', [0, 3])
def test_partition_and_reverse_match_roll_and_permute(size, shift):
    h, w = size
    x = torch.randn(2, h, w, 5)
    padded = pad_to_multiple(x, 7, dims=(1, 2))
    layout = window_layout(h, w, 7, shift)
    windows = partition(padded, layout)
    torch.testing.assert_close(windows, reference_partition(padded, 7, shift), rtol=0, atol=0)
    torch.testing.assert_close(reverse(windows, layout, h, w), x, rtol=0, atol=0)


@pytest.mark.parametrize('size', [(7, 12), (9, 13), (1, 5)])
@pytest.mark.parametrize(('window', 'shift'), [((2, 13), 0), ((9, 1), 0), ((4, 3), (2, 1))])
def test_rectangular_windows_match_roll_and_permute(size, window, shift):
    """Stripes (CSWin) and rectangular windows use the same layout with (rows, cols)."""
    h, w = size
    x = torch.randn(2, h, w, 3)
    padded = pad_to_multiple(x, window, dims=(1, 2))
    assert padded.shape[1] % window[0] == 0 and padded.shape[2] % window[1] == 0
    layout = window_layout(h, w, window, shift)
    windows = partition(padded, layout)
    torch.testing.assert_close(windows, reference_partition(padded, window, shift), rtol=0, atol=0)
    torch.testing.assert_close(reverse(windows, layout, h, w), x, rtol=0, atol=0)


def partition(x: torch.Tensor, layout) -> torch.Tensor:
    """(B, Hp, Wp, C) padded map -> (B, nW, N, C) windows."""
    return x.flatten(1, 2).index_select(1, layout.gather).unflatten(1, (-1, layout.num_tokens))


def reverse(windows: torch.Tensor, layout, h: int, w: int) -> torch.Tensor:
    """(B, nW, N, C) windows -> (B, h, w, C), un-shifted and cropped."""
    tokens = windows.flatten(1, 2).index_select(1, layout.scatter)
    return tokens.view(windows.shape[0], h, w, windows.shape[-1])


def test_round_up_and_pad():
    assert [round_up(n, 7) for n in (1, 7, 8, 14)] == [7, 7, 14, 14]
    x = torch.ones(1, 5, 9, 2)
    y = pad_to_multiple(x, 4, dims=(1, 2))
    assert y.shape == (1, 8, 12, 2) and y.sum() == x.sum()


def test_to_nchw():
    x = torch.randn(2, 3, 5, 4)
    assert torch.equal(to_nchw(x), x.permute(0, 3, 1, 2))
    assert to_nchw(x).is_contiguous()
