"""Next-ViT backbone: golden parity with the official dense code, conversion, deploy, contract."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from effvision.models.backbones.nextvit import (
    NEXTVIT_ARCHS,
    UNUSED_KEYS,
    NextViT,
    convert_official,
    convert_timm,
    detect_format,
    padded_avg_pool_2x2,
)
from effvision.utils import CheckpointError
from tests.conftest import golden_dir, load_golden
from tests.models.backbones.contract import (
    check_backbone_contract,
    check_frozen_stages,
    check_outputs,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
GOLDEN_CASES = ['small_divisible', 'small_odd', 'small_deploy', 'small_det_divisible']
# official README (classification table): parameters in millions, classifier head included
PUBLISHED_PARAMS = {'small': 31.7, 'base': 44.8, 'large': 57.8}
TINY = dict(
    arch=None,
    stem_channels=(8, 8, 16),
    depths=(1, 1, 5, 1),
    block_channels=[[16], [80], [32, 32, 32, 32, 80], [80]],
    head_dim=16,
)


def nextvit_from_golden(golden: dict) -> NextViT:
    """Our Next-ViT configured like the official constructor call of a golden case."""
    kwargs = golden['kwargs']
    return NextViT(
        arch=None,
        stem_channels=kwargs['stem_chs'],
        depths=kwargs['depths'],
        block_channels=golden['stage_out_channels'],
        drop_path_rate=kwargs['path_dropout'],
        with_extra_norm=kwargs['with_extra_norm'],
        frozen_stages=kwargs['frozen_stages'],
        norm_eval=kwargs['norm_eval'],
    )


def tiny_nextvit(**overrides) -> NextViT:
    return NextViT(**{**TINY, **overrides})


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that folding or skipping a norm changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
                module.running_mean.copy_(0.2 * torch.randn(module.weight.shape, generator=gen))
                module.running_var.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
    return model


def max_diff(outputs, references) -> list[float]:
    assert len(outputs) == len(references)
    diffs = []
    for ours, ref in zip(outputs, references, strict=True):
        assert ours.shape == ref.shape
        diffs.append((ours.double() - ref.double()).abs().max().item())
    return diffs


# -- golden parity ------------------------------------------------------------------------------
@pytest.mark.parametrize('case', GOLDEN_CASES)
def test_matches_official_dense_nextvit(case):
    golden = load_golden('nextvit', case)
    model = nextvit_from_golden(golden).double().eval()
    model.load_state_dict(model.convert_checkpoint(golden['state_dict']), strict=True)
    if case.endswith('deploy'):
        model.switch_to_deploy()
    with torch.no_grad():
        outputs = model(golden['input'])
    assert max(max_diff(outputs, golden['outputs'])) < 1e-9


def test_matches_official_in_float32():
    golden = load_golden('nextvit', 'small_odd')
    model = nextvit_from_golden(golden).eval()
    model.load_state_dict(model.convert_checkpoint(golden['state_dict']), strict=True)
    with torch.no_grad():
        outputs = model(golden['input'].float())
    for diff, ref in zip(max_diff(outputs, golden['outputs']), golden['outputs'], strict=True):
        assert diff / ref.abs().max().item() < 1e-4


def test_export_pooling_is_the_official_ceil_mode_pooling():
    """The pad-and-divide pooling used under torch.export equals AvgPool2d(ceil_mode=True,
    count_include_pad=False) bit for bit, at even and odd sizes."""
    pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
    for size in [(8, 8), (7, 9), (1, 5), (13, 1)]:
        x = torch.randn(2, 3, *size, dtype=torch.float64)
        assert torch.equal(padded_avg_pool_2x2(x), pool(x)), size


# -- deploy form ---------------------------------------------------------------------------------
def test_switch_to_deploy_folds_pre_norms_and_is_idempotent():
    model = randomize_norms(tiny_nextvit()).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        expected = model(x)
    model.train().switch_to_deploy()
    assert not model.training
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.merge_bn()  # the official name; a second fold must change nothing
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    for block in model.features:
        for name in ('norm', 'norm1', 'norm2'):
            assert isinstance(getattr(block, name, nn.Identity()), nn.Identity)
        if hasattr(block, 'e_mhsa') and block.e_mhsa.sr_ratio > 1:
            assert isinstance(block.e_mhsa.norm, nn.Identity)
    with torch.no_grad():
        outputs = model(x)
    assert max(max_diff(outputs, expected)) < 1e-5

    # the deployed state dict loads strictly into a model built in the deploy form
    deployed = tiny_nextvit(deploy=True).eval()
    deployed.load_state_dict(deployed.convert_checkpoint(model.state_dict()), strict=True)
    with torch.no_grad():
        assert max(max_diff(deployed(x), expected)) < 1e-5
    # and a form mismatch is refused instead of applying the norms twice (or never)
    with pytest.raises(CheckpointError, match='deploy=False, load, then call switch_to_deploy'):
        deployed.convert_checkpoint(tiny_nextvit().state_dict())
    with pytest.raises(CheckpointError, match='build it with deploy=True'):
        tiny_nextvit().convert_checkpoint(model.state_dict())


# -- checkpoint formats ----------------------------------------------------------------------------
@pytest.mark.parametrize('variant', sorted(NEXTVIT_ARCHS))
@pytest.mark.parametrize('form', ['seg', 'det'])
def test_every_published_key_maps(variant, form):
    """keys_{v}.json: the ADE20K (segmentation) checkpoints; keys_{v}_det.json: the ImageNet
    checkpoints the detection recipes load into the model without extra norms."""
    suffix = '_det' if form == 'det' else ''
    shapes = json.loads((golden_dir('nextvit') / f'keys_{variant}{suffix}.json').read_text())
    with torch.device('meta'):
        model = NextViT(arch=variant, with_extra_norm=form == 'seg')
    fake = {k: torch.empty(s, device='meta') for k, s in shapes.items()}
    assert detect_format(fake) == ('official-seg' if form == 'seg' else 'official-cls')
    converted = model.convert_checkpoint(fake)
    own = model.state_dict()
    assert set(converted) == set(own), 'converted keys differ from the model keys'
    dropped = {k for k in shapes if k.startswith(UNUSED_KEYS)}
    if form == 'det':
        dropped |= {k for k in shapes if k.startswith('norm.')}  # the classifier's final norm
    assert len(converted) == len(shapes) - len(dropped)
    for key, value in converted.items():
        assert value.shape == own[key].shape, key


@pytest.mark.parametrize('variant', sorted(NEXTVIT_ARCHS))
def test_parameter_counts_match_the_published_models(variant):
    def count(shapes, skip=()):
        return sum(
            math.prod(s)
            for k, s in shapes.items()
            if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))
            and not k.startswith(skip)
        )

    folder = golden_dir('nextvit')
    seg = json.loads((folder / f'keys_{variant}.json').read_text())
    cls = json.loads((folder / f'keys_{variant}_det.json').read_text())
    with torch.device('meta'):
        dense = sum(p.numel() for p in NextViT(arch=variant).parameters())
        plain = sum(p.numel() for p in NextViT(arch=variant, with_extra_norm=False).parameters())
    assert dense == count(seg, ('proj_head.', 'extra_norm_list.3.'))
    assert plain == count(cls, ('proj_head.', 'norm.'))
    # the README figure is the ImageNet classifier (head and final norm included), truncated
    assert math.floor(count(cls) / 1e5) / 10 == PUBLISHED_PARAMS[variant]


def _timm_like(model: NextViT) -> dict:
    """Our state dict renamed the way timm names the same tensors."""
    ends = [end + 1 for end in model.stage_ends]
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith('features.'):
            index, rest = key[len('features.') :].split('.', 1)
            stage = next(i for i, end in enumerate(ends) if int(index) < end)
            block = int(index) - (ends[stage - 1] if stage else 0)
            rest = rest.replace('mlp.conv1.', 'mlp.fc1.').replace('mlp.conv2.', 'mlp.fc2.')
            key = f'stages.{stage}.blocks.{block}.{rest}'
        elif key.startswith('norm3.'):
            key = 'norm.' + key[len('norm3.') :]
        out[key] = value
    return out


def test_timm_weights_give_timm_features():
    """A timm nextvit (random weights, real widths, smallest legal depths) converted to ours gives
    the same stage features as timm's forward_intermediates, in float64."""
    timm = pytest.importorskip('timm')
    with torch.device('meta'):
        reference = timm.create_model('nextvit_small', depths=(1, 1, 5, 1), num_classes=10)
    reference = reference.to_empty(device='cpu').double().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in reference.state_dict().items():
            if name.endswith('num_batches_tracked'):
                continue
            if tensor.dim() > 1:  # conv / linear weights: unit-variance outputs
                std = tensor[0].numel() ** -0.5
                tensor.copy_(std * torch.randn(tensor.shape, generator=gen))
            else:
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
        randomize_norms(reference)
    state = reference.state_dict()
    assert detect_format(state) == 'timm'
    with torch.device('meta'):
        model = NextViT(arch=None, stem_channels=(64, 32, 64), depths=(1, 1, 5, 1))
        model_det = NextViT(
            arch=None, stem_channels=(64, 32, 64), depths=(1, 1, 5, 1), with_extra_norm=False
        )
    # with extra norms, timm's final norm is the stage-4 norm (as for official ImageNet weights)
    converted = model.convert_checkpoint(state)
    assert set(model.state_dict()) - set(converted) == {
        f'norm{i}.{p}'
        for i in range(3)
        for p in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
    }
    model_det.load_state_dict(model_det.convert_checkpoint(state), strict=True, assign=True)
    model_det.eval()
    x = torch.randn(1, 3, 96, 80, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, intermediates_only=True)
        outputs = model_det(x)
    assert max(max_diff(outputs, expected)) < 1e-9


