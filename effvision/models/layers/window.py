"""Shape-generic helpers for token maps: padding to a multiple, floor modulo, layout changes.

Written so that H and W stay symbolic under ``torch.export`` (pads computed from sizes and
always applied, ``%`` written with floor division, no reshape that guards on a size of 1). Window
partitioning itself lives in the ops (:mod:`effvision.ops.window_attention`,
:mod:`effvision.ops.routing_attention`).
"""

from __future__ import annotations

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


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> contiguous (B, C, H, W).

    ``permute(0, 3, 1, 2).contiguous()`` makes ``torch.export`` guard on W != 1 when W is derived
    from the input size (e.g. after patch merging); going through (B, C, H*W) does not.
    """
    b, h, w, c = x.shape
    return x.flatten(1, 2).transpose(1, 2).contiguous().view(b, c, h, w)
