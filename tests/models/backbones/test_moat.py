"""MOAT backbone: golden parity with deeplab2 (TensorFlow), conversion, windows, deploy, export."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import mmdet.registry
import mmseg.registry
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmengine.registry import DefaultScope
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from effvision.models.backbones.moat import (
    DERIVED_KEYS,
    MOAT,
    MOAT_ARCHS,
    Attention,
    avg_pool_same,
    convert_tf,
    detect_format,
)
from effvision.utils import CheckpointError
from tests.conftest import golden_dir, load_golden
from tests.models.backbones.contract import check_backbone_contract

REPO_ROOT = Path(__file__).resolve().parents[3]
GOLDEN_CASES = ['small_divisible', 'small_odd']
# deeplab2 model/pixel_encoder/moat_test.py: trainable parameters *with* the 1000-class head
# (final LayerNorm + 1x1 conv), with and without the relative position embedding
OFFICIAL_PARAMS = {
    'moat0': (27_846_892, 27_777_544),
    'moat1': (41_598_448, 41_467_864),
    'moat2': (73_422_408, 73_248_296),
    'moat3': (189_958_040, 189_536_280),
    'moat4': (483_214_184, 482_539_368),
    'tiny_moat0': (3_355_348, 3_332_232),
    'tiny_moat1': (5_122_895, 5_094_000),
    'tiny_moat2': (9_772_741, 9_732_288),
    'tiny_moat3': (19_534_390, 19_476_600),
}
TINY = dict(
    arch=None,
    stem_channels=(8, 8),
    depths=(1, 1, 2, 2),
    widths=(8, 16, 16, 32),
    head_dim=8,
    window_sizes=(None, None, 3, (2, 1)),
    position_embedding_sizes=(None, None, 4, 2),
    global_attention_at_end_of_moat_stage=True,
    drop_path_rate=0.0,
)


def moat_from_golden(golden: dict, **overrides) -> MOAT:
    """Our MOAT configured like the official ``get_model`` call of a golden case."""
    kwargs, config = golden['kwargs'], golden['kwargs']['override_config']
    windows = kwargs['window_size'] or [None] * 4
    settings = dict(
        arch='tiny_moat0',
        stem_channels=config['stem_size'],
        depths=config['num_blocks'],
        widths=config['hidden_size'],
        head_dim=config['head_size'],
        window_sizes=[tuple(w) if w is not None else None for w in windows],
        global_attention_at_end_of_moat_stage=kwargs['global_attention_at_end_of_moat_stage'],
        pool_size=kwargs['pool_size'],
    )
    return MOAT(**{**settings, **overrides})


def tiny_moat(**overrides) -> MOAT:
    return MOAT(**{**TINY, **overrides})


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that folding or skipping a norm changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                shape = module.weight.shape
                module.weight.copy_(1 + 0.2 * torch.randn(shape, generator=gen))
                module.bias.copy_(0.2 * torch.randn(shape, generator=gen))
                module.running_mean.copy_(0.2 * torch.randn(shape, generator=gen))
                module.running_var.copy_(torch.rand(shape, generator=gen) + 0.5)
    return model


def all_endpoints(model: MOAT, x: torch.Tensor) -> list[torch.Tensor]:
    """deeplab2's 10 endpoints: stem (stage1), the four stages, each also after exact GELU."""
    with torch.no_grad():
        stem_input = x.contiguous(memory_format=torch.channels_last) if model.channels_last else x
        features = [model.stem(stem_input), *model(x)]
    return [t for f in features for t in (f, F.gelu(f))]


# -- golden parity ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    'case, dtype',
    [(case, torch.float32) for case in GOLDEN_CASES] + [('small_divisible', torch.float64)],
)
def test_matches_official_deeplab2_moat(case, dtype, ops_path):
    """Every endpoint of the official TF model (float32 fixtures) within the README's tolerance,
    running in float32, and once in float64 (stored float32 weights cast up; NCHW, and one case
    only: PyTorch runs float64 depthwise convs on the CPU one channel at a time)."""
    golden = load_golden('moat', case)
    model = moat_from_golden(golden, channels_last=dtype == torch.float32).to(dtype).eval()
    model.load_state_dict(convert_tf(golden['state_dict']), strict=True)
    outputs = all_endpoints(model, golden['input'].to(dtype))
    assert len(outputs) == len(golden['outputs']) == 10
    for name, ours, ref in zip(golden['output_names'], outputs, golden['outputs'], strict=True):
        assert ours.shape == ref.shape, name
        diff = (ours.double() - ref.double()).abs().max().item()
        assert diff / ref.abs().max().item() < 1e-4, (name, diff)
        torch.testing.assert_close(ours.double(), ref.double(), atol=2e-5, rtol=1e-5, msg=name)