def test_timm_names_map_for_every_variant():
    """timm's keys of each published variant (and its features_only names) map onto ours."""
    for variant in sorted(NEXTVIT_ARCHS):
        with torch.device('meta'):
            model = NextViT(arch=variant)
        state = _timm_like(model)
        state = {k: v for k, v in state.items() if not k.startswith(('norm0.', 'norm1.', 'norm2.'))}
        state['head.fc.weight'] = torch.empty(1000, 1024, device='meta')
        state['head.fc.bias'] = torch.empty(1000, device='meta')
        converted = convert_timm(state)
        assert set(model.state_dict()) - set(converted) == {
            k for k in model.state_dict() if k.startswith(('norm0.', 'norm1.', 'norm2.'))
        }
        features_only = {k.replace('stages.', 'stages_', 1): v for k, v in state.items()}
        assert set(convert_timm(features_only)) == set(converted)


def test_own_format_passes_unchanged():
    for model in (tiny_nextvit(), tiny_nextvit(with_extra_norm=False)):
        state = model.state_dict()
        converted = model.convert_checkpoint(state)
        assert converted.keys() == state.keys()
        assert all(converted[k] is state[k] for k in state)
    assert convert_official({'norm0.weight': torch.ones(1)}).keys() == {'norm0.weight'}


