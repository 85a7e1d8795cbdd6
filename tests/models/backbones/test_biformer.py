"""BiFormer backbone: golden parity with the official dense code, conversion, contract."""

from __future__ import annotations

import importlib.util
import json
import math

import mmdet.registry
import mmseg.registry
import pytest
import torch
import torch.nn.functional as F
from mmengine.registry import DefaultScope

from effvision.models.backbones.biformer import (
    BIFORMER_ARCHS,
    BiFormer,
    BiLevelRoutingAttention,
    convert_checkpoint_state,
    detect_format,
    region_layout,
    routing_attention,
)
from effvision.ops import _ext
from effvision.utils import CheckpointError
from tests.conftest import REPO_ROOT, golden_dir, load_golden
from tests.models.backbones.contract import check_backbone_contract

GOLDEN_CASES = ['small_divisible', 'small_odd']
# a tiny configuration: 2x2 regions, every stage routed but the last, heads of 8 channels
TINY = dict(
    arch=None,
    depths=(1, 1, 1, 1),
    embed_dims=(16, 16, 32, 32),
    head_dim=8,
    global_heads=4,
    n_win=2,
    topks=(1, 2, 4, -2),
)
BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')


def biformer_from_official_kwargs(kwargs: dict) -> BiFormer:
    """Our BiFormer configured like the official ``BiFormer_mm(**kwargs)``."""
    assert kwargs['kv_downsample_mode'] == 'identity' and kwargs['auto_pad']
    assert kwargs['layer_scale_init_value'] <= 0 and kwargs['pre_norm'] and kwargs['pe'] is None
    assert not (kwargs['param_routing'] or kwargs['diff_routing'] or kwargs['soft_routing'])
    return BiFormer(
        arch=None,
        depths=kwargs['depth'],
        embed_dims=kwargs['embed_dim'],
        qk_dims=kwargs['qk_dims'],
        head_dim=kwargs['head_dim'],
        mlp_ratios=kwargs['mlp_ratios'],
        n_win=kwargs['n_win'],
        topks=kwargs['topks'],
        side_dwconv=kwargs['side_dwconv'],
        before_attn_dwconv=kwargs['before_attn_dwconv'],
        drop_path_rate=kwargs['drop_path_rate'],
    )


def tiny_biformer(**overrides) -> BiFormer:
    return BiFormer(**{**TINY, **overrides})


def official_state(model: BiFormer) -> dict[str, torch.Tensor]:
    """Our weights under the official dense (``BiFormer_mm``) names."""
    out = {}
    stem = {'conv1': 0, 'bn1': 1, 'conv2': 3, 'bn2': 4}
    block = {'attn.proj.': 'attn.wo.', 'mlp.fc1.': 'mlp.0.', 'mlp.fc2.': 'mlp.3.'}
    for key, value in model.state_dict().items():
        parts = key.split('.')
        if parts[0] == 'stem':
            new = f'downsample_layers.0.{stem[parts[1]]}.' + '.'.join(parts[2:])
        elif parts[0].startswith('norm'):
            new = f'extra_norms.{parts[0][4:]}.' + '.'.join(parts[1:])
        elif parts[2] == 'downsample':
            new = f'downsample_layers.{parts[1]}.{0 if parts[3] == "conv" else 1}.'
            new += '.'.join(parts[4:])
        else:
            rest = '.'.join(parts[4:])
            routed = model.stages[int(parts[1])].routed
            for ours, theirs in block.items():
                if rest.startswith(ours) and (ours != 'attn.proj.' or routed):
                    rest = theirs + rest[len(ours) :]
            if routed and rest.startswith('attn.qkv.'):
                rest = 'attn.qkv.qkv.' + rest[len('attn.qkv.') :]
            new = f'stages.{parts[1]}.{parts[3]}.{rest}'
        out[new] = value
    return out


# -- golden parity ------------------------------------------------------------------------------
@pytest.fixture(scope='module', params=GOLDEN_CASES)
def golden(request):
    return load_golden('biformer', request.param)


