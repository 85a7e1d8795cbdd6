"""Bi-level routing attention op: compiled kernels vs the PyTorch reference, dispatch, errors."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from effvision.models.backbones.biformer import BiFormer
from effvision.ops import _ext
from effvision.ops import routing_attention as ra
from effvision.ops._ext import reference_ops
from effvision.ops.routing_attention import (
    fused_available,
    route,
    routing_attention,
    routing_attention_reference,
)

KERNEL = _ext.load('routing_attention')
requires_kernel = pytest.mark.skipif(
    KERNEL is None, reason='effvision.ops._routing_attention is not built (make install)'
)
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def make_qkv(b, h, w, heads, d_qk, d_v, dtype=torch.float32, device='cpu', seed=0):
    """q, k, v as channel slices of one (B, H, W, heads * (2 d_qk + d_v)) leaf, like BiFormer's."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, h, w, heads * (2 * d_qk + d_v), generator=g, dtype=torch.float64)
    return split_qkv(qkv.to(device=device, dtype=dtype), heads, d_qk, d_v)


def split_qkv(values, heads, d_qk, d_v):
    """A new leaf with these values, and its q, k, v slices."""
    qkv = values.detach().clone().requires_grad_()
    return qkv, qkv.split([heads * d_qk, heads * d_qk, heads * d_v], dim=-1)


def run(fn, qkv, parts, n_win, topk, heads, grad_seed=1):
    out, index = fn(*parts, n_win, topk, heads)
    g = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    return out, index, grad


# (B, H, W, n_win, topk, heads, d_qk, d_v): BiFormer-like, rectangular grids, odd head dims,
# regions of one token, a head dim above one SIMD tile and below one, every region routed
SHAPES = [
    (2, 8, 8, 2, 2, 2, 8, 8),
    (1, 12, 8, (3, 2), 4, 3, 5, 7),
    (2, 6, 10, (3, 5), 15, 1, 3, 4),
    (1, 4, 4, 4, 3, 2, 17, 33),
    (3, 9, 6, 3, 1, 4, 2, 6),
    (1, 16, 16, 4, 4, 4, 32, 32),
    (1, 20, 10, (2, 1), 2, 2, 40, 24),
]


def random_shapes(count: int, seed: int = 0):
    rng = random.Random(seed)
    shapes = []
    for _ in range(count):
        nh, nw = rng.randint(1, 4), rng.randint(1, 4)
        rh, rw = rng.randint(1, 5), rng.randint(1, 5)
        shapes.append(
            (
                rng.randint(1, 2),
                nh * rh,
                nw * rw,
                (nh, nw),
                rng.randint(1, nh * nw),
                rng.randint(1, 3),
                rng.randint(1, 12),
                rng.randint(1, 12),
            )
        )
    return shapes


@requires_kernel
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('shape', SHAPES + random_shapes(8), ids=str)
def test_fused_matches_reference(shape, dtype):
    b, h, w, n_win, topk, heads, d_qk, d_v = shape
    qkv, parts = make_qkv(b, h, w, heads, d_qk, d_v, dtype)
    assert fused_available(*parts)
    out, index, grad = run(routing_attention, qkv, parts, n_win, topk, heads)
    ref, ref_index, ref_grad = run(routing_attention_reference, qkv, parts, n_win, topk, heads)
    assert torch.equal(index, ref_index)
    assert out.shape == (b, h, w, heads * d_v) and out.is_contiguous()
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(grad, ref_grad, **TOL[dtype])


@requires_kernel
@pytest.mark.parametrize('topk', [1, 2, 5, 9])
def test_every_topk_up_to_all_regions(topk):
    """topk = R is dense attention over the map: check against plain SDPA too."""
    qkv, parts = make_qkv(2, 9, 6, 2, 4, 3, torch.float64)
    out, index, grad = run(routing_attention, qkv, parts, 3, topk, 2)
    ref, _, ref_grad = run(routing_attention_reference, qkv, parts, 3, topk, 2)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-10)
    if topk == 9:
        q, k, v = (t.reshape(2, 54, 2, -1).transpose(1, 2) for t in parts)
        dense = F.scaled_dot_product_attention(q, k, v, scale=8**-0.5)
        torch.testing.assert_close(out, dense.transpose(1, 2).reshape(2, 9, 6, 6))