# -- contract ------------------------------------------------------------------------------------
def test_backbone_contract():
    check_backbone_contract(tiny_nextvit)


def test_detection_form_contract():
    """Without extra norms (the detection recipes): outputs and freezing, the parts that differ."""

    def make(**kwargs):
        return tiny_nextvit(with_extra_norm=False, **kwargs)

    check_outputs(make(), (4, 8, 16, 32), [(61, 47)])
    check_frozen_stages(make, 4)


def test_extra_norms_sit_in_the_trunk():
    """The stage norms also feed the next stage (official), so they change later outputs."""
    model = randomize_norms(tiny_nextvit()).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.norm0.bias.add_(1.0)
        after = model(x)
    assert all(not torch.allclose(a, b) for a, b in zip(before, after, strict=True))


def test_frozen_stages_freeze_blocks_and_their_norms():
    model = tiny_nextvit(frozen_stages=2)
    model.train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    # stage 1 is features.0, stage 2 is features.1 (depths (1, 1, 5, 1))
    assert frozen == {
        n
        for n, _ in model.named_parameters()
        if n.startswith(('stem.', 'features.0.', 'features.1.', 'norm0.', 'norm1.'))
    }
    assert not model.features[1].training and model.features[2].training


@pytest.mark.parametrize('arch', sorted(NEXTVIT_ARCHS))
def test_published_variants_build(arch):
    with torch.device('meta'):
        model = NextViT(arch=arch)
    assert model.num_features == [96, 256, 512, 1024]
    assert len(model.features) == sum(NEXTVIT_ARCHS[arch]['depths'])
    assert [f['reduction'] for f in model.feature_info] == [4, 8, 16, 32]


def test_sync_bn_norm_cfg():
    model = tiny_nextvit(norm_cfg=dict(type='SyncBN', requires_grad=True)).eval()
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outputs] == [16, 80, 80, 80]


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="unknown NextViT arch 'huge'"):
        NextViT(arch='huge')
    with pytest.raises(ValueError, match='multiple of 5'):
        NextViT(arch='small', depths=(3, 4, 7, 3))
    with pytest.raises(ValueError, match='positive multiples of head_dim=32'):
        NextViT(**{**TINY, 'head_dim': 32})
    with pytest.raises(ValueError, match='blocks per stage'):
        NextViT(**{**TINY, 'block_channels': [[16], [80], [32, 80], [80]]})
    with pytest.raises(ValueError, match="'BN' or 'SyncBN'"):
        tiny_nextvit(norm_cfg=dict(type='GN'))


def test_too_small_input_is_explained():
    model = tiny_nextvit().eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32))[-1].shape[-2:] == (1, 1)
        with pytest.raises(RuntimeError, match='input too small.*pad or resize'):
            model(torch.randn(1, 3, 24, 24))


def test_registry_builds_from_mmseg_and_mmdet_scopes():
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmseg.registry import MODELS as MMSEG_MODELS

    import effvision.models  # noqa: F401  (registers the backbones)

    cfg = dict(type='effvision.NextViT', **TINY)
    for registry in (MMSEG_MODELS, MMDET_MODELS):
        assert isinstance(registry.build(dict(cfg)), NextViT)