@pytest.fixture(params=['fused', 'reference'])
def ops_path(request, monkeypatch):
    """The routed attention through the compiled kernel, or through the PyTorch reference."""
    if request.param == 'reference':
        monkeypatch.setenv('EFFVISION_OPS', 'reference')
    else:
        monkeypatch.delenv('EFFVISION_OPS', raising=False)
        if _ext.load('routing_attention') is None:
            pytest.skip('effvision.ops._routing_attention is not built (make install)')
    return request.param


def test_matches_official_dense_biformer(golden, ops_path):
    """Outputs to float64 round-off, and every routed layer picks the official regions in the
    official (descending-logit) order where the fixture stores them."""
    model = biformer_from_official_kwargs(golden['kwargs']).double().eval()
    model.load_state_dict(convert_checkpoint_state(golden['state_dict']), strict=True)
    inputs = []
    hooks = [
        module.register_forward_pre_hook(lambda module, args: inputs.append((module, args)))
        for module in model.modules()
        if isinstance(module, BiLevelRoutingAttention)
    ]
    with torch.no_grad():
        outputs = model(golden['input'])
        for hook in hooks:
            hook.remove()
        indices = [module(*args, return_index=True)[1] for module, args in inputs]
    assert len(outputs) == len(golden['outputs']) == 4
    for ours, ref in zip(outputs, golden['outputs'], strict=True):
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() < 1e-8  # float64 round-off is ~1e-14
    assert len(indices) == len(golden['routing_layers'])
    if 'routing_indices_per_layer' in golden:  # stored where no two regions nearly tie
        for ours, ref in zip(indices, golden['routing_indices_per_layer'], strict=True):
            assert torch.equal(ours, ref)
        assert torch.equal(indices[0], golden['routing_indices'])


