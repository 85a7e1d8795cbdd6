"""Window attention as one op: pad, shift, partition, bias, mask, softmax, P.V, reverse, crop.

Swin (square windows, shifted, relative position bias, padded tokens carrying the qkv bias),
CSWin (stripes: full-height or full-width windows, centred zero padding) and MOAT (windows or the
whole map, relative position bias, padded keys masked) all attend like this:

1. the projected map ``qkv`` (B, H, W, 3 * heads * d) is padded to a multiple of the window,
   at the end or centred, padded tokens having the value ``pad_value`` (the projection's bias, if
   the official code pads before projecting) or zero;
2. rolled by ``-shift`` and cut into windows of wh x ww tokens;
3. in each window and head, ``softmax(scale * q k^T + bias + mask) v``, where ``bias[i, j] =
   bias_table[bias_index[i, j], head]``, and ``mask`` adds ``shift_mask_value`` between tokens of
   different regions of a shifted window (Swin's mask, -100 officially) and excludes padded keys
   when ``mask_padded_keys``;
4. the windows are put back, rolled by ``+shift`` and cropped to (B, H, W, heads * d).

:func:`window_attention_reference` spells this out with standard PyTorch ops (index gathers and
``scaled_dot_product_attention``; H and W stay symbolic under ``torch.export``, so it is also what
ONNX export records). The fused kernels in ``csrc/`` do all four steps in one pass per window and
head, reading ``qkv`` and writing the output in place of the map, without materialising the
padded, shifted or partitioned copies or the N x N logits; the backward pass recomputes the
logits from the saved log-sum-exp. :func:`window_attention` dispatches between them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _ext

__all__ = ['window_attention', 'window_attention_reference', 'WindowGeometry']

_OP = 'window_attention'


# ---------------------------------------------------------------------------------------------
# geometry (the same arithmetic as csrc/window_attention.h)
# ---------------------------------------------------------------------------------------------
def _floor_mod(a: torch.Tensor, n) -> torch.Tensor:
    # written with floor division: ``tensor % symbolic_int`` does not export to ONNX
    return a - (a // n) * n


class WindowGeometry(NamedTuple):
    """Sizes of the padded canvas and its windows for an (h, w) map; a 0 window is the full axis."""

    h: int
    w: int
    wh: int
    ww: int
    hp: int
    wp: int
    top: int
    left: int

    @property
    def num_windows(self) -> int:
        return (self.hp // self.wh) * (self.wp // self.ww)

    @property
    def num_tokens(self) -> int:
        return self.wh * self.ww


def geometry(h: int, w: int, window: tuple[int, int], center_pad: bool) -> WindowGeometry:
    """Padded canvas of an (h, w) map for (wh, ww) windows (0: the whole axis, never padded)."""

    def axis(size: int, win: int) -> tuple[int, int, int]:
        if win == 0:
            return size, size, 0
        padded = (size + win - 1) // win * win
        return win, padded, ((padded - size) // 2 if center_pad else 0)

    wh, hp, top = axis(h, window[0])
    ww, wp, left = axis(w, window[1])
    return WindowGeometry(h, w, wh, ww, hp, wp, top, left)


def _canvas(t: torch.Tensor, shift: int, padded: int, before: int, size: int):
    """Rolled canvas coordinate ``t`` -> (map coordinate, inside the map)."""
    u = _floor_mod(t + shift, padded) if shift else t
    pos = u - before
    return pos, (pos >= 0) & (pos < size)


def _region(t: torch.Tensor, window: int, shift: int, padded: int) -> torch.Tensor:
    """Swin's shift-mask region (0, 1, 2) of rolled canvas coordinate ``t`` along one axis."""
    return (t >= padded - window).long() + (t >= padded - shift).long()


