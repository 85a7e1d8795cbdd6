"""EfficientFormerV2 backbone: golden parity with the official dense and classification code,
conversion of every published checkpoint format, attention-bias resizing, odd grids, deploy form,
contract."""

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

from effvision.models.backbones.efficientformer_v2 import (
    DERIVED_KEYS,
    Attention2d,
    Attention2dDownsample,
    EfficientFormerV2,
    convert_to_effvision,
    detect_format,
)
from effvision.utils import CheckpointError
from tests.conftest import REPO_ROOT, golden_dir, load_golden
from tests.models.backbones.contract import check_backbone_contract
from tests.models.backbones.test_efficientformer import calibrate

GOLDEN_CASES = ['v2_small_divisible', 'v2_small_odd', 'v2_models_forkfeat_divisible']
VARIANTS = ['s0', 's1', 's2', 'l']
FORMS = {'': 512, '_det': 800, '_cls': 224}
BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked') + DERIVED_KEYS


def from_official_kwargs(kwargs: dict, **overrides) -> EfficientFormerV2:
    """Our backbone configured like the official constructor call ``kwargs``."""
    assert kwargs['fork_feat'] and all(kwargs['downsamples'])
    return EfficientFormerV2(
        arch=None,
        depths=kwargs['layers'],
        widths=kwargs['embed_dims'],
        mlp_ratios=[kwargs['e_ratios'][str(i)] for i in range(4)],
        num_vit=kwargs['vit_num'],
        drop_path_rate=kwargs['drop_path_rate'],
        **overrides,
    )


def tiny(**kwargs) -> EfficientFormerV2:
    cfg = dict(
        arch=None,
        depths=(1, 1, 2, 2),
        widths=(8, 8, 16, 16),
        mlp_ratios=((2,), (2,), (2, 3), (3, 2)),
        num_vit=1,
    )
    cfg.update(kwargs)
    return EfficientFormerV2(**cfg)


def loaded_golden(case: str) -> tuple[EfficientFormerV2, dict]:
    golden = load_golden('efficientformer', case)
    classification_file = golden['official_class'].startswith('models/')
    model = from_official_kwargs(
        golden['kwargs'],
        attn_bias_size=golden['kwargs'].get('resolution', 224),  # the classification default
        out_norm=classification_file,  # its fork_feat mode has BatchNorm output norms
    ).double()
    state, fmt = convert_to_effvision(golden['state_dict'])
    assert fmt == ('official_cls' if classification_file else 'official_dense')
    model.load_state_dict(state, strict=True)
    return model.eval(), golden


# -- golden parity -------------------------------------------------------------------------------
@pytest.mark.parametrize('case', GOLDEN_CASES)
def test_matches_official_efficientformer_v2(case):
    model, golden = loaded_golden(case)
    with torch.no_grad():
        outputs = model(golden['input'])
    assert len(outputs) == len(golden['outputs']) == 4
    for ours, ref in zip(outputs, golden['outputs'], strict=True):
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() < 1e-9


@pytest.mark.parametrize('case', GOLDEN_CASES[:2])
def test_matches_official_in_float32(case):
    model, golden = loaded_golden(case)
    model.float()
    with torch.no_grad():
        outputs = model(golden['input'].float())
    for ours, ref in zip(outputs, golden['outputs'], strict=True):
        assert (ours.double() - ref).abs().max() / ref.abs().max() < 1e-4


def test_generic_path_used_off_cpu_matches_too(monkeypatch):
    """Off CPU the standard operations run (pooling, BatchNorm, NCHW attention outputs) instead of
    the CPU formulations; forced here on CPU, they give the official numbers as well."""
    from effvision.models.backbones import efficientformer, efficientformer_v2

    for module in (efficientformer, efficientformer_v2):
        monkeypatch.setattr(module, 'cpu_kernels', lambda x: False)
    model, golden = loaded_golden('v2_small_odd')
    with torch.no_grad():
        outputs = model(golden['input'])
    for ours, ref in zip(outputs, golden['outputs'], strict=True):
        assert (ours - ref).abs().max().item() < 1e-9