@requires_kernel
def test_any_index_with_repeats():
    """The kernels take any routing, also repeated or unordered regions (a repeat counts twice)."""
    qkv, (q, k, v) = make_qkv(2, 6, 6, 2, 3, 4, torch.float64)
    index = torch.tensor([[3, 3, 0], [8, 1, 1], [0, 0, 0]] * 3).view(1, 9, 3).repeat(2, 1, 1)
    index[1] = index[1].flip(-1)
    out, _ = ra._fused(q, k, v, index, [3, 3], 2, 0.3)
    ref = ra._attend_reference(q, k, v, index, (3, 3), 2, 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    (ref_grad,) = torch.autograd.grad(ref, qkv, grad_out)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-10)


@requires_kernel
def test_gradcheck_float64():
    _, parts = make_qkv(1, 4, 6, 2, 3, 2, torch.float64)
    parts = [t.detach().clone().requires_grad_() for t in parts]

    def fused(q, k, v):
        return routing_attention(q, k, v, (2, 3), 2, 2)[0]

    assert torch.autograd.gradcheck(fused, parts, eps=1e-6, atol=1e-7)
    # the token attention alone, with a fixed routing
    index = torch.tensor([[[5, 0], [1, 2], [2, 2], [4, 3], [0, 1], [3, 5]]])
    assert torch.autograd.gradcheck(
        lambda q, k, v: ra._fused(q, k, v, index, [2, 3], 2, 0.7)[0], parts, eps=1e-6, atol=1e-7
    )


@requires_kernel
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu(dtype):
    qkv, parts = make_qkv(1, 8, 8, 2, 16, 16, torch.float32)
    ref, index, ref_grad = run(routing_attention_reference, qkv, parts, 2, 2, 2)
    low, low_parts = split_qkv(qkv.to(dtype), 2, 16, 16)
    out, _ = ra._fused(*low_parts, index, [2, 2], 2, 32**-0.5)
    grad_out = torch.randn(  # the one run() used
        out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    (grad,) = torch.autograd.grad(out, low, grad_out.to(dtype))
    assert out.dtype == grad.dtype == dtype
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    torch.testing.assert_close(grad.float(), ref_grad, **TOL[dtype])


@requires_kernel
def test_strided_and_separate_inputs_agree():
    """Channel slices of one qkv map (read in place) and separate contiguous maps."""
    qkv, parts = make_qkv(2, 8, 12, 2, 4, 6, torch.float32)
    assert not parts[0].is_contiguous()
    sliced, _ = routing_attention(*parts, (2, 3), 3, 2)
    separate, _ = routing_attention(*(t.contiguous() for t in parts), (2, 3), 3, 2)
    torch.testing.assert_close(sliced, separate, rtol=0, atol=0)
    # any strides of the batch and map dims (here H and W swapped in memory)
    q_t = parts[0].detach().transpose(1, 2).contiguous().transpose(1, 2)
    assert fused_available(q_t, parts[1], parts[2])
    torch.testing.assert_close(routing_attention(q_t, *parts[1:], (2, 3), 3, 2)[0], sliced)
    # a strided channel dim is not for the kernel: the reference runs
    assert not fused_available(parts[0][..., ::2], parts[1][..., ::2], parts[2])


@requires_kernel
def test_memory_saved_for_backward_does_not_grow_with_topk():
    """The fused op keeps q, k, v, the routing, out and the log-sum-exp; the reference (like the
    official gather) keeps topk copies of the keys and values."""

    def saved_bytes(fn, topk):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        _, parts = make_qkv(1, 16, 16, 4, 8, 8, torch.float32)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*parts, 4, topk, 4)
        return total[0]

    fused = [saved_bytes(routing_attention, topk) for topk in (1, 16)]
    reference = [saved_bytes(routing_attention_reference, topk) for topk in (1, 16)]
    kv_bytes = 2 * 16 * 16 * 32 * 4
    assert fused[1] - fused[0] <= 16 * 15 * 8  # the (B, R, topk) int64 routing only
    assert reference[1] - reference[0] >= 15 * kv_bytes  # 15 more copies of k and v