def test_windowed_case_really_uses_windows():
    """The same weights with global attention everywhere give other numbers at stride 16/32:
    the windowed fixture checks the windows, not just the rest."""
    golden = load_golden('moat', 'small_divisible')
    model = moat_from_golden(golden, window_sizes=(None,) * 4).eval()
    model.load_state_dict(convert_tf(golden['state_dict']), strict=True)
    outputs = all_endpoints(model, golden['input'])
    assert (outputs[6] - golden['outputs'][6]).abs().max() > 1e-2


# -- conversion ------------------------------------------------------------------------------------
@pytest.mark.parametrize('variant', ['moat0', 'tiny_moat0'])
def test_every_published_key_maps(variant):
    shapes = json.loads((golden_dir('moat') / f'keys_{variant}.json').read_text())
    with torch.device('meta'):
        model = MOAT(arch=variant)
    fake = {k: torch.empty(s, device='meta') for k, s in shapes.items()}
    converted = convert_tf(fake)
    own = model.state_dict()
    assert set(converted) == set(own), set(converted) ^ set(own)
    counters = [k for k in own if k.endswith('num_batches_tracked')]
    assert len(converted) == len(shapes) + len(counters)  # no key dropped, no leftovers
    for key, value in converted.items():
        assert value.shape == own[key].shape, key
    assert DERIVED_KEYS == ()  # deeplab2 stores no derived buffer, and we keep none


@pytest.mark.parametrize('arch', sorted(MOAT_ARCHS))
def test_published_variants_build_with_the_official_parameter_count(arch):
    """Backbone + the official 1000-class head (final LayerNorm 2C + 1x1 conv C*1000 + 1000)
    equals the count asserted in deeplab2's moat_test.py, with and without position tables."""
    with torch.device('meta'):
        counts = [
            sum(p.numel() for p in MOAT(arch=arch, relative_position_embedding=pe).parameters())
            for pe in (True, False)
        ]
    width = MOAT_ARCHS[arch]['widths'][-1]
    head = 2 * width + width * 1000 + 1000
    assert (counts[0] + head, counts[1] + head) == OFFICIAL_PARAMS[arch]


def _tf_state(model: MOAT) -> dict[str, torch.Tensor]:
    """A deeplab2-named state of ``model`` (inverse of convert_tf, for round trips)."""
    bn = {'weight': 'gamma', 'bias': 'beta', 'running_mean': 'moving_mean'}
    bn['running_var'] = 'moving_variance'
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split('.')
        if parts[-1] == 'num_batches_tracked':
            continue
        if parts[0] == 'stem':
            scope = f'moat/stem/{parts[1][:-1]}_{parts[1][-1]}'
        else:
            scope = f'moat/block_{int(parts[1]):02d}_{int(parts[3]):02d}/' + '/'.join(parts[4:-1])
            scope = scope.replace('se/reduce', 'se/reduce_conv2d')
            scope = scope.replace('se/expand', 'se/expand_conv2d')
        leaf = parts[-1]
        if 'norm' in scope and leaf in bn:
            out[f'{scope}/{bn[leaf]}'] = value
        elif leaf == 'relative_position_embedding':
            out[f'{scope}/relative_position_embedding'] = value
        elif value.dim() == 4 and 'depthwise' in scope:
            out[f'{scope}/depthwise_kernel'] = value.permute(2, 3, 0, 1)
        elif value.dim() == 4:
            out[f'{scope}/kernel'] = value.permute(2, 3, 1, 0)
        elif scope.endswith(('/q', '/k', '/v')):
            heads = value.shape[0] // 8
            shape = (heads, 8) if leaf == 'bias' else (-1, heads, 8)
            out[f'{scope}/{leaf}'] = (value if leaf == 'bias' else value.t()).reshape(shape)
        elif scope.endswith('/o') and leaf == 'weight':
            out[f'{scope}/weight'] = value.t().reshape(-1, 8, value.shape[0])
        else:
            out[f'{scope}/{leaf}'] = value
    return out