# -- any input size ------------------------------------------------------------------------------
def test_odd_stride16_grids_work_as_padding_to_even():
    """The official dense code crashes when the stride-16 grid has an odd side (200x264 gives
    13x17). Ours runs; its strided attention equals running on the map zero-padded to even sides
    and cropping back, which is what the official code computes for even sides."""
    model = tiny(attn_bias_size=64).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 200, 264))
    sizes = [(math.ceil(200 / 2 ** (i + 2)), math.ceil(264 / 2 ** (i + 2))) for i in range(4)]
    assert [tuple(o.shape[-2:]) for o in outputs] == sizes
    mixer = model.stages[2].blocks[-1].token_mixer
    assert isinstance(mixer, Attention2d) and mixer.stride_conv is not None
    calibrate(mixer, torch.randn(2, 16, 14, 18))
    x = torch.randn(1, 16, 13, 17)
    with torch.no_grad():
        padded = mixer(F.pad(x, (0, 1, 0, 1)))[:, :, :13, :17]
        torch.testing.assert_close(mixer(x), padded, rtol=1e-5, atol=1e-5)
        down = model.stages[3].downsample(x)
    assert down.shape == (1, 16, 7, 9)


# -- checkpoint formats --------------------------------------------------------------------------
def _meta_state(variant: str, suffix: str) -> dict[str, torch.Tensor]:
    path = golden_dir('efficientformer') / f'keys_v2_{variant}{suffix}.json'
    return {k: torch.empty(s, device='meta') for k, s in json.loads(path.read_text()).items()}


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
        model = EfficientFormerV2(arch=variant, attn_bias_size=FORMS[suffix])
    converted = model.convert_checkpoint(official)
    own = model.state_dict()
    assert set(converted) == set(own)
    for key, value in converted.items():
        assert value.shape == own[key].shape, key
    dropped = [k for k in official if k.endswith(DERIVED_KEYS)]
    if suffix == '_cls':
        assert detect_format(official) == 'official_cls'
        dropped += [k for k in official if k.startswith(('head.', 'dist_head.', 'norm.'))]
    else:
        assert detect_format(official) == 'official_dense'
        dropped += [k for k in official if k.endswith('.attention_biases')]
    assert len(converted) == len(official) - len(dropped)


@pytest.mark.parametrize('variant', VARIANTS)
def test_published_variants_build_with_the_published_parameter_count(variant):
    """Parameters equal the official dense (seg, det) models', and with the ImageNet classifier
    (final BatchNorm, head, distillation head) the official ImageNet checkpoint's."""
    for suffix, size in FORMS.items():
        official = _meta_state(variant, suffix)
        with torch.device('meta'):
            model = EfficientFormerV2(arch=variant, attn_bias_size=size)
        ours = sum(p.numel() for p in model.parameters())
        if suffix == '_cls':
            ours += sum(
                v.numel()
                for k, v in official.items()
                if k.startswith(('head.', 'dist_head.', 'norm.')) and not k.endswith(BUFFERS)
            )
        assert ours == _param_count(official), suffix
    assert model.num_features == list(EfficientFormerV2.arch_settings[variant]['widths'])


def test_imagenet_tables_restart_from_zero_in_a_dense_model():
    """ImageNet (224) tables do not fit the 512 grids: dropped with a warning, as the official
    dense code does; they load into a model laid out for 224."""
    golden = load_golden('efficientformer', 'v2_models_forkfeat_divisible')
    state = golden['state_dict']
    for size, fits in ((224, True), (512, False)):
        model = from_official_kwargs(golden['kwargs'], attn_bias_size=size, out_norm=True)
        converted = model.convert_checkpoint(state)
        tables = [k for k in converted if k.endswith('attention_biases')]
        assert len(tables) == (5 if fits else 0)
        missing = set(model.state_dict()) - set(converted)
        assert all(k.endswith('attention_biases') for k in missing) and len(missing) == 5 - len(
            tables
        )


