"""window_attention: the fused kernels against the PyTorch reference that defines the op."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effvision.ops import _ext
from effvision.ops.window_attention import (
    fused_available,
    window_attention,
    window_attention_reference,
)
from tests.conftest import require_ops

REPO = Path(__file__).resolve().parents[2]


def require_fused() -> None:
    require_ops('window_attention')


def make_case(case: dict, dtype=torch.float64, device='cpu', seed=0):
    """Random inputs for one configuration; returns (qkv, kwargs, differentiable inputs)."""
    g = torch.Generator().manual_seed(seed)
    b, h, w, heads, d = case['b'], case['h'], case['w'], case['heads'], case['d']
    wh, ww = case['window']
    n = (wh or h) * (ww or w)
    c = heads * d
    qkv = torch.randn(b, h, w, 3 * c, generator=g, dtype=torch.float64)
    kwargs = dict(
        num_heads=heads,
        window=case['window'],
        shift=case.get('shift', (0, 0)),
        center_pad=case.get('center', False),
        mask_padded_keys=case.get('mask_pad', False),
    )
    inputs = [qkv]
    if case.get('bias'):
        table = torch.randn(2 * n + 1, heads, generator=g, dtype=torch.float64)
        kwargs['bias_table'] = table.to(device, dtype).requires_grad_()
        kwargs['bias_index'] = torch.randint(0, 2 * n + 1, (n, n), generator=g).to(device)
        inputs.append(kwargs['bias_table'])
    if case.get('pad'):
        kwargs['pad_value'] = torch.randn(3 * c, generator=g, dtype=torch.float64)
        kwargs['pad_value'] = kwargs['pad_value'].to(device, dtype).requires_grad_()
        inputs.append(kwargs['pad_value'])
    qkv = qkv.to(device, dtype).requires_grad_()
    inputs[0] = qkv
    return qkv, kwargs, inputs


# every feature alone and together, odd sizes (padding on both axes), Swin/CSWin/MOAT forms
CASES = {
    'plain': dict(b=2, h=8, w=8, heads=2, d=4, window=(4, 4)),
    'padded': dict(b=1, h=9, w=11, heads=2, d=4, window=(4, 4)),
    'padded_value': dict(b=1, h=9, w=11, heads=2, d=4, window=(4, 4), pad=True),
    'shifted': dict(b=2, h=8, w=8, heads=1, d=8, window=(4, 4), shift=(2, 2)),
    'swin': dict(b=2, h=9, w=11, heads=3, d=4, window=(4, 4), shift=(2, 2), bias=True, pad=True),
    'rect_shift': dict(b=1, h=10, w=7, heads=2, d=3, window=(4, 3), shift=(3, 1), bias=True),
    'row_shift_only': dict(b=1, h=9, w=9, heads=1, d=4, window=(3, 3), shift=(1, 0)),
    'cswin_vertical': dict(b=2, h=9, w=11, heads=2, d=4, window=(0, 2), center=True),
    'cswin_horizontal': dict(b=1, h=9, w=11, heads=2, d=4, window=(4, 0), center=True),
    'moat_window': dict(b=1, h=9, w=10, heads=2, d=4, window=(4, 4), bias=True, mask_pad=True),
    'global': dict(b=2, h=5, w=6, heads=2, d=4, window=(0, 0), bias=True),
    'tiny_map': dict(b=1, h=2, w=3, heads=1, d=4, window=(7, 7), shift=(3, 3), bias=True, pad=True),
}


def reference(qkv, kwargs):
    kw = dict(kwargs, window=tuple(kwargs['window']), shift=tuple(kwargs['shift']))
    return window_attention_reference(qkv, **kw)


def check_against_reference(case, dtype, device, atol, rtol=0.0):
    qkv, kwargs, inputs = make_case(case, dtype, device)
    out = window_attention(qkv, **kwargs)
    ref = reference(qkv, kwargs)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, inputs, grad)
    theirs = torch.autograd.grad(ref, inputs, grad)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize('name', CASES)
def test_cpu_kernel_matches_reference_float64(name):
    require_fused()
    check_against_reference(CASES[name], torch.float64, 'cpu', atol=1e-12)


@pytest.mark.parametrize('name', ['swin', 'cswin_vertical', 'moat_window', 'global'])
def test_cpu_kernel_matches_reference_float32(name):
    require_fused()
    check_against_reference(CASES[name], torch.float32, 'cpu', atol=2e-5, rtol=1e-4)


def test_cpu_kernel_bfloat16_is_close():
    require_fused()
    qkv, kwargs, _ = make_case(CASES['swin'], torch.bfloat16)
    out = window_attention(qkv, **kwargs)
    ref = reference(qkv.float(), {**kwargs, 'bias_table': kwargs['bias_table'].float(),
                                  'pad_value': kwargs['pad_value'].float()})  # fmt: skip
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize('name', ['swin', 'cswin_vertical', 'moat_window'])
def test_gradcheck(name):
    require_fused()
    # small: gradcheck evaluates the op twice per input element
    case = dict(CASES[name], b=1, h=5, w=6, heads=2, d=2)
    qkv, kwargs, inputs = make_case(case)
    # gradcheck perturbs every input; the bias table and padding value are keyword arguments
    table, pad = kwargs.pop('bias_table', None), kwargs.pop('pad_value', None)

    def fn(qkv, *extra):
        extra = list(extra)
        kw = dict(kwargs)
        if table is not None:
            kw['bias_table'] = extra.pop(0)
        if pad is not None:
            kw['pad_value'] = extra.pop(0)
        return window_attention(qkv, **kw)

    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-7)


def test_randomized_shapes_match_reference():
    require_fused()
    rng = random.Random(0)
    for trial in range(12):
        wh, ww = rng.choice([0, 1, 2, 3, 4]), rng.choice([0, 2, 3, 5])
        case = dict(
            b=rng.randint(1, 2),
            h=rng.randint(1, 10),
            w=rng.randint(1, 10),
            heads=rng.randint(1, 3),
            d=rng.choice([1, 3, 8, 16]),
            window=(wh, ww),
            shift=(
                rng.randint(0, wh - 1) if wh > 1 else 0,
                rng.randint(0, ww - 1) if ww > 1 else 0,
            ),
            bias=rng.random() < 0.5,
            pad=rng.random() < 0.5,
            center=rng.random() < 0.3,
            mask_pad=rng.random() < 0.3,
        )
        qkv, kwargs, inputs = make_case(case, seed=trial)
        out, ref = window_attention(qkv, **kwargs), reference(qkv, kwargs)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0, msg=lambda m, c=case: f'{c}: {m}')
        grad = torch.randn_like(out)
        for a, b in zip(
            torch.autograd.grad(out, inputs, grad),
            torch.autograd.grad(ref, inputs, grad),
            strict=True,
        ):
            torch.testing.assert_close(a, b, atol=1e-11, rtol=0, msg=lambda m, c=case: f'{c}: {m}')


def textbook_window_attention(qkv, heads, window, shift, pad_value):
    """Pad (with pad_value), roll, 6-D partition, masked softmax attention, reverse, roll, crop."""
    (wh, ww), (sh, sw) = window, shift
    b, h, w, c3 = qkv.shape
    d = c3 // 3 // heads
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    x = pad_value.expand(b, hp, wp, c3).clone()
    x[:, :h, :w] = qkv
    x = torch.roll(x, (-sh, -sw), (1, 2))
    x = x.view(b, hp // wh, wh, wp // ww, ww, 3, heads, d).permute(5, 0, 1, 3, 6, 2, 4, 7)
    q, k, v = x.reshape(3, b, -1, heads, wh * ww, d)
    rows = torch.arange(hp).view(hp, 1).expand(hp, wp)
    cols = torch.arange(wp).view(1, wp).expand(hp, wp)

    def region(t, size, win, s):
        return (t >= size - win).long() + (t >= size - s).long() if s else torch.zeros_like(t)

    label = region(rows, hp, wh, sh) * 3 + region(cols, wp, ww, sw)
    label = label.view(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    mask = (label[:, :, None] != label[:, None, :]).double() * -100.0  # (nW, N, N)
    attn = (q * d**-0.5) @ k.transpose(-1, -2) + mask[None, :, None]
    y = attn.softmax(-1) @ v  # (B, nW, heads, N, d)
    y = y.view(b, hp // wh, wp // ww, heads, wh, ww, d).permute(0, 1, 4, 2, 5, 3, 6)
    y = torch.roll(y.reshape(b, hp, wp, heads * d), (sh, sw), (1, 2))
    return y[:, :h, :w]


@pytest.mark.parametrize('size', [(7, 12), (9, 13), (1, 5), (14, 21)])
@pytest.mark.parametrize(
    ('window', 'shift'), [((7, 7), (3, 3)), ((4, 3), (2, 1)), ((2, 13), (0, 0))]
)
def test_reference_equals_roll_and_permute(size, window, shift):
    """The op's index arithmetic equals the textbook pad/roll/partition/reverse/crop."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, *size, 3 * 2 * 3, generator=g, dtype=torch.float64)
    pad = torch.randn(18, generator=g, dtype=torch.float64)
    ours = window_attention_reference(qkv, 2, window, shift, pad_value=pad)
    torch.testing.assert_close(ours, textbook_window_attention(qkv, 2, window, shift, pad))


