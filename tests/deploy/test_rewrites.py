"""Export-time rewrites: equal to the modules they replace, and right at every size in ONNX."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from mmseg.models.utils import Upsample as MMSegUpsample
from torch import nn

from effvision.deploy.rewrites import (
    ExportableAdaptiveAvgPool2d,
    ExportableMultiheadAttention,
    ExportableUpsample,
    apply_deploy_forms,
    make_exportable,
)


@pytest.mark.parametrize('out', [1, 2, 3, 6, (2, 5)])
@pytest.mark.parametrize('size', [(4, 4), (5, 6), (13, 17), (1, 9)])
def test_pool_equals_adaptive_avg_pool(out, size):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    torch.testing.assert_close(ExportableAdaptiveAvgPool2d(out)(x), nn.AdaptiveAvgPool2d(out)(x))


def test_make_exportable_swaps_pools_in_a_copy():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.AdaptiveAvgPool2d(3)))
    rewritten = make_exportable(model)
    assert isinstance(model[1][0], nn.AdaptiveAvgPool2d)  # the original is untouched
    assert isinstance(rewritten[1][0], ExportableAdaptiveAvgPool2d)
    x = torch.randn(1, 3, 11, 7)
    torch.testing.assert_close(rewritten(x), model(x))


def test_pool_stays_correct_at_other_sizes_in_onnx(tmp_path):
    """The upstream translation of adaptive_avg_pool2d keeps the example's bins (wrong at 13x17
    after exporting at 4x4); the rewrite must be right everywhere."""

    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = ExportableAdaptiveAvgPool2d(6)

        def forward(self, x):
            return self.pool(x)

    dims = {2: torch.export.Dim('h', min=2, max=512), 3: torch.export.Dim('w', min=2, max=512)}
    program = torch.export.export(Pool(), (torch.randn(1, 4, 8, 8),), dynamic_shapes=(dims,))
    path = tmp_path / 'pool.onnx'
    torch.onnx.export(program, dynamo=True).save(str(path))
    session = ort.InferenceSession(str(path))
    for size in [(8, 8), (13, 17), (40, 9)]:
        x = torch.randn(1, 4, *size)
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        np.testing.assert_allclose(out, nn.AdaptiveAvgPool2d(6)(x).numpy(), atol=1e-5)


@pytest.mark.parametrize(
    'mode, align_corners', [('nearest', None), ('bilinear', False), ('bilinear', True)]
)
@pytest.mark.parametrize('factor', [2, 4, (2, 3)])
def test_integer_upsampling_is_swapped_with_the_same_numbers(mode, align_corners, factor):
    layers = [nn.Upsample(scale_factor=factor, mode=mode, align_corners=align_corners)]
    if isinstance(factor, int):  # mmseg's Upsample takes one factor for both sides
        layers.append(MMSegUpsample(scale_factor=factor, mode=mode, align_corners=align_corners))
    model = nn.Sequential(*layers)
    rewritten = make_exportable(model)
    assert all(isinstance(m, ExportableUpsample) for m in rewritten)
    x = torch.randn(1, 2, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(rewritten(x), model(x), rtol=0, atol=0)


def test_fractional_or_sized_upsampling_is_left_alone():
    model = nn.Sequential(nn.Upsample(scale_factor=1.5), nn.Upsample(size=(8, 8)))
    rewritten = make_exportable(model)
    assert all(isinstance(m, nn.Upsample) for m in rewritten)


def test_upsampling_keeps_height_and_width_dynamic_in_onnx(tmp_path):
    dims = {2: torch.export.Dim('h', min=2, max=512), 3: torch.export.Dim('w', min=2, max=512)}
    model = ExportableUpsample((2, 2), 'bilinear', False)
    program = torch.export.export(model, (torch.randn(1, 3, 8, 8),), dynamic_shapes=(dims,))
    path = tmp_path / 'up.onnx'
    torch.onnx.export(program, dynamo=True).save(str(path))
    session = ort.InferenceSession(str(path))
    x = torch.randn(1, 3, 13, 6)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(out, nn.Upsample(scale_factor=2, mode='bilinear')(x), atol=1e-6)


@pytest.mark.parametrize('batch_first', [True, False])
def test_multihead_attention_export_form_has_the_same_numbers(batch_first):
    attention = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    form = ExportableMultiheadAttention(attention)
    assert form.in_proj_weight is attention.in_proj_weight  # shared, not copied
    query, key = torch.randn(3, 10, 32), torch.randn(3, 7, 32)
    if not batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    with torch.no_grad():
        ref = attention(query, key, key, need_weights=False)[0]
        out, weights = form(query, key, key, need_weights=False)
    assert weights is None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match='no masks'):
        form(query, key, key, attn_mask=torch.zeros(10, 7, dtype=torch.bool))


def test_multihead_attention_keeps_the_batch_dynamic():
    # As PEM calls it (query = key != value), traced as the exporter traces (size-oblivious):
    # nn.MultiheadAttention's own reshapes guard on batch != 1, which pins a dynamic batch.
    from effvision.deploy.onnx import _size_oblivious

    model = _SelfAttention(nn.MultiheadAttention(16, 2, batch_first=True)).eval()
    exportable = make_exportable(model)
    assert isinstance(exportable.attention, ExportableMultiheadAttention)
    assert isinstance(model.attention, nn.MultiheadAttention)  # the original is untouched
    dims = {0: torch.export.Dim('batch', min=1, max=64)}
    example = (torch.randn(2, 5, 16),)
    with torch.no_grad(), _size_oblivious():
        with pytest.raises(Exception, match='batch'):
            torch.export.export(model, example, dynamic_shapes=(dims,))
        program = torch.export.export(exportable, example, dynamic_shapes=(dims,))
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-6)


class _SelfAttention(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qk = x + 1
        return self.attention(qk, qk, x, need_weights=False)[0]


class _Foldable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.child = nn.Module()
        self.child.switch_to_deploy = lambda: pytest.fail('a switched module handles its children')
        self.calls = 0

    def switch_to_deploy(self):
        self.calls += 1


def test_deploy_forms_are_applied_to_the_outermost_modules_of_the_copy():
    model = nn.Sequential(nn.Identity(), _Foldable())
    model.train()
    rewritten = make_exportable(model)
    assert model[1].calls == 0  # the original keeps its training form
    assert rewritten[1].calls == 1 and rewritten.deploy_forms == ['1']
    assert not rewritten[1].training
    assert apply_deploy_forms(nn.Sequential(nn.Conv2d(1, 1, 1))) == []
