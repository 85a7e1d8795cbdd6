"""DAFormerHead: golden parity with the official head, the ablation variants, and errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from effvision.models.decode_heads.daformer_head import (
    DAFormerHead,
    SegFormerAdapter,
    convert_official,
)
from effvision.registry import MODELS
from tests.conftest import golden_dir, load_golden

CASES = ['small_divisible', 'small_odd']


def _official_head(kwargs: dict) -> DAFormerHead:
    """Our head built from the official constructor arguments, as an official config has them."""
    kwargs = copy.deepcopy(kwargs)
    kwargs['loss_decode'] = dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)
    return DAFormerHead(**kwargs)


@pytest.mark.parametrize('case', CASES)
def test_matches_official_float64(case):
    golden = load_golden('daformer', case)
    head = _official_head(golden['kwargs']).double().eval()
    head.load_state_dict(convert_official(golden['state_dict']), strict=True)
    with torch.no_grad():
        out = head(golden['input'])
    expected = golden['outputs'][0]
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() < 1e-10


def test_matches_official_float32():
    golden = load_golden('daformer', 'small_odd')
    head = _official_head(golden['kwargs']).eval()
    head.load_state_dict(convert_official(golden['state_dict']), strict=True)
    with torch.no_grad():
        out = head([x.float() for x in golden['input']])
    torch.testing.assert_close(out.double(), golden['outputs'][0], atol=1e-5, rtol=0)


def test_published_keys_map():
    """Every key of the published head (MiT-B5 channels, 256 embed) exists with its shape."""
    keys = json.loads((golden_dir('daformer') / 'keys_mitb5.json').read_text())
    head = DAFormerHead(
        in_channels=[64, 128, 320, 512],
        in_index=[0, 1, 2, 3],
        channels=256,
        num_classes=19,
        norm_cfg=dict(type='BN', requires_grad=True),
        embed_dims=256,
    )
    ours = {k: list(v.shape) for k, v in head.state_dict().items()}
    assert ours == keys


def test_full_uda_checkpoint_keeps_the_student():
    golden = load_golden('daformer', 'small_divisible')
    head_keys = golden['state_dict']
    full = {}
    for prefix in ('model', 'ema_model', 'imnet_model'):
        full.update(
            {f'{prefix}.decode_head.{k}': v + (prefix != 'model') for k, v in head_keys.items()}
        )
    converted = convert_official({'state_dict': full})
    assert set(converted) == {f'decode_head.{k}' for k in head_keys}
    for key, value in head_keys.items():
        assert torch.equal(converted[f'decode_head.{key}'], value)


def _small(**overrides) -> DAFormerHead:
    kwargs = dict(
        in_channels=[8, 16, 24, 32],
        in_index=[0, 1, 2, 3],
        channels=16,
        num_classes=5,
        norm_cfg=dict(type='BN', requires_grad=True),
        embed_dims=8,
    )
    kwargs.update(overrides)
    return MODELS.build(dict(type='DAFormerHead', **kwargs))


def _feats(height=32, width=40):
    sizes = [(-(-height // s), -(-width // s)) for s in (4, 8, 16, 32)]
    return [torch.randn(2, c, h, w) for c, (h, w) in zip([8, 16, 24, 32], sizes)]


@pytest.mark.parametrize(
    'fusion',
    [
        dict(type='aspp', sep=True, dilations=(1, 6, 12, 18), pool=False),
        dict(type='aspp', sep=False, dilations=(1, 6, 12, 18), pool=False),
        dict(type='aspp', sep=True, dilations=(1, 2), pool=True),
        dict(type='conv', kernel_size=1, norm_cfg=dict(type='BN'), act_cfg=dict(type='ReLU')),
    ],
)
def test_fusion_variants_shapes_and_gradients(fusion):
    head = _small(fusion_cfg=fusion)
    out = head(_feats())
    assert out.shape == (2, 5, 8, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)


def test_bottleneck_variant_with_adapter():
    """Context on the deepest level only: the adapter brings it to stride 4 first."""
    neck = SegFormerAdapter(out_levels=(3,), scales=(8,))
    head = _small(
        embed_neck_cfg=dict(
            type='rawconv_and_aspp', kernel_size=1, sep=True, dilations=(1, 6), pool=False
        ),
        fusion_cfg=dict(type='conv', kernel_size=1, norm_cfg=dict(type='BN')),
    )
    feats = neck(_feats(32, 64))
    assert feats[3].shape[2:] == (8, 16)  # the 1x2 stride-32 map, 8 times larger
    assert isinstance(head.embed_layers['3'][1].aspp_modules, torch.nn.ModuleList)
    assert head(feats).shape == (2, 5, 8, 16)


def test_decoder_params_nesting_and_caller_dicts_untouched():
    fusion = dict(type='aspp', sep=True, dilations=[1, 6], pool=False)
    params = dict(embed_dims=8, fusion_cfg=fusion)
    before = copy.deepcopy(params)
    head = _small(decoder_params=params, embed_dims=99)
    assert params == before
    assert head.embed_layers['0'].proj.out_features == 8


def test_subset_of_levels():
    head = _small(in_channels=[16, 32], in_index=[1, 3])
    assert set(head.embed_layers) == {'1', '3'}
    assert head(_feats()).shape == (2, 5, 4, 5)


@pytest.mark.parametrize(
    'overrides, message',
    [
        (dict(fusion_cfg=dict(type='isa')), 'not provided'),
        (dict(fusion_cfg=dict(type='conv')), 'kernel_size'),
        (dict(embed_dims=[8, 8]), 'embed_dims'),
        (dict(decoder_params=dict(fusion=dict())), 'unknown decoder_params'),
        (dict(align_corners=True), 'align_corners=False'),
    ],
)
def test_errors_name_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        _small(**overrides)