# -- dispatch ------------------------------------------------------------------------------------
def _boom(*args, **kwargs):
    raise AssertionError('the compiled op must not run here')


def test_reference_is_forced_by_env_and_context(monkeypatch):
    qkv, parts = make_qkv(1, 8, 8, 2, 4, 4)
    expected, expected_index = routing_attention_reference(*parts, 2, 2, 2)
    monkeypatch.setattr(ra, '_fused', _boom)
    with reference_ops():
        assert not fused_available(*parts)
        out, index = routing_attention(*parts, 2, 2, 2)
    assert torch.equal(out, expected) and torch.equal(index, expected_index)
    monkeypatch.setenv('EFFVISION_OPS', 'reference')
    assert not fused_available(*parts)
    out, _ = routing_attention(*parts, 2, 2, 2)
    assert torch.equal(out, expected)


def test_missing_kernel_falls_back_to_the_reference(monkeypatch):
    qkv, parts = make_qkv(1, 8, 8, 2, 4, 4)
    monkeypatch.setattr(_ext, 'load', lambda op: None)
    monkeypatch.setattr(ra, '_fused', _boom)
    assert not fused_available(*parts)
    out, _ = routing_attention(*parts, 2, 2, 2)
    assert torch.equal(out, routing_attention_reference(*parts, 2, 2, 2)[0])


def test_dropout_runs_the_reference(monkeypatch):
    qkv, parts = make_qkv(1, 8, 8, 2, 4, 4)
    monkeypatch.setattr(ra, '_fused', _boom)
    out, _ = routing_attention(*parts, 2, 2, 2, dropout_p=0.5)
    assert out.shape == (1, 8, 8, 8)


@requires_kernel
def test_fused_path_runs_the_custom_op(monkeypatch):
    qkv, parts = make_qkv(1, 8, 8, 2, 4, 4)
    calls = []
    real = ra._fused
    monkeypatch.setattr(ra, '_fused', lambda *args: calls.append(1) or real(*args))
    routing_attention(*parts, 2, 2, 2)
    assert calls == [1]


@requires_kernel
def test_custom_op_registration():
    """Schema, fake implementation and autograd as torch.compile / torch.export see them."""
    _, (q, k, v) = make_qkv(1, 4, 6, 2, 3, 2, torch.float64)
    index = route(q, k, (2, 3), 2, 0.5)
    torch.library.opcheck(ra._fused, (q, k, v, index, [2, 3], 2, 0.5))


def test_route_is_the_official_routing():
    """Region means of detached q, k; scaled affinity; torch.topk order."""
    _, (q, k, _) = make_qkv(2, 6, 8, 1, 5, 1, torch.float64)
    index = route(q, k, (3, 2), 4, 0.25)
    regions = q.detach().reshape(2, 3, 2, 2, 4, 5).permute(0, 1, 3, 2, 4, 5).reshape(2, 6, 8, 5)
    k_regions = k.detach().reshape(2, 3, 2, 2, 4, 5).permute(0, 1, 3, 2, 4, 5).reshape(2, 6, 8, 5)
    logits = (regions.mean(2) * 0.25) @ k_regions.mean(2).transpose(1, 2)
    assert torch.equal(index, torch.topk(logits, 4, dim=-1).indices)
    assert not index.requires_grad


@pytest.mark.parametrize(
    ('args', 'message'),
    [
        (dict(shape=(8, 8, 12)), 'must be \\(B, H, W, C\\)'),
        (dict(n_win=3), 'not a multiple of the 3 x 3 region grid'),
        (dict(topk=0), 'topk=0 must be between 1 and the 4 regions'),
        (dict(topk=5), 'topk=5 must be between 1 and the 4 regions'),
        (dict(heads=5), '5 heads do not divide'),
        (dict(k_dtype=torch.float64), 'share dtype and device'),
        (dict(k_channels=6), 'q and k must have the same shape'),
    ],
)
def test_bad_arguments_are_explained(args, message):
    shape = args.get('shape', (1, 8, 8, 12))
    q = torch.randn(*shape)
    k = torch.randn(*shape[:-1], args.get('k_channels', shape[-1]), dtype=args.get('k_dtype'))
    v = torch.randn(*shape)
    with pytest.raises(ValueError, match=message):
        routing_attention(q, k, v, args.get('n_win', 2), args.get('topk', 2), args.get('heads', 2))