def test_strided_qkv_slice_is_read_in_place():
    """CSWin hands each branch a channel slice of one projection: no copy needed."""
    require_fused()
    qkv, kwargs, _ = make_case(CASES['cswin_vertical'])
    wide = torch.cat([qkv.detach(), torch.randn_like(qkv)], dim=-1)
    part = wide[..., : qkv.shape[-1]]
    assert not part.is_contiguous()
    torch.testing.assert_close(window_attention(part, **kwargs), reference(qkv.detach(), kwargs))


def test_dispatch_follows_reference_switches(monkeypatch):
    require_fused()
    qkv, kwargs, _ = make_case(CASES['swin'], torch.float32)
    assert fused_available(qkv)
    with _ext.reference_ops():
        assert not fused_available(qkv)
    monkeypatch.setenv('EFFVISION_OPS', 'reference')
    assert not fused_available(qkv)
    monkeypatch.delenv('EFFVISION_OPS')
    assert fused_available(qkv)
    fused = type(window_attention(qkv, **kwargs).grad_fn).__name__
    assert 'effvision_window_attention' in fused, fused
    with _ext.reference_ops():
        plain = type(window_attention(qkv, **kwargs).grad_fn).__name__
    assert 'effvision' not in plain, plain


def test_torch_compile_and_export_see_one_op():
    require_fused()
    qkv, kwargs, _ = make_case(CASES['swin'], torch.float32)
    qkv = qkv.detach()

    class Attend(torch.nn.Module):
        def forward(self, x):
            return window_attention(x, **kwargs)

    program = torch.export.export(Attend(), (qkv,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == 'call_function'}
    assert 'effvision.window_attention.default' in targets
    assert 'aten.index_select.default' not in targets  # the reference's gathers are not traced
    torch.testing.assert_close(program.module()(qkv), reference(qkv, kwargs))


def test_bad_arguments_are_explained():
    qkv = torch.randn(1, 4, 4, 12)
    with pytest.raises(ValueError, match='3 \\* heads'):
        window_attention(qkv, num_heads=5, window=2)
    with pytest.raises(ValueError, match='shift < window'):
        window_attention(qkv, num_heads=2, window=2, shift=2)
    with pytest.raises(ValueError, match='bias_table and bias_index'):
        window_attention(qkv, num_heads=2, window=2, bias_table=torch.zeros(9, 2))


def test_effvision_imports_and_runs_without_compiled_ops(tmp_path):
    """A missing extension falls back to the reference with one warning naming the fix."""
    script = (
        'import sys, warnings, torch\n'
        'sys.modules["effvision.ops._window_attention"] = None\n'  # import fails like unbuilt
        'from effvision.ops.window_attention import window_attention\n'
        'with warnings.catch_warnings(record=True) as caught:\n'
        '    warnings.simplefilter("always")\n'
        '    for _ in range(2):\n'
        '        window_attention(torch.randn(1, 5, 5, 6), num_heads=1, window=2)\n'
        'messages = [str(w.message) for w in caught if "compiled ops" in str(w.message)]\n'
        'assert len(messages) == 1 and "make install" in messages[0], messages\n'
    )
    env = {k: v for k, v in os.environ.items() if k != 'EFFVISION_OPS'}
    subprocess.run([sys.executable, '-c', script], check=True, cwd=REPO, env=env)


# -- CUDA -------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize('name', CASES)
def test_cuda_kernel_matches_reference_float64(name):
    if not _ext.has_cuda('window_attention'):
        pytest.fail('effvision.ops._window_attention was built without CUDA on a CUDA machine')
    check_against_reference(CASES[name], torch.float64, 'cuda', atol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernel_low_precision(dtype):
    qkv, kwargs, inputs = make_case(CASES['swin'], dtype, 'cuda')
    out = window_attention(qkv, **kwargs)
    upcast = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in kwargs.items()}  # fmt: skip
    ref = reference(qkv.float(), upcast)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, inputs, grad)
    theirs = torch.autograd.grad(ref, [qkv, *inputs[1:]], grad.float(), allow_unused=True)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=tol * 10, rtol=tol * 10)


@pytest.mark.gpu
def test_cuda_large_stripes_and_bias_tables():
    """N larger than a thread block and a table larger than shared memory's share."""
    case = dict(b=1, h=40, w=9, heads=2, d=32, window=(0, 7), center=True, bias=True)
    check_against_reference(case, torch.float64, 'cuda', atol=1e-10)


def test_cuda_sources_compile(tmp_path):
    """CI has nvcc but no GPU: the CUDA kernels must at least compile."""
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None or CUDA_HOME is None:
        pytest.skip('no CUDA toolkit or CPU-only torch: nothing to compile')
    if _ext.has_cuda('window_attention'):
        return  # make install already compiled and linked them into the extension
    pytest.fail(
        'a CUDA toolkit is present but effvision.ops._window_attention has no CUDA kernels: '
        'run `make install` (it sets CUDA_HOME and TORCH_CUDA_ARCH_LIST) and read its log'
    )