def test_convert_tf_handles_checkpoint_extras():
    """Classifier head, optimizer slots and counters are dropped; EMA shadows are used only on
    request; ``:0`` suffixes, outer scopes and TF2-eager stem names are understood."""
    model = randomize_norms(tiny_moat())
    tf_state = _tf_state(model)
    assert set(convert_tf(tf_state)) == set(model.state_dict())
    extras = dict(tf_state)
    key = 'moat/block_02_00/attention/q/bias'
    extras[key + '/ExponentialMovingAverage'] = torch.full_like(tf_state[key], 7.0)
    extras[key + '/Momentum'] = torch.zeros_like(tf_state[key])
    extras['moat/final_layer_norm/gamma'] = torch.ones(32)
    extras['moat/logits_head/kernel'] = torch.zeros(1, 1, 32, 1000)
    extras['global_step'] = torch.tensor(100)
    raw = convert_tf(extras)
    assert set(raw) == set(model.state_dict())
    torch.testing.assert_close(raw['stages.2.blocks.0.attention.q.bias'], tf_state[key].flatten())
    ema = convert_tf(extras, use_ema=True)
    assert torch.all(ema['stages.2.blocks.0.attention.q.bias'] == 7.0)
    # TF2 eager names: ':0' suffixes, the stem without its scope, an outer scope elsewhere
    renamed = {
        (k[len('moat/stem/') :] if k.startswith('moat/stem/') else 'encoder/' + k) + ':0': v
        for k, v in tf_state.items()
    }
    converted = convert_tf(renamed)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(converted[name], value, msg=name)


def test_convert_tf_without_moving_statistics_leaves_only_them_missing():
    """deeplab2 loads trainable variables only; a checkpoint without BN statistics loads all
    else, and loading reports exactly the statistics as missing."""
    model = tiny_moat()
    trainable = {k: v for k, v in _tf_state(model).items() if 'moving_' not in k}
    result = tiny_moat().load_state_dict(convert_tf(trainable), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.endswith(('running_mean', 'running_var'))
                                       for k in result.missing_keys)  # fmt: skip


