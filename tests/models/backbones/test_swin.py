"""Swin backbone: golden parity with the official dense code, conversion, contract."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mmseg
import pytest
import torch

from effvision.models.backbones.swin import DERIVED_KEYS, SWIN_ARCHS, Swin, checkpoint_filter_fn
from effvision.utils import CheckpointError
from tests.conftest import golden_dir, load_golden
from tests.models.backbones.contract import check_backbone_contract

GOLDEN_CASES = ['small_divisible', 'small_odd', 'small_window12']


def swin_from_official_kwargs(kwargs: dict) -> Swin:
    """Our Swin configured like the official constructor call ``kwargs``."""
    return Swin(
        arch=None,
        embed_dim=kwargs['embed_dim'],
        depths=kwargs['depths'],
        num_heads=kwargs['num_heads'],
        window_size=kwargs['window_size'],
        patch_size=kwargs['patch_size'],
        in_channels=kwargs['in_chans'],
        mlp_ratio=kwargs['mlp_ratio'],
        qkv_bias=kwargs['qkv_bias'],
        drop_rate=kwargs['drop_rate'],
        attn_drop_rate=kwargs['attn_drop_rate'],
        drop_path_rate=kwargs['drop_path_rate'],
        ape=kwargs['ape'],
        pretrain_img_size=kwargs['pretrain_img_size'],
        patch_norm=kwargs['patch_norm'],
        out_indices=kwargs['out_indices'],
        frozen_stages=kwargs['frozen_stages'],
    )


def tiny_swin(**overrides) -> Swin:
    cfg = dict(arch=None, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
    cfg.update(overrides)
    return Swin(**cfg)


# -- golden parity ------------------------------------------------------------------------------
@pytest.mark.parametrize('case', GOLDEN_CASES)
def test_matches_official_dense_swin(case, ops_path):
    golden = load_golden('swin', case)
    model = swin_from_official_kwargs(golden['kwargs']).double().eval()
    state = checkpoint_filter_fn(golden['state_dict'], model)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        outputs = model(golden['input'])
    assert len(outputs) == len(golden['outputs'])
    for ours, ref in zip(outputs, golden['outputs'], strict=True):
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() < 1e-8


@pytest.mark.parametrize('case', ['small_divisible', 'small_odd'])
def test_matches_official_in_float32(case, ops_path):
    golden = load_golden('swin', case)
    model = swin_from_official_kwargs(golden['kwargs']).eval()
    model.load_state_dict(checkpoint_filter_fn(golden['state_dict'], model))
    with torch.no_grad():
        outputs = model(golden['input'].float())
    for ours, ref in zip(outputs, golden['outputs'], strict=True):
        assert (ours.double() - ref).abs().max().item() < 5e-5


def _mmseg_swin_converter():
    """mmseg 1.2.2's own official->mmseg converter, shipped in its package."""
    path = Path(mmseg.__file__).parent / '.mim/tools/model_converters/swin2mmseg.py'
    spec = importlib.util.spec_from_file_location('swin2mmseg', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.convert_swin


def test_loads_mmseg_format_checkpoints():
    """official -> mmseg (mmseg's converter, permuting patch merging) -> ours gives the same
    numbers, so checkpoints converted for mmseg load too."""
    golden = load_golden('swin', 'small_odd')
    mmseg_state = _mmseg_swin_converter()(golden['state_dict'])
    model = swin_from_official_kwargs(golden['kwargs']).double().eval()
    model.load_state_dict(checkpoint_filter_fn(mmseg_state, model), strict=True)
    with torch.no_grad():
        outputs = model(golden['input'])
    for ours, ref in zip(outputs, golden['outputs'], strict=True):
        assert (ours - ref).abs().max().item() < 1e-8


@pytest.mark.parametrize('variant', ['tiny', 'small', 'base'])
def test_every_published_key_maps(variant):
    shapes = json.loads((golden_dir('swin') / f'keys_{variant}.json').read_text())
    with torch.device('meta'):
        model = Swin(arch=variant)
    fake = {k: torch.empty(s, device='meta') for k, s in shapes.items()}
    converted = checkpoint_filter_fn(fake, model)
    own = model.state_dict()
    dropped = {k for k in shapes if k.endswith(DERIVED_KEYS)}
    assert set(converted) == set(own), 'converted keys differ from the model keys'
    assert len(converted) == len(shapes) - len(dropped)
    for key, value in converted.items():
        assert value.shape == own[key].shape, key


def test_classification_checkpoint_drops_head_and_final_norm():
    model = tiny_swin()
    official = {('layers.' + k[len('stages.') :] if k.startswith('stages.') else k): v
                for k, v in model.state_dict().items() if not k.startswith('norm')}  # fmt: skip
    official['norm.weight'] = torch.ones(64)
    official['norm.bias'] = torch.zeros(64)
    official['head.weight'] = torch.zeros(1000, 64)
    official['layers.1.blocks.1.attn_mask'] = torch.zeros(4, 49, 49)
    converted = checkpoint_filter_fn(official, model)
    assert not any(k.startswith(('head.', 'norm.')) or 'attn_mask' in k for k in converted)
    missing = set(model.state_dict()) - set(converted)
    assert missing == {f'norm{i}.{p}' for i in range(4) for p in ('weight', 'bias')}


def test_bias_table_is_resized_for_another_window():
    src = tiny_swin(window_size=7)
    dst = tiny_swin(window_size=12)
    converted = checkpoint_filter_fn(src.state_dict(), dst)
    table = converted['stages.0.blocks.0.attn.relative_position_bias_table']
    assert table.shape == (23 * 23, 1)
    dst.load_state_dict(converted, strict=True)


# -- contract ------------------------------------------------------------------------------------
@pytest.mark.parametrize('size', [(64, 64), (70, 99), (13, 9), (4, 4)])
def test_any_input_size(size):
    model = tiny_swin(window_size=7).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        outs = model(x)
    h, w = -(-size[0] // 4), -(-size[1] // 4)
    for i, out in enumerate(outs):
        assert out.shape == (1, 8 * 2**i, h, w)
        assert torch.isfinite(out).all()
        h, w = -(-h // 2), -(-w // 2)


def test_out_indices_and_feature_info():
    model = tiny_swin(out_indices=(1, 3))
    assert hasattr(model, 'norm1') and not hasattr(model, 'norm0')


def test_backbone_contract():
    check_backbone_contract(lambda **kw: tiny_swin(window_size=4, **kw))


@pytest.mark.parametrize('arch', sorted(SWIN_ARCHS))
def test_published_variants_build(arch):
    with torch.device('meta'):
        model = Swin(arch=arch)
    assert model.num_features[-1] == SWIN_ARCHS[arch]['embed_dim'] * 8


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match='unknown Swin arch'):
        Swin(arch='huge')
    with pytest.raises(ValueError, match='needs embed_dim'):
        Swin(arch=None, depths=(2,), num_heads=(1,))


def test_registry_builds_swin():
    from effvision.registry import MODELS

    model = MODELS.build(
        dict(
            type='Swin', arch=None, embed_dim=8, depths=(2, 2), num_heads=(1, 2), out_indices=(0, 1)
        )
    )
    assert isinstance(model, Swin)


# -- pretrained loading --------------------------------------------------------------------------
def _official_state(model: Swin) -> dict:
    return {
        ('layers.' + k[len('stages.') :] if k.startswith('stages.') else k): v
        for k, v in model.state_dict().items()
    }


def test_init_cfg_loads_official_segmentor_checkpoint(tmp_path):
    src = tiny_swin()
    file = tmp_path / 'upernet_swin.pth'
    state = {'backbone.' + k: v for k, v in _official_state(src).items()}
    state['decode_head.conv_seg.weight'] = torch.zeros(3, 3, 1, 1)
    torch.save({'state_dict': state, 'meta': {}}, file)
    model = tiny_swin(init_cfg=dict(type='Pretrained', checkpoint=str(file), prefix='backbone'))
    model.init_weights()
    for key, value in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_init_cfg_rejects_a_checkpoint_of_another_arch(tmp_path):
    file = tmp_path / 'other.pth'
    torch.save({'model': _official_state(tiny_swin(embed_dim=16))}, file)
    model = tiny_swin(init_cfg=dict(type='Pretrained', checkpoint=str(file)))
    with pytest.raises(CheckpointError, match=r'shape mismatch.*Pick the arch'):
        model.init_weights()


def test_init_cfg_rejects_a_checkpoint_of_another_model(tmp_path):
    file = tmp_path / 'resnet.pth'
    torch.save({'state_dict': {'conv1.weight': torch.zeros(1)}}, file)
    model = tiny_swin(init_cfg=dict(type='Pretrained', checkpoint=str(file)))
    with pytest.raises(CheckpointError, match='not a Swin checkpoint'):
        model.init_weights()


# -- export ----------------------------------------------------------------------------------------
def test_export_keeps_height_and_width_symbolic():
    """torch.export with dynamic H, W must not specialise to the example size: the exported
    program runs at other sizes (divisible or not) and matches eager."""
    import torch.fx.experimental._config as fx_config

    model = tiny_swin(window_size=7).eval()
    h, w = torch.export.Dim('h', min=16, max=2048), torch.export.Dim('w', min=16, max=2048)
    # size-oblivious tracing: a window or token count of 1 in the example must not be baked in
    with fx_config.patch(backed_size_oblivious=True):
        exported = torch.export.export(
            model, (torch.randn(1, 3, 64, 96),), dynamic_shapes=({2: h, 3: w},)
        )
    for size in [(64, 96), (70, 99), (33, 130), (250, 31)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = model(x)
            actual = exported.module()(x)
        for a, e in zip(actual, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_converter_cli_round_trip(tmp_path):
    import subprocess
    import sys

    golden = load_golden('swin', 'small_divisible')
    src = tmp_path / 'official.pth'
    torch.save({'model': golden['state_dict']}, src)
    dst = tmp_path / 'out' / 'swin.pth'
    proc = subprocess.run(
        [sys.executable, 'tools/model_converters/swin_to_effvision.py', str(src), str(dst)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[3],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert 'dropped' in proc.stdout
    model = swin_from_official_kwargs(golden['kwargs']).double().eval()
    model.init_cfg = dict(type='Pretrained', checkpoint=str(dst))
    model.init_weights()
    with torch.no_grad():
        outputs = model(golden['input'])
    assert (outputs[-1] - golden['outputs'][-1]).abs().max().item() < 1e-8
