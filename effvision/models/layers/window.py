"""Window partitioning of token maps, written to stay shape-generic under export.

(Window *attention* is one op, :mod:`effvision.ops.window_attention`; this module serves the
backbones that partition maps themselves, e.g. BiFormer's regions.) Partitioning a (padded) token
map into windows, optionally after a cyclic shift, is a permutation of its tokens, and
reassembling plus un-shifting plus cropping the padding is a gather. We build both index vectors
from ``arange`` arithmetic once per stage and apply them with ``index_select``. Compared with the
usual ``roll`` + 6-D ``view``/``permute`` + slice, this

* moves the data once per direction instead of up to three times (roll, permute copy, crop);
* keeps H and W symbolic under ``torch.export``: a reshape of a permuted tensor makes the exporter
  specialise on the number of windows being 1, and a crop makes it guard on ``H <= padded H``;
  index arithmetic on tensors creates neither guard.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def round_up(size: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``size``.

    Written as ``ceil(size / multiple) * multiple`` so that, for a symbolic ``size``, the result is
    visibly a multiple and later reshapes need no divisibility guard.
    """
    return (size + multiple - 1) // multiple * multiple


def pair(value: int | tuple[int, int]) -> tuple[int, int]:
    """``v`` -> ``(v, v)``; a pair is returned as a tuple."""
    if isinstance(value, int):
        return value, value
    first, second = value
    return first, second


def pad_to_multiple(
    x: torch.Tensor, multiple: int | tuple[int, int], dims: tuple[int, int]
) -> torch.Tensor:
    """Zero-pad two dims of ``x`` at their end up to a multiple of ``multiple`` (one per dim).

    The pad amounts are computed from (possibly symbolic) sizes and applied unconditionally (a pad
    of zero is a no-op), so no Python branch depends on the input size.
    """
    pads = [0] * (2 * x.dim())
    for dim, m in zip(dims, pair(multiple), strict=True):
        dim = dim % x.dim()
        # F.pad lists pads from the last dim backwards: (last_begin, last_end, prev_begin, ...)
        pads[2 * (x.dim() - 1 - dim) + 1] = round_up(x.shape[dim], m) - x.shape[dim]
    return F.pad(x, pads)


def floor_mod(a: torch.Tensor, n: int) -> torch.Tensor:
    """``a % n`` (non-negative for n > 0), written with floor division.

    ``tensor % symbolic_int`` exports as ``aten.remainder.Scalar``, which the ONNX exporter
    (onnxscript 0.7) cannot translate; floor division and a product can.
    """
    return a - (a // n) * n


class WindowLayout(NamedTuple):
    """How tokens of an (H, W) map move into windows of its padded (Hp, Wp) canvas and back.

    Attributes:
        gather: (Hp * Wp,) index into the row-major padded tokens, one per window slot
            (``window k, position p`` at ``k * N + p``), after a cyclic shift by ``-shift``.
        scatter: (H * W,) index into the window slots, one per real token of the (unshifted,
            uncropped) map: the inverse of ``gather`` restricted to the H x W tokens.
        num_tokens: N = window rows * window cols.
    """

    gather: torch.Tensor
    scatter: torch.Tensor
    num_tokens: int


def window_layout(
    h: int,
    w: int,
    window: int | tuple[int, int],
    shift: int | tuple[int, int] = 0,
    device: torch.device | None = None,
) -> WindowLayout:
    """Index vectors that partition an (h, w) map into windows after padding and shifting.

    Args:
        h, w: Size of the token map (may be symbolic).
        window: Window side, or (rows, cols) for rectangular windows (e.g. CSWin's stripes).
        shift: Cyclic shift applied before partitioning (the map is rolled by ``-shift``), or
            (rows, cols).
        device: Where to build the indices.
    """
    wh, ww = pair(window)
    sh, sw = pair(shift)
    hp, wp = round_up(h, wh), round_up(w, ww)
    n = wh * ww
    nw = wp // ww
    # Indices come from one flat arange each: broadcasting two symbolic-length aranges against
    # each other would make the exporter guard on either length being 1.
    slot = torch.arange((hp // wh) * nw * n, device=device)
    win, pos = slot // n, floor_mod(slot, n)
    # slot (win, pos) of the rolled canvas holds the padded token ((row + shift) % Hp, ...)
    row = floor_mod((win // nw) * wh + pos // ww + sh, hp)
    col = floor_mod(floor_mod(win, nw) * ww + floor_mod(pos, ww) + sw, wp)
    gather = row * wp + col
    # real token (r, c) sits at rolled position ((r - shift) % Hp, (c - shift) % Wp)
    token = torch.arange(h * w, device=device)
    r = floor_mod(token // w - sh, hp)
    c = floor_mod(floor_mod(token, w) - sw, wp)
    scatter = ((r // wh) * nw + c // ww) * n + floor_mod(r, wh) * ww + floor_mod(c, ww)
    return WindowLayout(gather, scatter, n)


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> contiguous (B, C, H, W).

    ``permute(0, 3, 1, 2).contiguous()`` makes ``torch.export`` guard on W != 1 when W is derived
    from the input size (e.g. after patch merging); going through (B, C, H*W) does not.
    """
    b, h, w, c = x.shape
    return x.flatten(1, 2).transpose(1, 2).contiguous().view(b, c, h, w)
