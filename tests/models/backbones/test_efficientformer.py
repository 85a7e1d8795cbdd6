"""EfficientFormer (v1) backbone: golden parity with the official dense code, conversion of every
published checkpoint format, attention-bias resizing, deploy form, contract."""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effvision.models.backbones.efficientformer import (
    DERIVED_KEYS,
    Attention,
    EfficientFormer,
    Flat,
    convert_official_cls,
    convert_to_effvision,
    detect_format,
)
from effvision.utils import CheckpointError
from tests.conftest import REPO_ROOT, golden_dir, load_golden
from tests.models.backbones.contract import check_backbone_contract

GOLDEN_CASES = ['small_divisible', 'small_odd']
VARIANTS = ['l1', 'l3', 'l7']
# keys file suffix -> attn_bias_size of the official model that wrote it
FORMS = {'': 512, '_det': 800, '_cls': 224}
BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked') + DERIVED_KEYS


def from_official_kwargs(kwargs: dict, **overrides) -> EfficientFormer:
    """Our backbone configured like the official dense constructor call ``kwargs``."""
    assert kwargs['fork_feat'] and all(kwargs['downsamples'])
    return EfficientFormer(
        arch=None,
        depths=kwargs['layers'],
        widths=kwargs['embed_dims'],
        num_vit=kwargs['vit_num'],
        **overrides,
    )


def tiny(**kwargs) -> EfficientFormer:
    cfg = dict(arch=None, depths=(1, 1, 1, 2), widths=(8, 16, 24, 32), num_vit=1)
    cfg.update(kwargs)
    return EfficientFormer(**cfg)


def loaded_golden(case: str) -> tuple[EfficientFormer, dict]:
    golden = load_golden('efficientformer', case)
    model = from_official_kwargs(golden['kwargs']).double()
    state, fmt = convert_to_effvision(golden['state_dict'])
    assert fmt == 'official_dense'
    model.load_state_dict(state, strict=True)
    return model.eval(), golden


def calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Random non-trivial affine/scale/bias values and BatchNorm statistics of one batch."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            if name.endswith('gamma'):
                param.copy_(1 + 0.1 * noise)
            elif 'attention_biases' in name:
                param.copy_(0.5 * noise)
            elif param.dim() == 1:
                param.copy_((1.0 if name.endswith('weight') else 0.0) + 0.1 * noise)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = None  # cumulative average: the statistics of this batch
        model.train()
        model(x)
    return model.eval()


# -- golden parity -------------------------------------------------------------------------------
@pytest.mark.parametrize('case', GOLDEN_CASES)
def test_matches_official_dense_efficientformer(case):
    model, golden = loaded_golden(case)
    with torch.no_grad():
        outputs = model(golden['input'])
    assert len(outputs) == len(golden['outputs']) == 4
    for ours, ref in zip(outputs, golden['outputs'], strict=True):
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() < 1e-9


@pytest.mark.parametrize('case', GOLDEN_CASES)
def test_matches_official_in_float32(case):
    model, golden = loaded_golden(case)
    model.float()
    with torch.no_grad():
        outputs = model(golden['input'].float())
    for ours, ref in zip(outputs, golden['outputs'], strict=True):
        assert (ours.double() - ref).abs().max() / ref.abs().max() < 1e-4


def test_eval_bias_cache_never_goes_stale():
    """The official eval-time bias cache keeps old values after load_state_dict (golden README
    quirk 3); ours is keyed on the table's version and data."""
    x = torch.randn(1, 3, 96, 64)
    model = calibrate(tiny(attn_bias_size=64), x)
    attention = model.stages[3].blocks[-1].token_mixer
    with torch.no_grad():
        before = model(x)[-1]  # fills the cache
        assert attention._bias_cache is not None
        state = model.state_dict()
        key = 'stages.3.blocks.2.token_mixer.attention_biases'
        state[key] = state[key] + torch.randn_like(state[key])  # a constant would not show
        model.load_state_dict(state)
        changed = model(x)[-1]
        fresh = copy.deepcopy(model)
        fresh.stages[3].blocks[-1].token_mixer._bias_cache = None
        assert torch.equal(changed, fresh(x)[-1])
        assert (changed - before).abs().max() > 1e-3
        assert model.double()(x.double())[-1].dtype == torch.float64
    model.train()
    assert attention.attention_bias(4, 4, torch.float64).requires_grad  # fresh while training
    assert sum(isinstance(m, Flat) for m in model.modules()) == 1  # only before the attention