def test_timm_checkpoint_gives_timm_features():
    """A random timm efficientformerv2 converts and gives timm's stage features at 224x224."""
    from timm.models.efficientformer_v2 import EfficientFormerV2 as TimmEfficientFormerV2

    x = torch.randn(1, 3, 224, 224)
    reference = TimmEfficientFormerV2(
        depths=(1, 1, 2, 2),
        embed_dims=(16, 16, 24, 32),
        mlp_ratios=(4, 4, (4, 3), (3, 4)),
        num_vit=1,
        num_classes=10,
        img_size=224,
    )
    calibrate(reference, x)
    state, fmt = convert_to_effvision(reference.state_dict())
    assert fmt == 'timm'
    model = tiny(
        widths=(16, 16, 24, 32), mlp_ratios=((4,), (4,), (4, 3), (3, 4)), attn_bias_size=224
    )
    model.load_state_dict(state, strict=True)
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


def test_bad_checkpoints_are_explained(tmp_path):
    with pytest.raises(CheckpointError, match="type='EfficientFormer'"):
        detect_format({'network.0.0.mlp.fc1.weight': torch.zeros(1)})
    with pytest.raises(
        CheckpointError, match="not an EfficientFormerV2 checkpoint.*prefix='backbone'"
    ):
        detect_format({'conv1.weight': torch.zeros(1)})
    file = tmp_path / 'other_width.pth'
    torch.save({'state_dict': tiny(widths=(8, 8, 16, 24)).state_dict()}, file)
    model = tiny(init_cfg=dict(type='Pretrained', checkpoint=str(file)))
    with pytest.raises(CheckpointError, match='shape mismatch.*Pick the arch'):
        model.init_weights()


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match=r"unknown EfficientFormerV2 arch 's3'.*'l', 's0'"):
        EfficientFormerV2(arch='s3')
    with pytest.raises(ValueError, match='one ratio per block'):
        tiny(mlp_ratios=((2,), (2,), (2,), (2, 2)))
    with pytest.raises(ValueError, match='has 4 stages'):
        tiny(depths=(1, 1, 2), widths=(8, 8, 16), mlp_ratios=((2,), (2,), (2, 2)))


def test_converter_cli_round_trip(tmp_path):
    spec = importlib.util.spec_from_file_location(
        'efficientformer_to_effvision',
        REPO_ROOT / 'tools/model_converters/efficientformer_to_effvision.py',
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    golden = load_golden('efficientformer', 'v2_small_odd')
    src = tmp_path / 'eformer_v2.pth'
    torch.save({'model': golden['state_dict']}, src)
    dst = tmp_path / 'converted.pth'
    assert cli.main([str(src), str(dst)]) == 0
    model = from_official_kwargs(
        golden['kwargs'],
        attn_bias_size=golden['kwargs']['resolution'],
        init_cfg=dict(type='Pretrained', checkpoint=str(dst)),
    )
    model.double().init_weights()
    expected, _ = convert_to_effvision(golden['state_dict'])
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


# -- attention bias at other grids -----------------------------------------------------------------
def official_pair_bias(table: torch.Tensor, q_res: int, k_res: int) -> torch.Tensor:
    """(heads, q_res^2, k_res^2) as the official code builds it (Attention4D when q_res == k_res,
    Attention4DDownsample otherwise): offsets numbered in first-seen order."""
    step = math.ceil(k_res / q_res)
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p1 in itertools.product(range(q_res), range(q_res)):
        for p2 in itertools.product(range(k_res), range(k_res)):
            offset = (abs(p1[0] * step - p2[0]), abs(p1[1] * step - p2[1]))
            idxs.append(offsets.setdefault(offset, len(offsets)))
    return table[:, torch.tensor(idxs).view(q_res * q_res, k_res * k_res)]


@pytest.mark.parametrize('size', [(512, 512), (512, 1024), (500, 375)])
def test_attention_biases_are_resized_like_the_official_code(size):
    """Output shapes at 512x512, 512x1024 and 500x375; each attention (strided, downsampling,
    last stage) uses its pair matrix bicubically resized to (Nq, Nk): exactly the table at
    512x512, the size the tables are laid out for."""
    model = tiny(attn_bias_size=512).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, 'attention_biases'):
                module.attention_biases.normal_()
        outputs = model(torch.randn(1, 3, *size))
    grid = [
        (math.ceil(size[0] / 2 ** (i + 2)), math.ceil(size[1] / 2 ** (i + 2))) for i in range(4)
    ]
    assert [tuple(o.shape[-2:]) for o in outputs] == grid
    n16, n32 = grid[2][0] * grid[2][1], grid[3][0] * grid[3][1]
    attentions = [
        (model.stages[2].blocks[-1].token_mixer, 16, 16, n32, n32),  # stride 2: grid of 32
        (model.stages[3].downsample.attn, 16, 32, n32, n16),
        (model.stages[3].blocks[-1].token_mixer, 16, 16, n32, n32),
    ]
    for attention, q_res, k_res, nq, nk in attentions:
        assert isinstance(attention, Attention2d | Attention2dDownsample)
        pair = official_pair_bias(attention.attention_biases.detach(), q_res, k_res)
        expected = F.interpolate(pair[None], size=(nq, nk), mode='bicubic', align_corners=False)
        with torch.no_grad():
            bias = attention.attention_bias(nq, nk, torch.float32)
        torch.testing.assert_close(bias, expected, rtol=0, atol=1e-6)
        if size == (512, 512):
            assert torch.equal(bias[0], pair)