def test_matches_official_in_float32(golden, ops_path):
    model = biformer_from_official_kwargs(golden['kwargs']).eval()
    model.load_state_dict(convert_checkpoint_state(golden['state_dict']), strict=True)
    with torch.no_grad():
        outputs = model(golden['input'].float())
    for ours, ref in zip(outputs, golden['outputs'], strict=True):
        assert (ours.double() - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_batch_items_are_independent():
    """Routing and region gathers index per image: a batch equals its images run alone."""
    model = tiny_biformer().eval()
    x = torch.randn(2, 3, 37, 50)
    with torch.no_grad():
        batched = model(x)
        for i in range(2):
            for out, ref in zip(model(x[i : i + 1]), batched, strict=True):
                torch.testing.assert_close(out, ref[i : i + 1], rtol=1e-5, atol=1e-5)


def test_routing_attention_matches_dense_masked_attention():
    """The gather formulation equals full attention with non-routed regions masked out."""
    b, r, n, heads, d = 2, 6, 5, 2, 4
    q, k, v = (torch.randn(b, r, n, heads * d, dtype=torch.float64) for _ in range(3))
    scale = (heads * d) ** -0.5
    out, index = routing_attention(q, k, v, topk=3, num_heads=heads, scale=scale)
    logits = (q.mean(2) * scale) @ k.mean(2).transpose(1, 2)
    assert torch.equal(index, logits.topk(3, dim=-1).indices)
    allowed = torch.zeros(b, r, r, dtype=torch.bool)
    allowed.scatter_(2, index, True)
    mask = allowed.repeat_interleave(n, 1).repeat_interleave(n, 2)  # (B, R*N, R*N)

    def heads_first(t):
        return t.reshape(b, r * n, heads, d).transpose(1, 2)

    dense = F.scaled_dot_product_attention(
        heads_first(q), heads_first(k), heads_first(v), attn_mask=mask[:, None], scale=scale
    )
    torch.testing.assert_close(out, dense.transpose(1, 2).reshape(b, r, n, heads * d))


@pytest.mark.parametrize('size', [(13, 13), (16, 24), (3, 17)])
def test_region_layout_pads_to_n_win_and_crops_back(size):
    """The canvas is padded to a multiple of n_win; the crop picks the real tokens back."""
    h, w = size
    n_win = 8
    x = torch.randn(2, h, w, 3)
    layout = region_layout(2, h, w, n_win)
    hp, wp = layout.padded
    assert (hp, wp) == (-(-h // n_win) * n_win, -(-w // n_win) * n_win)
    padded = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
    torch.testing.assert_close(padded.reshape(-1, 3)[layout.crop].view(2, h, w, 3), x)


# -- checkpoint formats ----------------------------------------------------------------------------
def _keys(name: str) -> dict[str, list[int]]:
    return json.loads((golden_dir('biformer') / f'keys_{name}.json').read_text())


@pytest.mark.parametrize('variant', sorted(BIFORMER_ARCHS))
@pytest.mark.parametrize('kind', ['dense', 'classification'])
def test_every_published_key_maps(variant, kind):
    shapes = _keys(variant if kind == 'dense' else f'cls_{variant}')
    with torch.device('meta'):
        model = BiFormer(arch=variant)
    fake = {k: torch.empty(s, device='meta') for k, s in shapes.items()}
    assert detect_format(fake) == f'official_{kind}'
    converted = convert_checkpoint_state(fake)
    own = model.state_dict()
    norms = {k for k in own if k.startswith('norm')}
    if kind == 'dense':
        assert set(converted) == set(own), 'converted keys differ from the model keys'
        assert len(converted) == len(shapes)
    else:  # the classifier norm and head are dropped; the output norms are not in the file
        assert set(converted) == set(own) - norms
        dropped = {k for k in shapes if k.startswith(('norm.', 'head.'))}
        assert dropped and len(converted) == len(shapes) - len(dropped)
    for key, value in converted.items():
        assert value.shape == own[key].shape, key


@pytest.mark.parametrize('arch', sorted(BIFORMER_ARCHS))
def test_published_variants_build_with_the_published_size(arch):
    with torch.device('meta'):
        model = BiFormer(arch=arch)
    ours = sum(p.numel() for p in model.parameters())
    dense = _keys(arch)
    assert ours == sum(math.prod(s) for k, s in dense.items() if not k.endswith(BUFFERS))
    # the README's figure (13.1 / 25.5 / 56.8 M) is the classifier with its BN and head
    cls = _keys(f'cls_{arch}')
    classifier = sum(math.prod(s) for k, s in cls.items() if not k.endswith(BUFFERS))
    published = {'tiny': 13.1e6, 'small': 25.5e6, 'base': 56.8e6}[arch]
    assert abs(classifier - published) < 0.05e6
    assert model.num_features == list(BIFORMER_ARCHS[arch]['embed_dims'])
    assert model.num_heads == tuple(d // 32 for d in model.embed_dims[:3]) + (8,)


def test_our_format_and_segmentor_checkpoints_convert():
    model = tiny_biformer()
    ours = model.state_dict()
    assert detect_format(ours) == 'effvision'
    assert convert_checkpoint_state(ours).keys() == ours.keys()
    official = official_state(model)
    assert detect_format(official) == 'official_dense'
    converted = convert_checkpoint_state(official)
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[k], v) for k, v in ours.items())
    segmentor = {'backbone.' + k: v for k, v in official.items()}
    segmentor['decode_head.conv_seg.weight'] = torch.zeros(3, 8, 1, 1)
    assert detect_format(segmentor) == 'official_dense:backbone'
    assert convert_checkpoint_state(segmentor).keys() == ours.keys()


# -- contract ------------------------------------------------------------------------------------
def test_backbone_contract():
    check_backbone_contract(lambda **kw: tiny_biformer(**kw))


@pytest.mark.parametrize('size', [(64, 64), (70, 99), (13, 9), (4, 4)])
def test_any_input_size(size):
    model = tiny_biformer().eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    h, w = size
    for i, out in enumerate(outs):
        h, w = -(-h // (4 if i == 0 else 2)), -(-w // (4 if i == 0 else 2))
        assert out.shape == (1, TINY['embed_dims'][i], h, w)
        assert torch.isfinite(out).all()


def test_frozen_stages_include_the_downsampling_layers():
    model = tiny_biformer(frozen_stages=2)
    model.train()
    assert not any(p.requires_grad for p in model.stages[1].downsample.parameters())
    assert all(p.requires_grad for p in model.stages[2].downsample.parameters())
    assert not model.stem.bn1.training and model.stages[2].downsample.bn.training


def test_sync_bn_norm_cfg():
    model = tiny_biformer(norm_cfg=dict(type='SyncBN', requires_grad=False))
    assert isinstance(model.stem.bn1, torch.nn.SyncBatchNorm)
    assert not model.stages[1].downsample.bn.weight.requires_grad
    assert isinstance(tiny_biformer().stem.bn1, torch.nn.BatchNorm2d)


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match=r"unknown BiFormer arch 'huge'.*choose one of"):
        BiFormer(arch='huge')
    with pytest.raises(ValueError, match='needs depths'):
        BiFormer(arch=None, embed_dims=(8, 8, 8, 8))
    with pytest.raises(ValueError, match='exceeds the 4 regions of n_win=2; raise n_win'):
        tiny_biformer(topks=(1, 2, 16, -2))
    with pytest.raises(ValueError, match='use k > 0.*or -2'):
        tiny_biformer(topks=(1, 2, 4, -1))
    with pytest.raises(ValueError, match='global_heads'):
        tiny_biformer(global_heads=5)
    with pytest.raises(ValueError, match="use 'BN' or 'SyncBN'"):
        tiny_biformer(norm_cfg=dict(type='GN'))


def test_registry_builds_biformer_from_mmseg_and_mmdet_scopes():
    cfg = dict(type='effvision.BiFormer', **TINY)
    with DefaultScope.overwrite_default_scope('mmseg'):
        assert isinstance(mmseg.registry.MODELS.build(cfg), BiFormer)
    with DefaultScope.overwrite_default_scope('mmdet'):
        assert isinstance(mmdet.registry.MODELS.build(cfg), BiFormer)


# -- pretrained loading --------------------------------------------------------------------------
def test_init_cfg_loads_official_classification_checkpoint(tmp_path):
    src = tiny_biformer()
    state = {k: v for k, v in official_state(src).items() if not k.startswith('extra_norms')}
    state['norm.weight'] = torch.ones(32)  # the classifier's BatchNorm and head
    state['norm.running_mean'] = torch.zeros(32)
    state['head.weight'] = torch.zeros(1000, 32)
    file = tmp_path / 'biformer_tiny_in1k.pth'
    torch.save({'model': state}, file)
    model = tiny_biformer(init_cfg=dict(type='Pretrained', checkpoint=str(file)))
    model.init_weights()
    for key, value in src.state_dict().items():
        if not key.startswith('norm'):
            torch.testing.assert_close(model.state_dict()[key], value)


def test_init_cfg_loads_official_segmentor_checkpoint(tmp_path):
    src = tiny_biformer()
    state = {'backbone.' + k: v for k, v in official_state(src).items()}
    state['decode_head.conv_seg.weight'] = torch.zeros(3, 3, 1, 1)
    file = tmp_path / 'upernet_biformer.pth'
    torch.save({'state_dict': state, 'meta': {}}, file)
    model = tiny_biformer(init_cfg=dict(type='Pretrained', checkpoint=str(file)))
    model.init_weights()
    for key, value in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_init_cfg_rejects_a_checkpoint_of_another_arch(tmp_path):
    file = tmp_path / 'other.pth'
    torch.save({'model': official_state(tiny_biformer(embed_dims=(16, 16, 32, 64)))}, file)
    model = tiny_biformer(init_cfg=dict(type='Pretrained', checkpoint=str(file)))
    with pytest.raises(CheckpointError, match=r'shape mismatch.*Pick the arch'):
        model.init_weights()


def test_init_cfg_rejects_a_checkpoint_of_another_model(tmp_path):
    file = tmp_path / 'resnet.pth'
    torch.save({'state_dict': {'conv1.weight': torch.zeros(1)}}, file)
    model = tiny_biformer(init_cfg=dict(type='Pretrained', checkpoint=str(file)))
    with pytest.raises(CheckpointError, match='not a BiFormer checkpoint.*biformer_\\*_in1k'):
        model.init_weights()


def test_random_init_is_the_official_scheme():
    model = tiny_biformer()
    model.init_weights()
    qkv = model.stages[0].blocks[0].attn.qkv
    assert qkv.weight.std().item() < 0.03 and torch.count_nonzero(qkv.bias) == 0
    assert torch.equal(model.norm0.weight, torch.ones(16))


def _converter_main():
    """The CLI's ``main``, loaded in-process (a subprocess would pay the mmseg import again)."""
    path = REPO_ROOT / 'tools/model_converters/biformer_to_effvision.py'
    spec = importlib.util.spec_from_file_location('biformer_to_effvision', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_converter_cli_round_trip(tmp_path, capsys):
    golden = load_golden('biformer', 'small_odd')
    src = tmp_path / 'official.pth'
    torch.save({'model': golden['state_dict']}, src)
    dst = tmp_path / 'out' / 'biformer.pth'
    main = _converter_main()
    assert main([str(src), str(dst)]) == 0
    assert 'official_dense: converted' in capsys.readouterr().out
    assert not list(dst.parent.glob('*.tmp'))
    model = biformer_from_official_kwargs(golden['kwargs']).double()
    model.init_cfg = dict(type='Pretrained', checkpoint=str(dst))
    model.init_weights()  # our format loads unchanged
    expected = convert_checkpoint_state(golden['state_dict'])
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert main([str(tmp_path / 'missing.pth'), str(dst)]) == 1
    assert 'checkpoint not found' in capsys.readouterr().err


# -- export ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_export_keeps_height_and_width_symbolic():
    """torch.export with dynamic H, W runs at other sizes (divisible or not) and matches eager.

    H, W >= 33: the exporter's channels-last check of the convolutions needs the stride-32 map
    to be at least 2 x 2.
    """
    import torch.fx.experimental._config as fx_config

    model = tiny_biformer().eval()
    h, w = torch.export.Dim('h', min=33, max=2048), torch.export.Dim('w', min=33, max=2048)
    with fx_config.patch(backed_size_oblivious=True):
        exported = torch.export.export(
            model, (torch.randn(1, 3, 64, 96),), dynamic_shapes=({2: h, 3: w},)
        )
    for size in [(64, 96), (70, 99), (33, 130), (250, 37)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = model(x)
            actual = exported.module()(x)
        for a, e in zip(actual, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_onnx_export_runs_other_sizes_in_onnxruntime(tmp_path):
    import numpy as np
    import onnxruntime as ort
    import torch.fx.experimental._config as fx_config

    model = tiny_biformer().eval()
    h, w = torch.export.Dim('h', min=33, max=2048), torch.export.Dim('w', min=33, max=2048)
    with fx_config.patch(backed_size_oblivious=True):
        program = torch.onnx.export(
            model, (torch.randn(1, 3, 64, 96),), dynamo=True, dynamic_shapes=({2: h, 3: w},)
        )
    program.save(str(tmp_path / 'biformer.onnx'))
    session = ort.InferenceSession(
        str(tmp_path / 'biformer.onnx'), providers=['CPUExecutionProvider']
    )
    for size in [(70, 99), (200, 264)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = model(x)
        actual = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        for a, e in zip(actual, expected, strict=True):
            np.testing.assert_allclose(a, e.numpy(), rtol=1e-4, atol=1e-4)