def test_unknown_keys_pass_through_and_formats_are_detected():
    model = tiny_moat()
    state = _tf_state(model)
    state['decoder/conv/kernel'] = torch.zeros(1)
    converted = convert_tf(state)
    assert 'decoder/conv/kernel' in converted  # reported as unexpected when loading
    assert detect_format(state) == 'tf'
    assert detect_format(model.state_dict()) == 'effvision'
    ours = model.convert_checkpoint(model.state_dict())
    assert all(torch.equal(ours[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match='not a MOAT checkpoint.*moat_to_effvision'):
        detect_format({'conv1.weight': torch.zeros(1)})


# -- windows and any input size --------------------------------------------------------------------
def naive_window_attention(attn: Attention, x: torch.Tensor, window: tuple[int, int]):
    """Attention of each pixel over the pixels of its (wh, ww) window that lie inside the map,
    with explicit softmax and the bias read off the resized table at key - query."""
    b, h, w, c = x.shape
    wh, ww = window
    table = F.interpolate(
        attn.relative_position_embedding[None], (2 * wh - 1, 2 * ww - 1), mode='bilinear'
    )[0]
    out = torch.zeros(b, h, w, c, dtype=x.dtype)
    heads, d = attn.num_heads, attn.head_dim
    for r0 in range(0, h, wh):
        for c0 in range(0, w, ww):
            patch = x[:, r0 : r0 + wh, c0 : c0 + ww]
            ph, pw = patch.shape[1:3]
            tokens = patch.reshape(b, ph * pw, c)
            q, k, v = (
                layer(tokens).view(b, -1, heads, d).transpose(1, 2)
                for layer in (attn.q, attn.k, attn.v)
            )
            rows = torch.arange(ph).repeat_interleave(pw)
            cols = torch.arange(pw).repeat(ph)
            bias = table[
                :, rows[None] - rows[:, None] + wh - 1, cols[None] - cols[:, None] + ww - 1
            ]
            logits = (q * d**-0.5) @ k.transpose(-1, -2) + bias
            y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, heads * d)
            out[:, r0 : r0 + ph, c0 : c0 + pw] = attn.o(y).view(b, ph, pw, c)
    return out.flatten(1, 2)


@pytest.mark.parametrize(
    'size, window', [((7, 10), (3, 4)), ((6, 8), (3, 4)), ((2, 5), (3, 3)), ((5, 4), None)]
)
def test_windows_over_any_map_attend_within_the_map(size, window):
    """Windows that do not divide the map (or exceed it) are cropped to it: outside slots are
    neither keys nor queries. Global attention resizes the table to the map."""
    torch.manual_seed(0)
    attn = Attention(16, 8, position_embedding_size=4).double()
    nn.init.normal_(attn.relative_position_embedding, std=0.5)
    x = torch.randn(2, *size, 16, dtype=torch.float64)
    ours = attn(x, window)
    expected = naive_window_attention(attn, x, window or size)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


def test_same_average_pool_counts_real_pixels_only():
    """TF AveragePooling2D(3, 2, 'same'): asymmetric pads on even sizes, mean over real pixels."""
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    out = avg_pool_same(x, 3, 2)
    assert out.shape == (2, 3, 3, 4)
    # even height: rows (0,1,2), (2,3,4), (4,5); odd width: cols (0,1), (1,2,3), (3,4,5), (5,6)
    torch.testing.assert_close(out[..., 0, 0], x[..., 0:3, 0:2].mean((-1, -2)))
    torch.testing.assert_close(out[..., 2, 3], x[..., 4:6, 5:7].mean((-1, -2)))
    torch.testing.assert_close(out[..., 1, 2], x[..., 2:5, 3:6].mean((-1, -2)))


@pytest.mark.parametrize('size', [(512, 512), (512, 1024), (500, 375)])
def test_default_dense_windows_at_any_size(size):
    """The default dense setting (14 x 14 windows at stride 16, global at 32) at sizes the
    windows do not divide; outputs follow TF's ceil rounding."""
    model = MOAT(
        arch=None, stem_channels=(4, 4), depths=(1, 1, 1, 1), widths=(4, 8, 16, 32), head_dim=8,
        drop_path_rate=0.0,
    ).eval()  # fmt: skip
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert [o.shape[1] for o in outs] == [4, 8, 16, 32]
    assert [tuple(o.shape[-2:]) for o in outs] == [
        (-(-size[0] // s), -(-size[1] // s)) for s in (4, 8, 16, 32)
    ]
    assert all(torch.isfinite(o).all() for o in outs)


def test_a_window_covering_the_map_is_global_attention():
    """A window as large as the map is global attention (same table size: no resize), while
    smaller windows change the result."""
    torch.manual_seed(0)
    model = tiny_moat(window_sizes=(None, None, (2, 2), None)).eval()
    for name, table in model.named_parameters():
        if name.endswith('relative_position_embedding'):
            nn.init.normal_(table, std=0.5)
    glob = tiny_moat(window_sizes=(None, None, (4, 4), None)).eval()
    glob.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)  # stride-16 map 4 x 4
    with torch.no_grad():
        assert not torch.allclose(model(x)[2], glob(x)[2])
        ref = tiny_moat(window_sizes=(None, None, None, None)).eval()
        ref.load_state_dict(model.state_dict())
        torch.testing.assert_close(glob(x)[2], ref(x)[2], rtol=1e-5, atol=1e-6)


# -- deploy form -----------------------------------------------------------------------------------
def test_switch_to_deploy_folds_every_batchnorm():
    model = randomize_norms(tiny_moat()).eval()
    x = torch.randn(2, 3, 61, 47)
    with torch.no_grad():
        expected = model(x)
        model.switch_to_deploy()
        model.switch_to_deploy()  # idempotent
        outputs = model(x)
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    for ours, ref in zip(outputs, expected, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# -- contract --------------------------------------------------------------------------------------
def test_backbone_contract():
    check_backbone_contract(lambda **kw: tiny_moat(**kw))


def test_stochastic_depth_follows_the_official_rule():
    """Block b of n drops with rate * b / n (deeplab2's survival_prob schedule)."""
    model = tiny_moat(drop_path_rate=0.6)
    blocks = [block for stage in model.stages for block in stage.blocks]
    rates = [getattr(b.drop_path, 'drop_prob', 0.0) for b in blocks]
    assert rates == pytest.approx([0.6 * i / len(blocks) for i in range(len(blocks))])


def test_arch_defaults_follow_deeplab2():
    model = MOAT(arch='tiny_moat3', out_indices=(3,))
    assert model.widths == (80, 160, 320, 640) and model.depths == (2, 3, 7, 2)
    assert MOAT_ARCHS['moat3']['drop_path_rate'] == pytest.approx(0.6)
    assert model.stages[2].windows == [(14, 14)] * 7 and model.stages[3].windows == [None] * 2
    block = model.stages[0].blocks[0]
    assert block.pre_norm.eps == 1e-3 and block.se.reduce.out_channels == 20
    assert model.stages[2].blocks[0].attention.num_heads == 10


# -- errors a user can act on ----------------------------------------------------------------------
def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match=r"unknown MOAT arch 'moat9'.*tiny_moat0"):
        MOAT(arch='moat9')
    with pytest.raises(ValueError, match='needs widths'):
        MOAT(arch=None, stem_channels=(8,), depths=(1,) * 4, drop_path_rate=0.0)
    with pytest.raises(ValueError, match='window_sizes has 3 entries.*one entry per stage'):
        tiny_moat(window_sizes=(None, None, 3))
    with pytest.raises(ValueError, match='smaller than head_dim'):
        tiny_moat(head_dim=64)


def test_init_cfg_loads_official_names_and_rejects_others(tmp_path):
    golden = load_golden('moat', 'small_odd')
    file = tmp_path / 'segmentor.pth'
    state = {'backbone.' + k: v for k, v in golden['state_dict'].items()}
    state['decode_head.conv_seg.weight'] = torch.zeros(3, 3, 1, 1)
    torch.save({'state_dict': state}, file)
    init = dict(type='Pretrained', checkpoint=str(file), prefix='backbone')
    model = moat_from_golden(golden, init_cfg=init)
    model.init_weights()
    outputs = all_endpoints(model.eval(), golden['input'])
    torch.testing.assert_close(outputs[-2], golden['outputs'][-2], atol=2e-5, rtol=1e-5)

    other = tmp_path / 'other_arch.pth'
    torch.save({'state_dict': golden['state_dict']}, other)
    wrong = MOAT(arch='tiny_moat0', init_cfg=dict(type='Pretrained', checkpoint=str(other)))
    with pytest.raises(CheckpointError, match='shape mismatch.*Pick the arch'):
        wrong.init_weights()

    resnet = tmp_path / 'resnet.pth'
    torch.save({'state_dict': {'conv1.weight': torch.zeros(1)}}, resnet)
    model = tiny_moat(init_cfg=dict(type='Pretrained', checkpoint=str(resnet)))
    with pytest.raises(CheckpointError, match='not a MOAT checkpoint'):
        model.init_weights()


# -- registry --------------------------------------------------------------------------------------
def test_registry_builds_moat_from_mmseg_and_mmdet_scopes():
    cfg = dict(TINY, type='effvision.MOAT')
    with DefaultScope.overwrite_default_scope('mmseg'):
        assert isinstance(mmseg.registry.MODELS.build(cfg), MOAT)
    with DefaultScope.overwrite_default_scope('mmdet'):
        assert isinstance(mmdet.registry.MODELS.build(cfg), MOAT)


# -- converter CLI ---------------------------------------------------------------------------------
def _converter_module():
    sys.path.insert(0, str(REPO_ROOT / 'tools' / 'model_converters'))
    try:
        import moat_to_effvision
    finally:
        sys.path.pop(0)
    return moat_to_effvision


def test_converter_cli_round_trip(tmp_path, capsys):
    golden = load_golden('moat', 'small_divisible')
    src = tmp_path / 'tf_names.pth'
    state = dict(golden['state_dict'])
    state['moat/logits_head/bias'] = torch.zeros(1000)  # a classification checkpoint's head
    torch.save(state, src)
    dst = tmp_path / 'out' / 'moat.pth'
    assert _converter_module().main([str(src), str(dst)]) == 0
    assert 'converted 202 variables (1 dropped' in capsys.readouterr().out
    assert not dst.with_name('moat.pth.tmp').exists()
    model = moat_from_golden(golden, init_cfg=dict(type='Pretrained', checkpoint=str(dst)))
    model.init_weights()
    outputs = all_endpoints(model.eval(), golden['input'])
    torch.testing.assert_close(outputs[-2], golden['outputs'][-2], atol=2e-5, rtol=1e-5)
    assert _converter_module().main([str(tmp_path / 'missing.pth'), str(dst)]) == 1
    assert 'checkpoint not found' in capsys.readouterr().err


def test_converter_reads_tf_checkpoints_through_tensorflow(monkeypatch, tmp_path):
    """The TF reader (with a stand-in for TensorFlow, which is not installed here): numeric
    variables come back as tensors, bfloat16 as float32, strings are skipped; without
    TensorFlow the error says what to install."""
    tool = _converter_module()
    variables = {
        'moat/stem/conv_0/kernel': np.ones((3, 3, 3, 4), np.float32),
        'global_step': np.array(5, np.int64),
        '_CHECKPOINTABLE_OBJECT_GRAPH': np.array(b'graph', dtype=object),
    }
    reader = types.SimpleNamespace(
        get_variable_to_shape_map=lambda: {k: list(np.shape(v)) for k, v in variables.items()},
        get_tensor=lambda name: variables[name],
    )
    fake_tf = types.SimpleNamespace(train=types.SimpleNamespace(load_checkpoint=lambda p: reader))
    monkeypatch.setitem(sys.modules, 'tensorflow', fake_tf)
    state = tool.read_tf_checkpoint(tmp_path / 'model.ckpt')
    assert set(state) == {'moat/stem/conv_0/kernel', 'global_step'}
    assert state['moat/stem/conv_0/kernel'].dtype == torch.float32
    monkeypatch.setitem(sys.modules, 'tensorflow', None)
    with pytest.raises(CheckpointError, match='pip install tensorflow-cpu'):
        tool.read_tf_checkpoint(tmp_path / 'model.ckpt')


# -- export ----------------------------------------------------------------------------------------
def test_export_keeps_height_and_width_symbolic():
    """torch.export with dynamic H, W (windows, global attention, TF 'same' padding) runs at
    other sizes, divisible or not, and matches eager."""
    import torch.fx.experimental._config as fx_config

    # windowed (padded and masked) and global blocks at stride 16, global at stride 32; inputs
    # of 32 px or less would make a single-token global map, on which torch's matmul
    # decomposition guards
    model = tiny_moat(depths=(1, 1, 2, 1)).eval()
    h, w = torch.export.Dim('h', min=33, max=2048), torch.export.Dim('w', min=33, max=2048)
    with fx_config.patch(backed_size_oblivious=True):
        exported = torch.export.export(
            model, (torch.randn(1, 3, 64, 96),), dynamic_shapes=({2: h, 3: w},)
        )
    for size in [(70, 99), (33, 130), (250, 33)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = model(x)
            actual = exported.module()(x)
        for a, e in zip(actual, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_onnx_export_with_dynamic_size_matches_onnxruntime(tmp_path):
    """Dynamic-shape ONNX (dynamo exporter) runs in onnxruntime at sizes other than the example."""
    import onnxruntime as ort
    import torch.fx.experimental._config as fx_config

    model = tiny_moat(depths=(1, 1, 2, 1)).eval()
    h, w = torch.export.Dim('h', min=33, max=2048), torch.export.Dim('w', min=33, max=2048)
    with fx_config.patch(backed_size_oblivious=True):
        program = torch.onnx.export(
            model, (torch.randn(1, 3, 64, 96),), dynamo=True, dynamic_shapes=({2: h, 3: w},)
        )
    program.save(tmp_path / 'moat.onnx')
    session = ort.InferenceSession(str(tmp_path / 'moat.onnx'))
    for size in [(70, 99), (250, 37)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = model(x)
        actual = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        for a, e in zip(actual, expected, strict=True):
            np.testing.assert_allclose(a, e.numpy(), rtol=1e-4, atol=1e-5)