def test_generic_path_used_off_cpu_matches_too(monkeypatch):
    """Off CPU the standard operations run (pooling, BatchNorm, NCHW attention outputs) instead of
    the CPU formulations; forced here on CPU, they give the official numbers as well."""
    from effvision.models.backbones import efficientformer, efficientformer_v2

    for module in (efficientformer, efficientformer_v2):
        monkeypatch.setattr(module, 'cpu_kernels', lambda x: False)
    model, golden = loaded_golden('small_odd')
    with torch.no_grad():
        outputs = model(golden['input'])
    for ours, ref in zip(outputs, golden['outputs'], strict=True):
        assert (ours - ref).abs().max().item() < 1e-9


# -- checkpoint formats --------------------------------------------------------------------------
def _meta_state(variant: str, suffix: str) -> dict[str, torch.Tensor]:
    shapes = json.loads(
        (golden_dir('efficientformer') / f'keys_{variant}{suffix}.json').read_text()
    )
    return {k: torch.empty(s, device='meta') for k, s in shapes.items()}


def _param_count(state: dict[str, torch.Tensor]) -> int:
    dense = any(k.endswith('attention_biases_seg') for k in state)
    return sum(
        v.numel()
        for k, v in state.items()
        if not k.endswith(BUFFERS) and not (dense and k.endswith('.attention_biases'))
    )


@pytest.mark.parametrize('suffix', FORMS)
@pytest.mark.parametrize('variant', VARIANTS)
def test_every_published_key_maps(variant, suffix):
    """Every key of the official seg/det/ImageNet checkpoints lands on the model built like the
    official one, with the right shape; only derived buffers, the dense code's unused ImageNet
    placeholders and the classifier (heads, final norm) are dropped."""
    official = _meta_state(variant, suffix)
    with torch.device('meta'):
        model = EfficientFormer(arch=variant, attn_bias_size=FORMS[suffix])
    converted = model.convert_checkpoint(official)
    own = model.state_dict()
    for key, value in converted.items():
        assert key in own, key
        assert value.shape == own[key].shape, key
    dropped = set(official) - {k for k in official if not k.endswith(DERIVED_KEYS)}
    if suffix == '_cls':
        assert detect_format(official) == 'official_cls'
        head = {k for k in official if k.startswith(('head.', 'dist_head.', 'norm.'))}
        assert len(converted) == len(official) - len(dropped) - len(head)
        missing = set(own) - set(converted)
        assert missing == {f'norm{i}.{p}' for i in range(4) for p in ('weight', 'bias')}
    else:
        assert detect_format(official) == 'official_dense'
        placeholders = {k for k in official if k.endswith('.attention_biases')}
        assert len(converted) == len(official) - len(dropped) - len(placeholders)
        assert set(converted) == set(own)


@pytest.mark.parametrize('variant', VARIANTS)
def test_published_variants_build_with_the_published_parameter_count(variant):
    """Parameters equal the official dense (seg, det) models'; with the classifier that the
    ImageNet checkpoint adds (final LayerNorm, head, distillation head) instead of our output
    GroupNorms, they equal the published ImageNet model's (12.3M / 31.4M / 82.2M)."""
    published = {'l1': 12.3e6, 'l3': 31.4e6, 'l7': 82.2e6}
    for suffix, size in FORMS.items():
        official = _meta_state(variant, suffix)
        with torch.device('meta'):
            model = EfficientFormer(arch=variant, attn_bias_size=size)
        ours = sum(p.numel() for p in model.parameters())
        if suffix == '_cls':
            norms = sum(p.numel() for k, p in model.named_parameters() if k.startswith('norm'))
            head = sum(
                v.numel()
                for k, v in official.items()
                if k.startswith(('head.', 'dist_head.', 'norm.'))
            )
            ours = ours - norms + head
            assert round(ours / 1e5) == round(published[variant] / 1e5)
        assert ours == _param_count(official), suffix
    assert model.num_features == list(EfficientFormer.arch_settings[variant]['widths'])


