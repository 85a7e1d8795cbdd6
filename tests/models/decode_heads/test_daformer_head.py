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


def test_uda_checkpoint_layout_is_kept_and_the_mit_backbone_converted():
    golden = load_golden('daformer', 'small_divisible')
    head_keys = golden['state_dict']
    nvlabs_mit = {
        'patch_embed1.proj.weight': torch.zeros(32, 3, 7, 7),
        'block1.0.attn.q.weight': torch.ones(32, 32),
        'block1.0.attn.kv.weight': torch.full((64, 32), 2.0),
        'block1.0.mlp.fc1.weight': torch.zeros(128, 32),
        'norm1.weight': torch.zeros(32),
    }
    full = {}
    for prefix in ('model', 'ema_model', 'imnet_model'):
        full.update({f'{prefix}.decode_head.{k}': v for k, v in head_keys.items()})
        full.update({f'{prefix}.backbone.{k}': v for k, v in nvlabs_mit.items()})
    converted = convert_official({'state_dict': full})
    for prefix in ('model', 'ema_model', 'imnet_model'):
        for key, value in head_keys.items():
            assert torch.equal(converted[f'{prefix}.decode_head.{key}'], value)
        qkv = converted[f'{prefix}.backbone.layers.0.1.0.attn.attn.in_proj_weight']
        assert qkv.shape == (96, 32) and qkv[:32].eq(1).all() and qkv[32:].eq(2).all()
        assert converted[f'{prefix}.backbone.layers.0.1.0.ffn.layers.0.weight'].shape == (
            128, 32, 1, 1,
        )  # fmt: skip
        assert f'{prefix}.backbone.layers.0.0.projection.weight' in converted
        assert f'{prefix}.backbone.layers.0.2.weight' in converted
    assert len(converted) == 3 * (len(head_keys) + len(nvlabs_mit) - 1)  # q and kv merge


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


def _nvlabs_mit_b0_state() -> dict[str, torch.Tensor]:
    """A MiT-B0 state dict with NVlabs' key names (what DAFormer trains and saves)."""
    dims, depths, srs = [32, 64, 160, 256], [2, 2, 2, 2], [8, 4, 2, 1]
    kernels, state, gen = [7, 3, 3, 3], {}, torch.Generator().manual_seed(0)

    def add(name, *shape):
        state[name] = torch.randn(*shape, generator=gen)

    in_dim = 3
    for stage, (dim, depth, sr, k) in enumerate(zip(dims, depths, srs, kernels), start=1):
        add(f'patch_embed{stage}.proj.weight', dim, in_dim, k, k)
        add(f'patch_embed{stage}.proj.bias', dim)
        add(f'patch_embed{stage}.norm.weight', dim)
        add(f'patch_embed{stage}.norm.bias', dim)
        for block in range(depth):
            pre = f'block{stage}.{block}.'
            for norm in ('norm1', 'norm2'):
                add(pre + f'{norm}.weight', dim)
                add(pre + f'{norm}.bias', dim)
            add(pre + 'attn.q.weight', dim, dim)
            add(pre + 'attn.q.bias', dim)
            add(pre + 'attn.kv.weight', 2 * dim, dim)
            add(pre + 'attn.kv.bias', 2 * dim)
            add(pre + 'attn.proj.weight', dim, dim)
            add(pre + 'attn.proj.bias', dim)
            if sr > 1:
                add(pre + 'attn.sr.weight', dim, dim, sr, sr)
                add(pre + 'attn.sr.bias', dim)
                add(pre + 'attn.norm.weight', dim)
                add(pre + 'attn.norm.bias', dim)
            add(pre + 'mlp.fc1.weight', 4 * dim, dim)
            add(pre + 'mlp.fc1.bias', 4 * dim)
            add(pre + 'mlp.dwconv.dwconv.weight', 4 * dim, 1, 3, 3)
            add(pre + 'mlp.dwconv.dwconv.bias', 4 * dim)
            add(pre + 'mlp.fc2.weight', dim, 4 * dim)
            add(pre + 'mlp.fc2.bias', dim)
        add(f'norm{stage}.weight', dim)
        add(f'norm{stage}.bias', dim)
        in_dim = dim
    add('head.weight', 1000, 256)
    add('head.bias', 1000)
    return state


def test_mit_conversion_equals_mmsegs_converter_and_loads_strictly():
    """Our NVlabs -> mmseg MiT mapping equals mmseg's own mit2mmseg.py (shipped in the wheel)
    and fits mmseg's MixVisionTransformer-B0 key for key."""
    import importlib.util
    from pathlib import Path

    import mmseg
    from mmseg.models.backbones import MixVisionTransformer

    path = Path(mmseg.__file__).parent / '.mim/tools/model_converters/mit2mmseg.py'
    spec = importlib.util.spec_from_file_location('mit2mmseg', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    nvlabs = _nvlabs_mit_b0_state()
    theirs = module.convert_mit(dict(nvlabs))
    ours = convert_official({f'backbone.{k}': v for k, v in nvlabs.items()})
    ours = {k[len('backbone.') :]: v for k, v in ours.items()}
    ours = {k: v for k, v in ours.items() if not k.startswith('head.')}
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    mit = MixVisionTransformer(embed_dims=32, num_layers=[2, 2, 2, 2], num_heads=[1, 2, 5, 8])
    mit.load_state_dict(ours, strict=True)


def test_converter_cli_round_trip(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    golden = load_golden('daformer', 'small_odd')
    src, dst = tmp_path / 'daformer.pth', tmp_path / 'out' / 'converted.pth'
    state = {f'model.decode_head.{k}': v for k, v in golden['state_dict'].items()}
    state.update({f'model.backbone.{k}': v for k, v in _nvlabs_mit_b0_state().items()})
    torch.save({'state_dict': state, 'meta': {}}, src)
    proc = subprocess.run(
        [sys.executable, 'tools/model_converters/daformer_to_effvision.py', str(src), str(dst)],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    converted = torch.load(dst, weights_only=True)['state_dict']
    head = _official_head(golden['kwargs']).double().eval()
    prefix = 'model.decode_head.'
    head.load_state_dict(
        {k[len(prefix) :]: v for k, v in converted.items() if k.startswith(prefix)}
    )
    with torch.no_grad():
        out = head(golden['input'])
    assert (out - golden['outputs'][0]).abs().max().item() < 1e-10
    assert 'model.backbone.layers.3.2.weight' in converted
    assert not (tmp_path / 'out' / 'converted.pth.tmp').exists()