# -- pretrained loading --------------------------------------------------------------------------
def test_init_cfg_loads_official_segmentor_checkpoint(tmp_path):
    golden = load_golden('nextvit', 'small_odd')
    file = tmp_path / 'upernet_nextvit.pth'
    state = {'backbone.' + k: v for k, v in golden['state_dict'].items()}
    state['decode_head.conv_seg.weight'] = torch.zeros(3, 3, 1, 1)
    torch.save({'state_dict': state, 'meta': {}}, file)
    model = nextvit_from_golden(golden).double()
    model.init_cfg = dict(type='Pretrained', checkpoint=str(file), prefix='backbone')
    model.init_weights()
    model.eval()
    with torch.no_grad():
        outputs = model(golden['input'])
    assert max(max_diff(outputs, golden['outputs'])) < 1e-9


def test_init_cfg_rejects_wrong_checkpoints(tmp_path):
    other = tmp_path / 'other_arch.pth'
    torch.save({'model': tiny_nextvit(stem_channels=(8, 8, 32)).state_dict()}, other)
    model = tiny_nextvit(init_cfg=dict(type='Pretrained', checkpoint=str(other)))
    with pytest.raises(CheckpointError, match=r'shape mismatch.*Pick the arch'):
        model.init_weights()

    resnet = tmp_path / 'resnet.pth'
    torch.save({'state_dict': {'backbone.conv1.weight': torch.zeros(1)}}, resnet)
    model = tiny_nextvit(init_cfg=dict(type='Pretrained', checkpoint=str(resnet)))
    with pytest.raises(CheckpointError, match='not a Next-ViT checkpoint.*prefix="backbone"'):
        model.init_weights()


def test_converter_cli_round_trip(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        'nextvit_to_effvision', REPO_ROOT / 'tools/model_converters/nextvit_to_effvision.py'
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    golden = load_golden('nextvit', 'small_divisible')
    src = tmp_path / 'official.pth'
    torch.save({'model': golden['state_dict']}, src)
    dst = tmp_path / 'out' / 'nextvit.pth'
    assert tool.main([str(src), str(dst)]) == 0
    assert 'official-seg checkpoint' in capsys.readouterr().out
    assert not list(dst.parent.glob('*.tmp'))
    model = nextvit_from_golden(golden).double()
    model.init_cfg = dict(type='Pretrained', checkpoint=str(dst))
    model.init_weights()
    model.eval()
    with torch.no_grad():
        outputs = model(golden['input'])
    assert max(max_diff(outputs, golden['outputs'])) < 1e-9
    assert tool.main([str(tmp_path / 'missing.pth'), str(dst)]) == 1
    assert 'checkpoint not found' in capsys.readouterr().err


# -- export ----------------------------------------------------------------------------------------
def test_export_keeps_height_and_width_symbolic():
    """torch.export with dynamic H, W does not specialise to the example size: the program runs
    at other sizes, odd ones included, and matches eager."""
    import torch.fx.experimental._config as fx_config

    model = randomize_norms(tiny_nextvit()).eval()
    h, w = torch.export.Dim('h', min=32, max=2048), torch.export.Dim('w', min=32, max=2048)
    with fx_config.patch(backed_size_oblivious=True):
        exported = torch.export.export(
            model, (torch.randn(1, 3, 64, 96),), dynamic_shapes=({2: h, 3: w},)
        )
    for size in [(64, 96), (70, 99), (250, 33), (64, 32)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = model(x)
            actual = exported.module()(x)
        for a, e in zip(actual, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_onnx_dynamic_export_of_the_deploy_form(tmp_path):
    """The deploy form exports to ONNX with dynamic H, W and matches at other (odd) sizes."""
    ort = pytest.importorskip('onnxruntime')
    model = randomize_norms(tiny_nextvit()).eval().switch_to_deploy()
    h, w = torch.export.Dim('h', min=64, max=2048), torch.export.Dim('w', min=64, max=2048)
    program = torch.onnx.export(
        model,
        (torch.randn(1, 3, 64, 96),),
        dynamo=True,
        dynamic_shapes=({2: h, 3: w},),
        input_names=['image'],
    )
    program.save(tmp_path / 'nextvit.onnx')
    session = ort.InferenceSession(tmp_path / 'nextvit.onnx', providers=['CPUExecutionProvider'])
    for size in [(64, 96), (70, 99), (200, 264)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = model(x)
        outputs = session.run(None, {'image': x.numpy()})
        assert max(max_diff([torch.from_numpy(o) for o in outputs], expected)) < 1e-4