def _official_cls_state(model: EfficientFormer) -> dict[str, torch.Tensor]:
    """An official ImageNet-format state dict with ``model``'s weights (7x7 bias tables)."""
    dense = load_golden('efficientformer', 'small_divisible')['state_dict']
    state = {k: v for k, v in dense.items() if not k.startswith('norm')}
    for key in [k for k in state if k.endswith('attention_biases_seg')]:
        stem = key[: -len('attention_biases_seg')]
        del state[stem + 'attention_bias_idxs_seg']
        state[stem + 'attention_biases'] = state.pop(key)[:, :49].clone()
    state['norm.weight'] = torch.ones(64, dtype=torch.float64)
    state['norm.bias'] = torch.zeros(64, dtype=torch.float64)
    for head in ('head', 'dist_head'):
        state[f'{head}.weight'] = torch.zeros(1000, 64, dtype=torch.float64)
        state[f'{head}.bias'] = torch.zeros(1000, dtype=torch.float64)
    return state


def test_imagenet_checkpoint_loads_and_drops_heads(tmp_path):
    """Heads and final norm are dropped; the 7x7 bias tables load into a model laid out for 224
    and restart from zero in a 512 (segmentation) model, as in the official dense code."""
    kwargs = load_golden('efficientformer', 'small_divisible')['kwargs']
    state = _official_cls_state(from_official_kwargs(kwargs))
    assert detect_format(state) == 'official_cls'
    file = tmp_path / 'efficientformer_cls.pth'
    torch.save({'model': state}, file)
    cfg = dict(type='Pretrained', checkpoint=str(file))
    for size, expect_table in ((224, True), (512, False)):
        model = from_official_kwargs(kwargs, attn_bias_size=size, init_cfg=cfg).double()
        model.init_weights()
        table = model.stages[3].blocks[4].token_mixer.attention_biases
        if expect_table:
            torch.testing.assert_close(table, state['network.6.4.token_mixer.attention_biases'])
        else:
            assert table.shape == (8, 256) and not table.any()
        stem = model.state_dict()['stem.conv1.weight']
        torch.testing.assert_close(stem, state['patch_embed.0.weight'])
    assert not any(
        k.startswith(('head', 'dist_head', 'norm.')) for k in convert_official_cls(state)
    )


def test_timm_checkpoint_gives_timm_features():
    """A random timm efficientformer converts and gives timm's stage features (before our output
    GroupNorms) at 224x224, where the bias needs no resizing."""
    from timm.models.efficientformer import EfficientFormer as TimmEfficientFormer

    x = torch.randn(1, 3, 224, 224)
    reference = TimmEfficientFormer(
        depths=(1, 1, 1, 3), embed_dims=(16, 32, 48, 64), num_vit=2, num_classes=10
    )
    calibrate(reference, x)
    state, fmt = convert_to_effvision(reference.state_dict())
    assert fmt == 'timm'
    model = tiny(depths=(1, 1, 1, 3), widths=(16, 32, 48, 64), num_vit=2, attn_bias_size=224)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and all(k.startswith('norm') for k in result.missing_keys)
    for i in range(4):
        setattr(model, f'norm{i}', nn.Identity())
    with torch.no_grad():  # float64: only round-off may differ
        expected = reference.double().forward_intermediates(x.double(), intermediates_only=True)
        outputs = model.double().eval()(x.double())
    for ours, ref in zip(outputs, expected, strict=True):
        assert (ours - ref).abs().max().item() < 1e-9


def test_own_format_is_unchanged():
    model = tiny()
    state = model.state_dict()
    assert detect_format(state) == 'effvision'
    converted = model.convert_checkpoint(state)
    assert converted.keys() == state.keys()
    assert all(converted[k] is state[k] for k in state)


