"""Bi-level routing attention (BiFormer) as one op: routing, then attention over the routed regions.

BiFormer's attention (``ops/bra_legacy.py`` of rayleizhu/BiFormer, ``diff_routing=False``, no
soft routing) on q, k, v token maps of (B, H, W, C), cut into nh x nw regions of N = rh x rw
tokens (regions and their tokens numbered row-major):

1. region level: the mean query and the mean key of every region (of the detached q and k: the
   routing is not differentiated), the (R x R) affinity ``scale * q_region @ k_region^T`` and, for
   every query region, the ``topk`` regions of largest affinity in ``torch.topk`` order;
2. token level: every query of a region attends, with ``softmax(scale * q k^T) v`` per head, to
   all tokens of its topk routed regions.

BiFormer's LePE and its output projection stay outside the op; so does the padding (BiFormer pads
the normalised map to a multiple of the region grid before the qkv projection).

:func:`routing_attention_reference` spells this out with standard PyTorch ops: region gathers by
index arithmetic (H and W stay symbolic under ``torch.export``), one ``index_select`` of the
routed regions and ``scaled_dot_product_attention``; it materialises ``topk`` copies of the keys
and values, as the official code does, and is what ONNX export records. The compiled kernels in
``csrc/`` take the same routing (computed here, in PyTorch, by :func:`route`) and read the routed
keys and values in place from the maps by index, so their memory does not grow with topk, and
compute dq, dk and dv from the saved log-sum-exp. :func:`routing_attention` dispatches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _ext

__all__ = [
    'routing_attention',
    'routing_attention_reference',
    'route',
    'fused_available',
]

_OP = 'routing_attention'


def _floor_mod(a: torch.Tensor, n) -> torch.Tensor:
    # written with floor division: ``tensor % symbolic_int`` does not export to ONNX
    return a - (a // n) * n


def _pair(n_win: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(n_win, int):
        return n_win, n_win
    nh, nw = n_win
    return int(nh), int(nw)


# ---------------------------------------------------------------------------------------------
# region geometry (the same arithmetic as csrc/routing_attention.h)
# ---------------------------------------------------------------------------------------------
def _region_tokens(h: int, w: int, n_win: tuple[int, int], device) -> torch.Tensor:
    """(H * W,) row-major map token of every region slot ``region * N + position``."""
    nh, nw = n_win
    rh, rw = h // nh, w // nw
    n = rh * rw
    slot = torch.arange(h * w, device=device)  # one flat arange: no size-1 guards on export
    region, pos = slot // n, _floor_mod(slot, n)
    row = (region // nw) * rh + pos // rw
    col = _floor_mod(region, nw) * rw + _floor_mod(pos, rw)
    return row * w + col


def _token_slots(h: int, w: int, n_win: tuple[int, int], device) -> torch.Tensor:
    """(H * W,) region slot of every row-major map token (the inverse of ``_region_tokens``)."""
    nh, nw = n_win
    rh, rw = h // nh, w // nw
    token = torch.arange(h * w, device=device)
    row, col = token // w, _floor_mod(token, w)
    region = (row // rh) * nw + col // rw
    return region * (rh * rw) + _floor_mod(row, rh) * rw + _floor_mod(col, rw)


# ---------------------------------------------------------------------------------------------
# routing (shared by both paths) and the reference token attention
# ---------------------------------------------------------------------------------------------
def route(
    q: torch.Tensor, k: torch.Tensor, n_win: int | tuple[int, int], topk: int, scale: float
) -> torch.Tensor:
    """The routed regions of every query region (region level of the op; not differentiated).

    Args:
        q: (B, H, W, C_qk) queries, H and W multiples of the region grid.
        k: (B, H, W, C_qk) keys.
        n_win: Regions per side, or (per column, per row).
        topk: Regions routed to each query region.
        scale: Multiplier of the region affinity.

    Returns:
        (B, R, topk) int64 region indices (row-major), by descending affinity as ``torch.topk``
        orders them.
    """
    b, h, w, c = q.shape
    nh, nw = _pair(n_win)

    def means(t: torch.Tensor) -> torch.Tensor:  # (B, R, C)
        # a view, then one dim at a time: mean((2, 4)) of a channel slice is ~50x slower on CPU
        return t.detach().view(b, nh, h // nh, nw, w // nw, c).mean(4).mean(2).view(b, nh * nw, c)

    logits = (means(q) * scale) @ means(k).transpose(-2, -1)  # (B, R, R)
    return torch.topk(logits, topk, dim=-1).indices


def _attend_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    n_win: tuple[int, int],
    num_heads: int,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Token level of the op with standard ops: (B, H, W, C_v) from the routed indices."""
    b, h, w, c_qk = q.shape
    c_v = v.shape[-1]
    nh, nw = n_win
    r = nh * nw
    topk = index.shape[-1]
    gather = _region_tokens(h, w, n_win, q.device)

    def regions(t: torch.Tensor) -> torch.Tensor:  # (B * R, N, C), regions row-major
        return t.flatten(1, 2).index_select(1, gather).view(b * r, -1, t.shape[-1])

    # whole routed regions, copied with one row gather over (batch, region): the topk copies the
    # compiled kernels avoid
    rows = (index + torch.arange(b, device=index.device).view(b, 1, 1) * r).flatten()
    q_r = regions(q)
    n = q_r.shape[1]
    k_sel = regions(k).index_select(0, rows)  # (B * R * topk, N, C_qk)
    v_sel = regions(v).index_select(0, rows)  # (B * R * topk, N, C_v)
    q_r = q_r.view(b * r, n, num_heads, c_qk // num_heads).transpose(1, 2)
    k_sel = k_sel.view(b * r, topk * n, num_heads, c_qk // num_heads).transpose(1, 2)
    v_sel = v_sel.view(b * r, topk * n, num_heads, c_v // num_heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q_r, k_sel, v_sel, dropout_p=dropout_p, scale=scale)
    out = out.transpose(1, 2).reshape(b, r * n, c_v)  # (B, R * N, C_v), region slots
    return out.index_select(1, _token_slots(h, w, n_win, q.device)).view(b, h, w, c_v)


def routing_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_win: int | tuple[int, int],
    topk: int,
    num_heads: int,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bi-level routing attention with standard PyTorch ops; defines the op.

    Same arguments and results as :func:`routing_attention`; ``dropout_p`` (attention dropout)
    exists only here.
    """
    n_win = _pair(n_win)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    index = route(q, k, n_win, topk, scale)
    return _attend_reference(q, k, v, index, n_win, num_heads, scale, dropout_p), index


# ---------------------------------------------------------------------------------------------
# the custom op (compiled kernels) and its autograd
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op('effvision::routing_attention', mutates_args=())
def _fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    n_win: list[int],
    num_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (B, H, W, C_v), log-sum-exp of every query (B, R, heads, N))."""
    # a tuple: autograd does not see tensors inside the list pybind returns
    return tuple(_ext.load(_OP).forward(q, k, v, index, n_win, num_heads, scale))


@_fused.register_fake
def _(q, k, v, index, n_win, num_heads, scale):
    b, h, w, _ = q.shape
    nh, nw = n_win
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (
        q.new_empty(b, h, w, v.shape[-1]),
        q.new_empty(b, nh * nw, num_heads, (h // nh) * (w // nw), dtype=lse_dtype),
    )


@torch.library.custom_op('effvision::routing_attention_backward', mutates_args=())
def _fused_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    n_win: list[int],
    num_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad q, grad k, grad v), contiguous, shaped like q, k, v."""
    return tuple(
        _ext.load(_OP).backward(
            grad_out.contiguous(), q, k, v, index, out, lse, n_win, num_heads, scale
        )
    )


@_fused_backward.register_fake
def _(grad_out, q, k, v, index, out, lse, n_win, num_heads, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, index, n_win, num_heads, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, index, out, lse)
    ctx.args = (n_win, num_heads, scale)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, index, out, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v = _fused_backward(grad_out, q, k, v, index, out, lse, *ctx.args)
    return grad_q, grad_k, grad_v, None, None, None, None


_fused.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def fused_available(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the compiled kernel takes these inputs (device, dtype and layout)."""
    if _ext.use_reference() or any(t.stride(-1) != 1 for t in (q, k, v)):
        return False
    if q.device.type == 'cpu':
        return q.dtype in _CPU_DTYPES and _ext.load(_OP) is not None
    if q.device.type == 'cuda':
        return q.dtype in _CUDA_DTYPES and _ext.has_cuda(_OP)
    return False


def _check(q, k, v, n_win: tuple[int, int], topk: int, num_heads: int) -> None:
    for name, t in (('q', q), ('k', k), ('v', v)):
        if t.dim() != 4:
            raise ValueError(
                f'routing_attention: {name} must be (B, H, W, C), got {tuple(t.shape)}'
            )
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            'routing_attention: q and k must have the same shape and v the same (B, H, W), got '
            f'q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}'
        )
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise ValueError('routing_attention: q, k and v must share dtype and device')
    if num_heads < 1 or q.shape[-1] % num_heads or v.shape[-1] % num_heads:
        raise ValueError(
            f'routing_attention: {num_heads} heads do not divide the q/k channels '
            f'({q.shape[-1]}) and the v channels ({v.shape[-1]})'
        )
    nh, nw = n_win
    if nh < 1 or nw < 1:
        raise ValueError(f'routing_attention: n_win must be positive, got {n_win}')
    h, w = q.shape[1], q.shape[2]
    # sizes that are symbolic under torch.export are multiples by construction (padded)
    if isinstance(h, int) and isinstance(w, int) and (h % nh or w % nw):
        raise ValueError(
            f'routing_attention: the {h} x {w} map is not a multiple of the {nh} x {nw} region '
            'grid; pad it first (BiFormer pads the normalised map before the qkv projection)'
        )
    if not 1 <= topk <= nh * nw:
        raise ValueError(
            f'routing_attention: topk={topk} must be between 1 and the {nh * nw} regions'
        )


def routing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_win: int | tuple[int, int],
    topk: int,
    num_heads: int,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bi-level routing attention of token maps (BiFormer's, without LePE and projections).

    Args:
        q: (B, H, W, C_qk) queries; the last dim must be contiguous for the compiled kernels,
            the others may be strided (e.g. a channel slice of one qkv projection).
        k: (B, H, W, C_qk) keys.
        v: (B, H, W, C_v) values.
        n_win: Regions per side (BiFormer's ``n_win``), or (per column, per row); H and W must
            be multiples of it.
        topk: Regions each query region attends to, 1 <= topk <= R.
        num_heads: Heads; C_qk and C_v are split evenly among them.
        scale: Multiplier of the region affinity and of the token logits alike; default
            ``C_qk ** -0.5``, the full q/k width as the official models use, not the head width.
        dropout_p: Attention dropout probability; only the reference implements it.

    Returns:
        (B, H, W, C_v) attention output (contiguous), and the (B, R, topk) routed region indices
        of every query region, R = nh * nw, by descending affinity.
    """
    n_win = _pair(n_win)
    _check(q, k, v, n_win, topk, num_heads)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if dropout_p > 0.0 or not fused_available(q, k, v):
        return routing_attention_reference(q, k, v, n_win, topk, num_heads, scale, dropout_p)
    index = route(q, k, n_win, topk, scale)
    out, _ = _fused(q, k, v, index, list(n_win), num_heads, scale)
    return out, index