@requires_kernel
def test_kernel_rejects_bad_routing_and_layouts():
    _, (q, k, v) = make_qkv(1, 4, 4, 2, 2, 2)
    index = torch.tensor([[[0], [1], [2], [4]]])
    with pytest.raises(RuntimeError, match='routed region indices must be in \\[0, 4\\)'):
        KERNEL.forward(q, k, v, index, [2, 2], 2, 1.0)
    with pytest.raises(RuntimeError, match='index must be contiguous int64 \\(B, R, topk\\)'):
        KERNEL.forward(q, k, v, index.int(), [2, 2], 2, 1.0)
    with pytest.raises(RuntimeError, match="q's channels must be contiguous"):
        KERNEL.forward(q[..., ::2], k[..., ::2], v, index.clamp(max=3), [2, 2], 1, 1.0)
    with pytest.raises(RuntimeError, match='not a multiple of the 3 x 3 region grid'):
        KERNEL.forward(q, k, v, index, [3, 3], 2, 1.0)


# -- BiFormer through both paths -----------------------------------------------------------------
TINY = dict(
    arch=None,
    depths=(1, 1, 1, 1),
    embed_dims=(16, 16, 32, 32),
    head_dim=8,
    global_heads=4,
    n_win=2,
    topks=(1, 2, 4, -2),
)


@requires_kernel
@pytest.mark.parametrize('size', [(64, 64), (37, 50), (13, 9)])
def test_biformer_fused_equals_reference(size):
    """Outputs and input gradients of a BiFormer, padded (non-divisible) maps included."""
    model = BiFormer(**TINY).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)

    def forward_backward():
        outs = model(x)
        weights = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=weights, dtype=o.dtype)).sum() for o in outs)
        return outs, torch.autograd.grad(loss, x)[0]

    outs, grad = forward_backward()
    with reference_ops():
        ref_outs, ref_grad = forward_backward()
    for out, ref in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-10)


# -- CUDA ----------------------------------------------------------------------------------------
def _cuda_kernel() -> bool:
    return torch.cuda.is_available() and _ext.has_cuda('routing_attention')


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('shape', SHAPES + random_shapes(4, seed=1), ids=str)
def test_cuda_matches_reference(shape, dtype):
    if not _cuda_kernel():
        pytest.fail('a GPU is present but effvision.ops._routing_attention has no CUDA kernels')
    b, h, w, n_win, topk, heads, d_qk, d_v = shape
    qkv, parts = make_qkv(b, h, w, heads, d_qk, d_v, torch.float64, device='cuda')
    ref, index, ref_grad = run(routing_attention_reference, qkv, parts, n_win, topk, heads)
    low, low_parts = split_qkv(qkv.to(dtype), heads, d_qk, d_v)
    grid = list(n_win) if isinstance(n_win, tuple) else [n_win, n_win]
    out, _ = ra._fused(*low_parts, index, grid, heads, (heads * d_qk) ** -0.5)
    grad_out = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    (grad,) = torch.autograd.grad(out, low, grad_out.to(out))
    (ref_grad,) = torch.autograd.grad(ref, qkv, grad_out.to(ref))
    tol = TOL[dtype] if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)  # fast-math exp
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(grad.double(), ref_grad, **tol)


@pytest.mark.gpu
def test_cuda_gradcheck_and_biformer():
    if not _cuda_kernel():
        pytest.fail('a GPU is present but effvision.ops._routing_attention has no CUDA kernels')
    _, parts = make_qkv(1, 4, 6, 2, 3, 2, torch.float64, device='cuda')
    parts = [t.detach().clone().requires_grad_() for t in parts]
    assert fused_available(*parts)
    assert torch.autograd.gradcheck(
        lambda q, k, v: routing_attention(q, k, v, (2, 3), 2, 2)[0], parts, eps=1e-6, atol=1e-7
    )
    model = BiFormer(**TINY).double().cuda()
    x = torch.randn(2, 3, 37, 50, dtype=torch.float64, device='cuda')
    with torch.no_grad():
        outs = model(x)
        with reference_ops():
            refs = model(x)
    for out, ref in zip(outs, refs, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