def _slot_sources(
    g: WindowGeometry, shift: tuple[int, int], window_index: torch.Tensor, pos: torch.Tensor
):
    """Map token (flat index) of window slots, whether each is a real token, and its region."""
    nww = g.wp // g.ww
    tr = (window_index // nww) * g.wh + pos // g.ww
    tc = _floor_mod(window_index, nww) * g.ww + _floor_mod(pos, g.ww)
    row, row_ok = _canvas(tr, shift[0], g.hp, g.top, g.h)
    col, col_ok = _canvas(tc, shift[1], g.wp, g.left, g.w)
    region = _region(tr, g.wh, shift[0], g.hp) * 3 + _region(tc, g.ww, shift[1], g.wp)
    return row * g.w + col, row_ok & col_ok, region


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------
def window_attention_reference(
    qkv: torch.Tensor,
    num_heads: int,
    window: tuple[int, int],
    shift: tuple[int, int] = (0, 0),
    scale: float | None = None,
    bias_table: torch.Tensor | None = None,
    bias_index: torch.Tensor | None = None,
    pad_value: torch.Tensor | None = None,
    center_pad: bool = False,
    mask_padded_keys: bool = False,
    shift_mask_value: float = -100.0,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Window attention with standard PyTorch ops; defines the op (see the module docstring).

    Slots are enumerated position-major (slot ``p * nW + k`` is position p of window k), so the
    gathered q, k, v viewed as (B, N, nW * heads, d) have windows and heads adjacent and become
    SDPA's (B, nW * heads, N, d) by a transpose, without a copy. ``dropout_p`` (attention
    dropout) exists only here: no released model trains with it.
    """
    b, h, w, c3 = qkv.shape
    c = c3 // 3
    d = c // num_heads
    scale = d**-0.5 if scale is None else scale
    g = geometry(h, w, window, center_pad)
    n, nw = g.num_tokens, g.num_windows
    device = qkv.device

    # gather: one extra token row (index h * w) holds the padding value
    slot = torch.arange(n * nw, device=device)
    source, real, _ = _slot_sources(g, shift, _floor_mod(slot, nw), slot // nw)
    gather = torch.where(real, source, h * w)
    pad = qkv.new_zeros(b, 1, c3) if pad_value is None else pad_value.to(qkv.dtype).expand(b, 1, -1)
    tokens = torch.cat([qkv.reshape(b, h * w, c3), pad], dim=1)

    def heads(part: int) -> torch.Tensor:
        y = tokens[..., part * c : (part + 1) * c].index_select(1, gather)  # (B, N * nW, C)
        return y.view(b, n, nw * num_heads, d).transpose(1, 2)

    q, k, v = heads(0), heads(1), heads(2)

    # additive mask (nW, heads, N, N), enumerated window-major (a transpose of the position-major
    # quantities would make torch.export guard on nW being 1)
    slot = torch.arange(nw * n, device=device)
    _, real, region = _slot_sources(g, shift, slot // n, _floor_mod(slot, n))
    real, region = real.view(nw, 1, 1, n), region.view(nw, 1, n)
    mask = None
    if bias_table is not None or shift[0] or shift[1] or mask_padded_keys:
        mask = qkv.new_zeros(nw, 1, n, n)
        if bias_table is not None:
            bias = bias_table[bias_index.reshape(-1)].view(n, n, num_heads).permute(2, 0, 1)
            mask = mask + bias.to(qkv.dtype)
        if shift[0] or shift[1]:
            different = region[:, :, :, None] != region[:, :, None, :]
            mask = mask + different.to(qkv.dtype) * shift_mask_value
        if mask_padded_keys:
            mask = mask.masked_fill(~real, torch.finfo(qkv.dtype).min)
        mask = mask.expand(nw, num_heads, n, n).reshape(1, nw * num_heads, n, n)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)

    # back to the map: (B, nW * heads, N, d) -> (B, N * nW, C), then the real tokens' slots
    out = out.transpose(1, 2).clone(memory_format=torch.contiguous_format).view(b, n * nw, c)
    token = torch.arange(h * w, device=device)
    return out.index_select(1, _scatter(g, shift, token)).view(b, h, w, c)


def _scatter(g: WindowGeometry, shift: tuple[int, int], token: torch.Tensor) -> torch.Tensor:
    """Position-major slot of each real token."""
    r = _floor_mod(token // g.w + g.top - shift[0], g.hp)
    col = _floor_mod(_floor_mod(token, g.w) + g.left - shift[1], g.wp)
    window_index = (r // g.wh) * (g.wp // g.ww) + col // g.ww
    pos = _floor_mod(r, g.wh) * g.ww + _floor_mod(col, g.ww)
    return pos * g.num_windows + window_index


# ---------------------------------------------------------------------------------------------
# the custom op (compiled kernels) and its autograd
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op('effvision::window_attention', mutates_args=())
def _fused(
    qkv: torch.Tensor,
    num_heads: int,
    window: list[int],
    shift: list[int],
    scale: float,
    bias_table: torch.Tensor | None,
    bias_index: torch.Tensor | None,
    pad_value: torch.Tensor | None,
    center_pad: bool,
    mask_padded_keys: bool,
    shift_mask_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (B, H, W, C), log-sum-exp of every query row (B, nW * heads * N))."""
    # a tuple: autograd does not see tensors inside the list pybind returns
    return tuple(
        _ext.load(_OP).forward(
            qkv,
            num_heads,
            window,
            shift,
            scale,
            bias_table,
            bias_index,
            pad_value,
            center_pad,
            mask_padded_keys,
            shift_mask_value,
        )
    )


@_fused.register_fake
def _(qkv, num_heads, window, shift, scale, bias_table, bias_index, pad_value, center_pad, *_):
    b, h, w, c3 = qkv.shape
    g = geometry(h, w, tuple(window), center_pad)
    lse_dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    return (
        qkv.new_empty(b, h, w, c3 // 3),
        qkv.new_empty(b, g.num_windows * num_heads * g.num_tokens, dtype=lse_dtype),
    )


@torch.library.custom_op('effvision::window_attention_backward', mutates_args=())
def _fused_backward(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    num_heads: int,
    window: list[int],
    shift: list[int],
    scale: float,
    bias_table: torch.Tensor | None,
    bias_index: torch.Tensor | None,
    pad_value: torch.Tensor | None,
    center_pad: bool,
    mask_padded_keys: bool,
    shift_mask_value: float,
    need_bias_grad: bool,
    need_pad_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad qkv, grad bias_table (empty if not needed), grad pad_value (idem))."""
    return tuple(
        _ext.load(_OP).backward(
            grad_out.contiguous(),
            qkv,
            out,
            lse,
            num_heads,
            window,
            shift,
            scale,
            bias_table,
            bias_index,
            pad_value,
            center_pad,
            mask_padded_keys,
            shift_mask_value,
            need_bias_grad,
            need_pad_grad,
        )
    )


@_fused_backward.register_fake
def _(grad_out, qkv, out, lse, num_heads, window, shift, scale, bias_table, bias_index, pad_value,
      center_pad, mask_padded_keys, shift_mask_value, need_bias_grad, need_pad_grad):  # fmt: skip
    grad_table = bias_table.new_empty(bias_table.shape) if need_bias_grad else qkv.new_empty(0)
    grad_pad = pad_value.new_empty(pad_value.shape) if need_pad_grad else qkv.new_empty(0)
    return qkv.new_empty(qkv.shape), grad_table, grad_pad


_FLAGS = ('num_heads', 'window', 'shift', 'scale', 'center_pad', 'mask_padded_keys',
          'shift_mask_value')  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    qkv, *args = inputs
    (num_heads, window, shift, scale, bias_table, bias_index, pad_value, center_pad,
     mask_padded_keys, shift_mask_value) = args  # fmt: skip
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, bias_table, bias_index, pad_value)
    ctx.flags = dict(zip(_FLAGS, (num_heads, window, shift, scale, center_pad, mask_padded_keys,
                                  shift_mask_value), strict=True))  # fmt: skip


def _backward(ctx, grad_out, _grad_lse):
    qkv, out, lse, bias_table, bias_index, pad_value = ctx.saved_tensors
    f = ctx.flags
    need_bias = bias_table is not None and ctx.needs_input_grad[5]
    need_pad = pad_value is not None and ctx.needs_input_grad[7]
    grad_qkv, grad_table, grad_pad = _fused_backward(
        grad_out, qkv, out, lse, f['num_heads'], f['window'], f['shift'], f['scale'],
        bias_table, bias_index, pad_value, f['center_pad'], f['mask_padded_keys'],
        f['shift_mask_value'], need_bias, need_pad,
    )  # fmt: skip
    return (
        grad_qkv, None, None, None, None,
        grad_table if need_bias else None, None,
        grad_pad if need_pad else None,
        None, None, None,
    )  # fmt: skip


_fused.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def fused_available(qkv: torch.Tensor) -> bool:
    """Whether the compiled kernel takes this input (device, dtype and layout)."""
    if _ext.use_reference() or qkv.stride(-1) != 1:
        return False
    if qkv.device.type == 'cpu':
        return qkv.dtype in _CPU_DTYPES and _ext.load(_OP) is not None
    if qkv.device.type == 'cuda':
        return qkv.dtype in _CUDA_DTYPES and _ext.has_cuda(_OP)
    return False


def window_attention(
    qkv: torch.Tensor,
    num_heads: int,
    window: int | tuple[int, int],
    shift: int | tuple[int, int] = 0,
    scale: float | None = None,
    bias_table: torch.Tensor | None = None,
    bias_index: torch.Tensor | None = None,
    pad_value: torch.Tensor | None = None,
    center_pad: bool = False,
    mask_padded_keys: bool = False,
    shift_mask_value: float = -100.0,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Multi-head self-attention in (shifted) windows of a token map, from q, k, v to output.

    Args:
        qkv: (B, H, W, 3 * heads * d), channels ``[q | k | v]``, each ``[head, d]``; the last
            dim must be contiguous, the others may be strided (e.g. a channel slice).
        num_heads: Number of heads.
        window: (wh, ww) tokens, or one int for square windows; 0 for the whole axis (stripes).
        shift: Cyclic shift (rows, cols) before partitioning, each smaller than its window.
        scale: Logit multiplier, default ``d ** -0.5``.
        bias_table: (T, heads) relative position bias table, gathered as
            ``bias_table[bias_index[i, j], head]`` for query position i and key position j.
        bias_index: (N, N) integer index into ``bias_table``, N = wh * ww.
        pad_value: (3 * heads * d,) value of padded tokens (e.g. the qkv bias, when the official
            code pads before projecting); zeros if None.
        center_pad: Pad ``pad // 2`` before the map and the rest after (CSWin) instead of all
            after (Swin, MOAT).
        mask_padded_keys: Padded tokens are not attended to (MOAT), instead of being keys like
            any other (Swin, CSWin).
        shift_mask_value: Added to the logits of pairs from different regions of a shifted
            window.
        dropout_p: Attention dropout probability; only the reference implements it.

    Returns:
        (B, H, W, heads * d), contiguous.
    """
    window = (window, window) if isinstance(window, int) else tuple(window)
    shift = (shift, shift) if isinstance(shift, int) else tuple(shift)
    if qkv.dim() != 4 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(
            f'qkv must be (B, H, W, 3 * heads * head_dim) with {num_heads} heads, got '
            f'{tuple(qkv.shape)}'
        )
    for win, sh, name in zip(window, shift, ('rows', 'cols'), strict=True):
        if win < 0 or not 0 <= sh < max(win, 1) or (win == 0 and sh):
            raise ValueError(f'{name}: need 0 <= shift < window, got window {win}, shift {sh}')
    if (bias_table is None) != (bias_index is None):
        raise ValueError('bias_table and bias_index go together: pass both or neither')
    scale = (qkv.shape[-1] // 3 // num_heads) ** -0.5 if scale is None else float(scale)
    args = (
        num_heads, window, shift, scale, bias_table, bias_index, pad_value, center_pad,
        mask_padded_keys, shift_mask_value,
    )  # fmt: skip
    if (dropout_p > 0.0) or not fused_available(qkv):
        return window_attention_reference(qkv, *args, dropout_p=dropout_p)
    if bias_index is not None:
        bias_index = bias_index.to(torch.int64)
    out, _ = _fused(
        qkv, num_heads, list(window), list(shift), scale, bias_table, bias_index, pad_value,
        center_pad, mask_padded_keys, float(shift_mask_value),
    )  # fmt: skip
    return out