# -- contract and deploy ---------------------------------------------------------------------------
def test_backbone_contract():
    check_backbone_contract(lambda **kw: tiny(attn_bias_size=64, **kw))


def test_out_norm_and_frozen_stages():
    model = tiny(out_norm=True, out_indices=(0, 2), frozen_stages=1)
    assert isinstance(model.norm0, nn.BatchNorm2d) and not hasattr(model, 'norm1')
    assert model.norm0 in model.frozen_modules() and model.norm2 not in model.frozen_modules()
    assert [f['reduction'] for f in model.feature_info] == [4, 16]


def test_random_init_is_the_official_one():
    model = EfficientFormerV2(arch='s0')
    model.init_weights()
    block = model.stages[3].blocks[-1]
    assert not block.token_mixer.attention_biases.any()
    assert torch.equal(block.ls1.gamma, torch.full((176,), 1e-5))
    assert abs(block.mlp.fc1.conv.weight.std().item() - 0.02) < 0.003
    assert not block.mlp.fc1.conv.bias.any()
    assert EfficientFormerV2.arch_settings['l']['drop_path_rate'] == 0.1


def test_switch_to_deploy_folds_every_batchnorm_and_the_query_subsampling():
    x = torch.randn(2, 3, 72, 104)  # odd stride-16 grid (5 x 7) too
    model = calibrate(tiny(attn_bias_size=64, out_norm=True), x).double()
    x = x.double()
    deployed = copy.deepcopy(model).switch_to_deploy()
    batchnorms = [n for n, m in deployed.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert batchnorms == ['norm0', 'norm1', 'norm2', 'norm3']  # output norms have no conv before
    assert not deployed.stages[3].downsample.attn.q.subsample
    assert not any(k.endswith('gamma') for k in deployed.state_dict())
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
    cfg = dict(
        type='effvision.EfficientFormerV2',
        arch=None,
        depths=(1, 1, 1, 1),
        widths=(8, 8, 8, 8),
        mlp_ratios=((2,),) * 4,
        num_vit=1,
    )
    assert isinstance(MODELS.build(cfg), EfficientFormerV2)


@pytest.mark.slow
def test_export_keeps_height_and_width_symbolic():
    import torch.fx.experimental._config as fx_config

    model = tiny(attn_bias_size=64).eval()
    h, w = torch.export.Dim('h', min=32, max=2048), torch.export.Dim('w', min=32, max=2048)
    with fx_config.patch(backed_size_oblivious=True):
        exported = torch.export.export(
            model, (torch.randn(1, 3, 64, 96),), dynamic_shapes=({2: h, 3: w},)
        )
    for size in [(64, 96), (70, 99), (250, 37), (64, 64)]:  # 70x99: odd stride-16 grid
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            for a, e in zip(exported.module()(x), model(x), strict=True):
                torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
