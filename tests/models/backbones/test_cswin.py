"""CSWin backbone: golden parity with the official dense code, conversion, contract."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

from effvision.models.backbones.cswin import (
    CSWIN_ARCHS,
    CrossShapedAttention,
    CSWin,
    convert_checkpoint,
    convert_official_cls,
    convert_official_dense,
    detect_format,
    stripe_layout,
)
from effvision.utils import CheckpointError
from tests.conftest import REPO_ROOT, golden_dir, load_golden
from tests.models.backbones.contract import check_backbone_contract

GOLDEN_CASES = ['small_divisible', 'small_odd']
PUBLISHED_DENSE = ['tiny', 'small', 'base']  # the ADE20K UPerNet releases (keys_*.json)


def cswin_from_official_kwargs(kwargs: dict) -> CSWin:
    """Our CSWin configured like the official dense constructor call ``kwargs``, including its
    stage-width rule ``width * (heads[i + 1] // heads[i])``."""
    heads = kwargs['num_heads']
    widths = [kwargs['embed_dim']]
    for prev, nxt in zip(heads[:-1], heads[1:]):
        widths.append(widths[-1] * (nxt // prev))
    return CSWin(
        arch=None,
        embed_dim=kwargs['embed_dim'],
        depths=kwargs['depth'],
        num_heads=heads,
        split_sizes=kwargs['split_size'],
        widths=widths,
        in_channels=kwargs['in_chans'],
        mlp_ratio=kwargs['mlp_ratio'],
        drop_rate=kwargs['drop_rate'],
        attn_drop_rate=kwargs['attn_drop_rate'],
        drop_path_rate=kwargs['drop_path_rate'],
    )


def tiny_cswin(**overrides) -> CSWin:
    cfg = dict(
        arch=None,
        embed_dim=8,
        depths=(1, 2, 1, 1),
        num_heads=(2, 2, 4, 4),
        split_sizes=(1, 2, 3, 3),
    )
    cfg.update(overrides)
    return CSWin(**cfg)


def _to_official(model: CSWin, classification: bool = False) -> dict[str, torch.Tensor]:
    """Our weights under the official names (the converter's inverse), for round trips."""
    official = {}
    last = len(model.stages) - 1
    for key, value in model.state_dict().items():
        parts = key.split('.')
        if parts[0] == 'stem':
            new = ['stage1_conv_embed', {'conv': '0', 'norm': '2'}[parts[1]], *parts[2:]]
        elif parts[0] == 'stages' and parts[2] == 'downsample':
            new = [f'merge{parts[1]}', *parts[3:]]
        elif parts[0] == 'stages':
            rest = parts[4:]
            if rest[:2] == ['attn', 'lepe']:
                rest = ['attns', rest[2], 'get_v', *rest[3:]]
            elif rest[0] == 'attn':
                rest = rest[1:]
                if rest[0] == 'qkv' and int(parts[1]) != last:  # per-branch rows -> official
                    value = value.unflatten(0, (2, 3, -1)).transpose(0, 1).flatten(0, 2)
            new = [f'stage{int(parts[1]) + 1}', parts[3], *rest]
        else:  # output norms, 0-based -> 1-based
            new = [f'norm{int(parts[0][4:]) + 1}', *parts[1:]]
        official['.'.join(new)] = value
    if classification:
        official = {k: v for k, v in official.items() if not k.startswith('norm')}
        width = model.num_features[-1]
        official.update({'norm.weight': torch.ones(width), 'norm.bias': torch.zeros(width)})
        official.update({'head.weight': torch.zeros(1000, width), 'head.bias': torch.zeros(1000)})
    return official


# -- golden parity ------------------------------------------------------------------------------
@pytest.mark.parametrize('case', GOLDEN_CASES)
def test_matches_official_dense_cswin(case, ops_path):
    golden = load_golden('cswin', case)
    model = cswin_from_official_kwargs(golden['kwargs']).double().eval()
    assert detect_format(golden['state_dict']) == 'official_dense'
    model.load_state_dict(convert_official_dense(golden['state_dict']), strict=True)
    with torch.no_grad():
        outputs = model(golden['input'])
    assert len(outputs) == len(golden['outputs']) == 4
    for ours, ref in zip(outputs, golden['outputs'], strict=True):
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() < 1e-8


@pytest.mark.parametrize('case', GOLDEN_CASES)
def test_matches_official_in_float32(case, ops_path):
    golden = load_golden('cswin', case)
    model = cswin_from_official_kwargs(golden['kwargs']).eval()
    model.load_state_dict(convert_checkpoint(golden['state_dict']), strict=True)
    with torch.no_grad():
        outputs = model(golden['input'].float())
    for ours, ref in zip(outputs, golden['outputs'], strict=True):
        assert (ours.double() - ref).abs().max().item() < 5e-5


def _reference_branch(qkv, conv, split, vertical, heads):
    """One stripe branch written the plain way the official code reads: centred zero padding of
    q, k, v, stripes by view/permute, LePE per stripe, explicit softmax, crop.

    qkv: (3, B, C', H, W). Returns (B, H, W, C').
    """
    _, b, c, h, w = qkv.shape
    hs, ws = (h, split) if vertical else (split, w)
    ph, pw = (-h) % hs, (-w) % ws
    qkv = F.pad(qkv, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    hp, wp = h + ph, w + pw

    def stripes(t):  # (B, C', Hp, Wp) -> (B * nS, C', hs, ws)
        t = t.view(b, c, hp // hs, hs, wp // ws, ws).permute(0, 2, 4, 1, 3, 5)
        return t.reshape(-1, c, hs, ws)

    q, k, v = (stripes(t) for t in qkv)
    pos = conv(v)

    def heads_first(t):  # (B', C', hs, ws) -> (B', heads, N, d)
        return t.reshape(t.shape[0], heads, c // heads, hs * ws).transpose(2, 3)

    q, k, v, pos = map(heads_first, (q, k, v, pos))
    attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    out = attn.softmax(-1) @ v + pos  # (B', heads, N, d)
    out = out.transpose(2, 3).reshape(b, hp // hs, wp // ws, c, hs, ws)
    out = out.permute(0, 1, 4, 2, 5, 3).reshape(b, hp, wp, c)
    return out[:, ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]


@pytest.mark.parametrize('split', [1, 2, 3, 7])
def test_stripes_match_a_plain_reference_at_any_size(split):
    """Sizes beyond the golden cases: maps narrower than a stripe, odd pads, batch 2."""
    torch.manual_seed(0)
    attn = CrossShapedAttention(dim=16, num_heads=4, global_attn=False, qkv_bias=True, attn_drop=0)
    attn = attn.double().eval()
    for h, w in [(1, 1), (1, 5), (5, 1), (2, 9), (6, 4), (7, 7), (8, 13)]:
        x = torch.randn(2, h, w, 16, dtype=torch.float64)
        layouts = tuple(
            stripe_layout(h, w, split, i == 0, 0, 1, x.dtype, x.device) for i in range(2)
        )
        with torch.no_grad():
            ours = attn(x, layouts)
            # our qkv rows are [q k v] per branch
            qkv = attn.qkv(x).view(2, h, w, 2, 3, 8).permute(3, 4, 0, 5, 1, 2)
            ref = torch.cat(
                [_reference_branch(qkv[i], attn.lepe[i], split, i == 0, 2) for i in range(2)], -1
            )
            ref = attn.proj(ref)
        assert (ours - ref).abs().max().item() < 1e-12, (h, w)


def test_padded_tokens_are_unmasked_zeros():
    """A padded stripe slot gives logit 0 with value 0: the output differs from masking it."""
    layout = stripe_layout(3, 5, 4, False, 0, 1, torch.float32)  # 3 rows -> 4: one padded row
    assert layout.keep.sum().item() == 15 and layout.keep.numel() == 20
    # centred: 1 pad row is the bottom one (pad // 2 = 0 on top)
    assert layout.keep[:15].all() and not layout.keep[15:].any()
    layout = stripe_layout(4, 3, 7, True, 1, 2, torch.float32)  # 3 columns -> 7: 2 left, 2 right
    cols = torch.arange(28) % 7
    assert torch.equal(layout.keep[:, 0].bool(), (cols >= 2) & (cols < 5))
    assert torch.equal(
        layout.gather[layout.keep[:, 0].bool()] % 2, torch.ones(12, dtype=torch.long)
    )


# -- conversion ----------------------------------------------------------------------------------
@pytest.mark.parametrize('variant', PUBLISHED_DENSE)
def test_every_published_key_maps(variant):
    shapes = json.loads((golden_dir('cswin') / f'keys_{variant}.json').read_text())
    with torch.device('meta'):
        model = CSWin(arch=variant)
    fake = {k: torch.empty(s, device='meta') for k, s in shapes.items()}
    assert detect_format(fake) == 'official_dense'
    converted = convert_checkpoint(fake)
    own = model.state_dict()
    assert set(converted) == set(own), 'converted keys differ from the model keys'
    assert len(converted) == len(shapes)  # nothing dropped, nothing left over
    for key, value in converted.items():
        assert value.shape == own[key].shape, key
    # the published parameter count (norm1..norm4 included, no classifier)
    assert sum(p.numel() for p in model.parameters()) == sum(
        torch.Size(s).numel() for s in shapes.values()
    )


@pytest.mark.parametrize('arch', sorted(CSWIN_ARCHS))
def test_published_variants_build(arch):
    with torch.device('meta'):
        model = CSWin(arch=arch)
    settings = CSWIN_ARCHS[arch]
    assert model.num_features == [settings['embed_dim'] * 2**i for i in range(4)]
    assert [len(s.blocks) for s in model.stages] == list(settings['depths'])
    # official classification counts (models/cswin.py) minus head and final norm, plus our
    # four output norms
    params = sum(p.numel() for p in model.parameters())
    expected = {
        'tiny': 22_320_552,
        'small': 34_643_304,
        'base': 77_382_184,
        'large': 173_262_664,
    }[arch.removesuffix('_384')]
    width = model.num_features[-1]
    head_and_norm = width * 1000 + 1000 + 2 * width
    assert params == expected - head_and_norm + 2 * sum(model.num_features)


def test_classification_checkpoint_drops_head_and_final_norm():
    model = tiny_cswin()
    official = _to_official(model, classification=True)
    assert detect_format(official) == 'official_cls'
    converted = convert_official_cls(official)
    missing = set(model.state_dict()) - set(converted)
    assert missing == {f'norm{i}.{p}' for i in range(4) for p in ('weight', 'bias')}
    assert not set(converted) - set(model.state_dict())
    for key, value in converted.items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_segmentor_and_own_formats():
    model = tiny_cswin()
    own = model.state_dict()
    assert detect_format(own) == 'effvision'
    assert convert_checkpoint(own).keys() == own.keys()
    segmentor = {'backbone.' + k: v for k, v in _to_official(model).items()}
    segmentor['decode_head.conv_seg.weight'] = torch.zeros(150, 512, 1, 1)
    assert detect_format(segmentor) == 'segmentor:official_dense'
    converted = convert_checkpoint(segmentor)
    assert converted.keys() == own.keys()
    assert all(torch.equal(converted[k], own[k]) for k in own)


def test_wrong_checkpoints_name_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match=r'not a CSWin checkpoint.*Pass the CSWin'):
        detect_format({'conv1.weight': torch.zeros(1), 'fc.weight': torch.zeros(1)})
    file = tmp_path / 'resnet.pth'
    torch.save({'state_dict': {'conv1.weight': torch.zeros(1)}}, file)
    model = tiny_cswin(init_cfg=dict(type='Pretrained', checkpoint=str(file)))
    with pytest.raises(CheckpointError, match='not a CSWin checkpoint'):
        model.init_weights()
    file = tmp_path / 'other_arch.pth'
    torch.save({'model': _to_official(tiny_cswin(embed_dim=16))}, file)
    model = tiny_cswin(init_cfg=dict(type='Pretrained', checkpoint=str(file)))
    with pytest.raises(CheckpointError, match=r'shape mismatch.*Pick the arch'):
        model.init_weights()


def test_init_cfg_loads_an_official_segmentor_checkpoint(tmp_path):
    """The ADE20K UPerNet release: keys under ``backbone.``, found without ``prefix``."""
    src = tiny_cswin()
    file = tmp_path / 'upernet_cswin.pth'
    state = {'backbone.' + k: v for k, v in _to_official(src).items()}
    state['decode_head.conv_seg.weight'] = torch.zeros(3, 3, 1, 1)
    torch.save({'state_dict': state, 'meta': {}}, file)
    model = tiny_cswin(init_cfg=dict(type='Pretrained', checkpoint=str(file)))
    model.init_weights()
    for key, value in src.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def _converter_cli():
    """``main`` of tools/model_converters/cswin_to_effvision.py, run in-process (a subprocess
    would spend most of the test importing mmseg)."""
    path = REPO_ROOT / 'tools/model_converters/cswin_to_effvision.py'
    spec = importlib.util.spec_from_file_location('cswin_to_effvision', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_converter_cli_round_trip(tmp_path, capsys):
    golden = load_golden('cswin', 'small_odd')
    src = tmp_path / 'upernet_cswin.pth'
    segmentor = {'backbone.' + k: v for k, v in golden['state_dict'].items()}
    segmentor['decode_head.conv_seg.weight'] = torch.zeros(150, 8, 1, 1)
    torch.save({'state_dict': segmentor, 'meta': {}}, src)
    main = _converter_cli()
    out = tmp_path / 'out'
    assert main([str(src), str(out / 'full.pth')]) == 0
    assert main([str(src), str(out / 'backbone.pth'), '--backbone-only']) == 0
    assert 'segmentor:official_dense checkpoint' in capsys.readouterr().out
    full = torch.load(out / 'full.pth', weights_only=True)['state_dict']
    assert 'decode_head.conv_seg.weight' in full  # a whole segmentor, for load_from
    assert 'backbone.stem.conv.weight' in full and 'backbone.stage1.0.qkv.weight' not in full
    model = cswin_from_official_kwargs(golden['kwargs']).double().eval()
    model.init_cfg = dict(type='Pretrained', checkpoint=str(out / 'backbone.pth'))
    model.init_weights()
    with torch.no_grad():
        outputs = model(golden['input'])
    assert (outputs[-1] - golden['outputs'][-1]).abs().max().item() < 1e-8
    assert main([str(tmp_path / 'missing.pth'), str(out / 'x.pth')]) == 1
    assert 'not found' in capsys.readouterr().err
    assert not (out / 'x.pth').exists()


# -- contract ------------------------------------------------------------------------------------
def test_backbone_contract():
    check_backbone_contract(lambda **kw: tiny_cswin(**kw))


@pytest.mark.parametrize('size', [(3, 3), (13, 9), (35, 70)])
def test_output_sizes_follow_the_official_convolutions(size):
    with torch.no_grad():
        outs = tiny_cswin().eval()(torch.randn(1, 3, *size))
    h, w = (size[0] - 3) // 4 + 1, (size[1] - 3) // 4 + 1
    for i, out in enumerate(outs):
        assert out.shape == (1, 8 * 2**i, h, w)
        assert torch.isfinite(out).all()
        h, w = -(-h // 2), -(-w // 2)


def test_out_indices_build_only_their_norms():
    model = tiny_cswin(out_indices=(1, -1))
    assert model.out_indices == (1, 3)
    assert hasattr(model, 'norm1') and hasattr(model, 'norm3') and not hasattr(model, 'norm0')


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match=r"unknown CSWin arch 'huge'; choose one of"):
        CSWin(arch='huge')
    with pytest.raises(ValueError, match='needs split_sizes'):
        CSWin(arch=None, embed_dim=8, depths=(1, 1), num_heads=(2, 2))
    with pytest.raises(ValueError, match='stage 0.*at least one head'):
        tiny_cswin(num_heads=(1, 2, 4, 4))  # the official code divides by zero here


def test_registry_builds_cswin_from_mmseg_and_mmdet_scopes():
    import mmdet.registry
    import mmseg.registry
    from mmengine.registry import DefaultScope

    from effvision.registry import MODELS

    cfg = dict(
        arch=None,
        embed_dim=8,
        depths=(1, 1),
        num_heads=(2, 2),
        split_sizes=(1, 1),
        out_indices=(0, 1),
    )
    assert isinstance(MODELS.build(dict(type='CSWin', **cfg)), CSWin)
    for scope, registry in (('mmseg', mmseg.registry.MODELS), ('mmdet', mmdet.registry.MODELS)):
        with DefaultScope.overwrite_default_scope(scope):
            assert isinstance(registry.build(dict(type='effvision.CSWin', **cfg)), CSWin)


# -- export ----------------------------------------------------------------------------------------
def test_export_keeps_height_and_width_symbolic():
    """torch.export with dynamic H, W must not specialise to the example size: the exported
    program runs at other sizes (padded or not) and matches eager. Two stages cover every code
    path (stem, stripes with padding, merge, global attention) at half the tracing time."""
    import torch.fx.experimental._config as fx_config

    model = tiny_cswin(
        depths=(1, 1), num_heads=(2, 2), split_sizes=(3, 3), out_indices=(0, 1)
    ).eval()
    h, w = torch.export.Dim('h', min=16, max=2048), torch.export.Dim('w', min=16, max=2048)
    with fx_config.patch(backed_size_oblivious=True):
        exported = torch.export.export(
            model, (torch.randn(1, 3, 64, 96),), dynamic_shapes=({2: h, 3: w},)
        )
    for size in [(64, 96), (70, 99), (16, 130), (250, 21)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = model(x)
            actual = exported.module()(x)
        for a, e in zip(actual, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