def test_bad_checkpoints_are_explained(tmp_path):
    with pytest.raises(CheckpointError, match="type='EfficientFormerV2'"):
        detect_format({'network.0.0.mlp.mid.weight': torch.zeros(1)})
    with pytest.raises(
        CheckpointError, match="not an EfficientFormer checkpoint.*prefix='backbone'"
    ):
        detect_format({'conv1.weight': torch.zeros(1)})
    file = tmp_path / 'other_width.pth'
    torch.save({'state_dict': tiny(widths=(8, 16, 24, 40)).state_dict()}, file)
    model = tiny(init_cfg=dict(type='Pretrained', checkpoint=str(file)))
    with pytest.raises(CheckpointError, match='shape mismatch.*Pick the arch'):
        model.init_weights()


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match=r"unknown EfficientFormer arch 'l5'.*'l1', 'l3', 'l7'"):
        EfficientFormer(arch='l5')
    with pytest.raises(ValueError, match='needs widths'):
        EfficientFormer(arch=None, depths=(1, 1, 1, 1), num_vit=1)
    with pytest.raises(ValueError, match='num_vit=3 must be in'):
        tiny(num_vit=3)


def test_converter_cli_round_trip(tmp_path):
    spec = importlib.util.spec_from_file_location(
        'efficientformer_to_effvision',
        REPO_ROOT / 'tools/model_converters/efficientformer_to_effvision.py',
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    golden = load_golden('efficientformer', 'small_odd')
    src = tmp_path / 'fpn_efficientformer.pth'
    torch.save({'state_dict': {'backbone.' + k: v for k, v in golden['state_dict'].items()}}, src)
    dst = tmp_path / 'out' / 'converted.pth'
    assert cli.main([str(src), str(dst), '--prefix', 'backbone']) == 0
    assert cli.main([str(src), str(tmp_path / 'x.pth')]) == 1  # no prefix: not a backbone
    model = from_official_kwargs(
        golden['kwargs'], init_cfg=dict(type='Pretrained', checkpoint=str(dst))
    )
    model.double().init_weights()
    expected, _ = convert_to_effvision(golden['state_dict'])
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


# -- attention bias at other grids -----------------------------------------------------------------
def official_pair_bias(table: torch.Tensor, res: int) -> torch.Tensor:
    """(heads, res^2, res^2) as the official code builds it: offsets numbered as first seen."""
    points = list(itertools.product(range(res), range(res)))
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p1 in points:
        for p2 in points:
            offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            idxs.append(offsets.setdefault(offset, len(offsets)))
    return table[:, torch.tensor(idxs).view(len(points), len(points))]


@pytest.mark.parametrize('size', [(512, 512), (512, 1024), (500, 375)])
def test_attention_bias_is_resized_like_the_official_code(size):
    """Output shapes at 512x512, 512x1024 and 500x375, and the last stage's attention uses the
    16x16 pair matrix bicubically resized to (N, N): exactly the table at 512x512 (N = 256)."""
    model = tiny(attn_bias_size=512).eval()
    attention = model.stages[3].blocks[-1].token_mixer
    assert isinstance(attention, Attention) and attention.resolution == 16
    with torch.no_grad():
        attention.attention_biases.normal_()
        outputs = model(torch.randn(1, 3, *size))
    grid = [
        (math.ceil(size[0] / 2 ** (i + 2)), math.ceil(size[1] / 2 ** (i + 2))) for i in range(4)
    ]
    assert [tuple(o.shape[-2:]) for o in outputs] == grid
    n = grid[-1][0] * grid[-1][1]
    pair = official_pair_bias(attention.attention_biases.detach(), 16)
    expected = F.interpolate(pair[None], size=(n, n), mode='bicubic', align_corners=False)
    with torch.no_grad():
        bias = attention.attention_bias(n, n, torch.float32)
        torch.testing.assert_close(bias, expected, rtol=0, atol=1e-6)
        if n == 256:
            assert torch.equal(bias[0], pair)
        # the attention uses that bias
        x = torch.randn(1, n, 32)
        q, k, v = attention.qkv(x).view(1, n, 8, -1).transpose(1, 2).split([32, 32, 128], dim=-1)
        attn = (q @ k.transpose(-2, -1) * 32**-0.5 + expected).softmax(-1)
        manual = attention.proj((attn @ v).transpose(1, 2).reshape(1, n, -1))
        torch.testing.assert_close(attention(x), manual, rtol=1e-5, atol=1e-5)


# -- contract and deploy ---------------------------------------------------------------------------
def test_backbone_contract():
    check_backbone_contract(lambda **kw: tiny(attn_bias_size=64, **kw))


def test_feature_info_and_out_indices():
    model = tiny(out_indices=(1, -1))
    assert model.out_indices == (1, 3) and hasattr(model, 'norm3') and not hasattr(model, 'norm0')
    assert [f['reduction'] for f in model.feature_info] == [8, 32]
    # a dense checkpoint has all four norms: those of unused outputs are left out, not reported
    golden = load_golden('efficientformer', 'small_divisible')
    converted = from_official_kwargs(golden['kwargs'], out_indices=(3,)).convert_checkpoint(
        golden['state_dict']
    )
    assert not any(k.startswith(('norm0', 'norm1', 'norm2')) for k in converted)


def test_random_init_is_the_official_one():
    model = EfficientFormer(arch='l1')
    model.init_weights()
    attention = model.stages[3].blocks[4]
    assert not attention.token_mixer.attention_biases.any()
    assert torch.equal(attention.ls1.gamma, torch.full((448,), 1e-5))
    assert abs(attention.mlp.fc1.weight.std().item() - 0.02) < 0.002
    assert not attention.mlp.fc1.bias.any()
    with torch.device('meta'):
        assert EfficientFormer(arch='l7').layer_scale_init_value == 1e-6


def test_switch_to_deploy_folds_every_batchnorm():
    x = torch.randn(2, 3, 72, 52)
    model = calibrate(tiny(attn_bias_size=64), x).double()
    x = x.double()
    deployed = copy.deepcopy(model).switch_to_deploy()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    assert not any(k.endswith(('running_mean', 'ls2.gamma')) for k in deployed.state_dict())
    with torch.no_grad():
        expected, outputs = model(x), deployed(x)
        for ours, ref in zip(outputs, expected, strict=True):
            assert (ours - ref).abs().max().item() < 1e-10
        again = copy.deepcopy(deployed).switch_to_deploy()(x)
        assert all(torch.equal(a, b) for a, b in zip(again, outputs, strict=True))
        deployed.float()
        for ours, ref in zip(deployed(x.float()), expected, strict=True):
            assert (ours.double() - ref).abs().max() / ref.abs().max() < 1e-5


# -- registry and export ---------------------------------------------------------------------------
@pytest.mark.parametrize('scope', ['mmseg', 'mmdet'])
def test_registry_builds_from_mmseg_and_mmdet_scopes(scope):
    if scope == 'mmseg':
        from mmseg.registry import MODELS
    else:
        from mmdet.registry import MODELS
    model = MODELS.build(
        dict(
            type='effvision.EfficientFormer',
            arch=None,
            depths=(1, 1, 1, 1),
            widths=(8, 8, 8, 8),
            num_vit=1,
        )
    )
    assert isinstance(model, EfficientFormer)


@pytest.mark.slow
def test_export_keeps_height_and_width_symbolic():
    import torch.fx.experimental._config as fx_config

    model = tiny(attn_bias_size=64).eval()
    h, w = torch.export.Dim('h', min=32, max=2048), torch.export.Dim('w', min=32, max=2048)
    with fx_config.patch(backed_size_oblivious=True):
        exported = torch.export.export(
            model, (torch.randn(1, 3, 64, 96),), dynamic_shapes=({2: h, 3: w},)
        )
    for size in [(64, 96), (70, 99), (250, 37), (64, 64)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            for a, e in zip(exported.module()(x), model(x), strict=True):
                torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
