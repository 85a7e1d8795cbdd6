"""kMaX-DeepLab network: golden parity, any canvas size, published keys, training mode, variants."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from effvision.models.decode_heads.kmax_head import (
    KMaXNetwork,
    RelativePositionalEncoding,
    _cached_relative_index,
    convert_official,
)
from tests.conftest import golden_dir, load_golden

CASES = ['small', 'small_odd']
BN = dict(type='BN', eps=1e-3, momentum=0.01)
# Parameters whose gradient is zero by construction in training mode (batch statistics), in the
# official code as well: a per-head constant on the attention logits cancels in the softmax,
# and a per-channel constant before a 1x1 conv + batch-statistics BN cancels in that BN.
STRUCTURALLY_ZERO_GRAD = (
    'batch_norm_similarity.bias',
    'height_axis.batch_norm_retrieved_output.bias',
    'kmeans_query_batch_norm_retrieved_value.bias',
    'pixel_space_head_last_convbn.conv.bias',
)


def _network_from_golden(kwargs: dict, dtype=torch.float64, **overrides) -> KMaXNetwork:
    """Our network built from the official constructor arguments stored in the golden file."""
    pd, td = kwargs['pixel_decoder'], kwargs['transformer_decoder']
    assert kwargs['head']['num_classes'] == td['num_classes']
    aux = None
    if td['add_aux_semantic_pred']:
        aux = 'aspp' if td['use_aux_semantic_decoder'] else 'light'
    pixel_decoder = dict(
        dec_layers=pd['dec_layers'],
        dec_channels=pd['dec_channels'],
        layer_types=pd['layer_types'],
        drop_path_rate=pd['drop_path_prob'],
    )
    pixel_decoder.update(overrides)
    net = KMaXNetwork(
        kwargs['backbone_channels'],
        td['num_classes'],
        td['num_queries'],
        pixel_decoder=pixel_decoder,
        transformer_decoder=dict(
            dec_layers=td['dec_layers'],
            in_channels=td['in_channels'],  # checked against the pixel decoder
            drop_path_rate=td['drop_path_prob'],
            aux_semantic_head=aux,
        ),
        norm_cfg=BN,
    )
    return net.to(dtype).eval()


def _run_with_intermediates(net: KMaXNetwork, feats: list[torch.Tensor]) -> dict:
    """Every output the golden stores, named as there (intermediates via forward hooks)."""
    captured = {}
    hooks = [net.pixel_decoder.register_forward_hook(lambda m, i, o: captured.update(pd=o))]
    for idx, layer in enumerate(net.transformer_decoder.kmax_transformer_layers):
        hooks.append(
            layer.register_forward_hook(lambda m, i, o, idx=idx: captured.update({idx: o}))
        )
    try:
        with torch.no_grad():
            out = net(feats)
    finally:
        for hook in hooks:
            hook.remove()
    ours = {k: out[k] for k in ('pred_logits', 'pred_masks', 'pixel_feature')}
    for i, aux in enumerate(out['aux_outputs']):
        ours[f'aux{i}_pred_logits'] = aux['pred_logits']
        ours[f'aux{i}_pred_masks'] = aux['pred_masks']
    multi_scale, panoptic, _ = captured['pd']
    ours['pixel_decoder_panoptic_features'] = panoptic
    for stride, feat in zip((32, 16, 8), multi_scale):
        ours[f'pixel_decoder_multi_scale_os{stride}'] = feat
    for i in range(len(net.transformer_decoder.kmax_transformer_layers)):
        query, prediction = captured[i]
        ours[f'layer{i}_query_out'] = query
        for key in ('class_logits', 'mask_logits', 'pixel_feature'):
            ours[f'layer{i}_{key}'] = prediction[key]
    return ours


@pytest.fixture(scope='module')
def golden_net() -> KMaXNetwork:
    """One float64 network with the golden weights, shared by both canvases."""
    golden = load_golden('kmax', 'small')
    net = _network_from_golden(golden['kwargs'])
    net.load_state_dict(convert_official(golden['state_dict']), strict=True)
    return net


@pytest.mark.parametrize('case', CASES)
def test_matches_official_float64(golden_net, case):
    """Same weights at both golden canvases (128x96 and 129x97): every stored output < 1e-8."""
    golden = load_golden('kmax', case)
    reference = load_golden('kmax', 'small')['state_dict']
    assert all(torch.equal(golden['state_dict'][k], v) for k, v in reference.items())
    ours = _run_with_intermediates(golden_net, golden['features'])
    assert set(ours) == set(golden['outputs'])
    for name, expected in golden['outputs'].items():
        assert ours[name].shape == expected.shape, name
        diff = (ours[name] - expected).abs().max().item()
        assert diff < 1e-8, f'{name}: max |diff| {diff:.3e}'


@pytest.mark.parametrize('case', CASES)
def test_matches_official_float32(case):
    golden = load_golden('kmax', case)
    net = _network_from_golden(golden['kwargs'], torch.float32)
    net.load_state_dict(convert_official(golden['state_dict']), strict=True)
    ours = _run_with_intermediates(net, [f.float() for f in golden['features']])
    for name, expected in golden['outputs'].items():
        diff = (ours[name].double() - expected).abs().max() / expected.abs().max()
        assert diff.item() < 1e-4, f'{name}: max |diff| / max |ref| {diff.item():.3e}'


def test_relative_index_is_official_and_clamps_long_axes():
    rpe = RelativePositionalEncoding(depth=2, max_span=4).double()
    assert rpe.max_span == 4 and rpe.embeddings.num_embeddings == 7
    table = rpe.embeddings.weight
    for length in (1, 3, 4, 7):
        q = torch.arange(length)[:, None]
        k = torch.arange(length)[None, :]
        # official: key_index - query_index + MAX_SPAN - 1 (query length = key length)
        index = (k - q + 3).clamp(0, 6)
        if length <= 4:
            assert index.min() >= 0 and index.max() <= 6  # no clamping needed
        assert torch.equal(rpe(length), table[index])
    assert torch.equal(rpe(7)[0, 6], table[6]) and torch.equal(rpe(7)[6, 0], table[0])


def test_long_axes_reuse_the_end_of_the_table():
    """A short table on long axes = a longer table whose extra rows repeat the end rows."""
    torch.manual_seed(0)
    kwargs = load_golden('kmax', 'small')['kwargs']
    short = _network_from_golden(kwargs, max_span=3)
    long = _network_from_golden(kwargs, max_span=9)
    for p in short.parameters():  # activate the zero-gamma residual branches
        p.data.add_(0.2 * torch.randn_like(p))
    state = short.state_dict()
    for key, value in state.items():
        if key.endswith('rpe.embeddings.weight'):  # 5 rows -> 17 rows: 6 copies of each end
            state[key] = torch.cat([value[:1].expand(6, -1), value, value[-1:].expand(6, -1)])
    long.load_state_dict(state, strict=True)
    # the small_odd sizes: axial stages on 5x4 (stride 32) and 9x7 (stride 16), longer than 3
    feats = load_golden('kmax', 'small_odd')['features']
    with torch.no_grad():
        a, b = short(feats), long(feats)
    for key in ('pred_logits', 'pred_masks', 'pixel_feature'):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-10)


def test_runs_at_other_canvas_sizes(golden_net):
    """Sizes the official code cannot run with the golden canvas: larger, even, batched."""
    torch.manual_seed(0)
    for h, w in [(192, 256), (97, 161)]:
        sizes = [(h // s + h % 2, w // s + w % 2) for s in (4, 8, 16, 32)]
        feats = [torch.randn(2, c, *hw).double() for c, hw in zip([32, 64, 128, 256], sizes)]
        with torch.no_grad():
            out = golden_net(feats)
            single = golden_net([f[1:] for f in feats])
        assert out['pred_logits'].shape == (2, 16, 9)
        assert out['pred_masks'].shape == (2, 16, *sizes[0])
        assert all(a['pred_masks'].shape == (2, 16, *sizes[0]) for a in out['aux_outputs'])
        assert torch.isfinite(out['pred_masks']).all()
        torch.testing.assert_close(out['pred_masks'][1:], single['pred_masks'])


def test_published_coco_r50_keys_map():
    """Every key of the published COCO R50 head maps, with its shape, and nothing is left."""
    published = json.loads((golden_dir('kmax') / 'keys_r50_coco.json').read_text())
    with torch.device('meta'):
        net = KMaXNetwork([256, 512, 1024, 2048], 133, 128)
        fake = {k: torch.empty(shape) for k, shape in published.items()}
    converted = convert_official(fake)
    assert len(converted) == len(published) == 1099
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == ours
    assert sum(math.prod(s) for k, s in ours.items() if 'num_batches' not in k) == 49_089_644


def test_convert_official_checkpoint_forms():
    head = {
        'pixel_decoder._in_norms.0.weight': torch.ones(3),
        'predictor._predcitor._transformer_class_head.conv.bias': torch.zeros(9),
        'predictor._cluster_centers.weight': torch.zeros(256, 4),
    }
    expected = {
        'pixel_decoder.in_norms.0.weight',
        'transformer_decoder.predictor.transformer_class_head.conv.bias',
        'transformer_decoder.cluster_centers.weight',
    }
    assert set(convert_official(head)) == expected
    detectron2 = {f'sem_seg_head.{k}': v.numpy() for k, v in head.items()}
    detectron2['backbone.stem.conv1.weight'] = np.zeros((64, 3, 7, 7), dtype=np.float32)
    detectron2['criterion.empty_weight'] = np.ones(3)
    converted = convert_official({'model': detectron2, '__author__': 'x'})
    assert set(converted) == expected
    assert all(isinstance(v, torch.Tensor) for v in converted.values())
    with pytest.raises(ValueError, match='no kMaX-DeepLab head weights'):
        convert_official({'backbone.stem.conv1.weight': torch.zeros(1)})


def _tiny(aux: str | None = 'aspp', drop_path: float = 0.0, **kwargs) -> KMaXNetwork:
    net_kwargs = dict(
        pixel_decoder=dict(dec_layers=(1, 1, 1, 1), dec_channels=(16, 8, 8, 4)),
        transformer_decoder=dict(
            dec_layers=(1, 1, 1), drop_path_rate=drop_path, aux_semantic_head=aux
        ),
        norm_cfg=BN,
    )
    net_kwargs.update(kwargs)
    return KMaXNetwork([8, 16, 32, 64], 5, 6, **net_kwargs)


def _feats(batch: int = 2, h: int = 64, w: int = 96, channels=(8, 16, 32, 64), strides=None):
    strides = strides or (4, 8, 16, 32)
    return [torch.randn(batch, c, -(-h // s), -(-w // s)) for c, s in zip(channels, strides)]


def _activate_residual_branches(net: nn.Module) -> None:
    """Moves every norm gamma off its init (0 on residual branches, which hides their effect)."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith('norm.weight') or 'batch_norm' in name:
                p.add_(0.5)


@pytest.mark.parametrize('aux, sem_shape', [('aspp', (2, 6, 16, 24)), ('light', (2, 5, 2, 3))])
def test_training_forward_and_gradients(aux, sem_shape):
    """Training mode: aux semantic logits; every parameter gets a gradient but the structural
    zeros (float64, so "zero" means rounding noise only)."""
    torch.manual_seed(0)
    net = _tiny(aux).double().train()
    _activate_residual_branches(net)
    feats = [f.double() for f in _feats()]
    out = net(feats)
    assert out['aux_semantic'].shape == sem_shape
    assert out['pred_masks'].shape == (2, 6, 16, 24)
    tensors = [out['pred_logits'], out['pred_masks'], out['pixel_feature'], out['aux_semantic']]
    tensors += [t for a in out['aux_outputs'] for t in a.values()]
    loss = sum((t * torch.randn_like(t)).sum() for t in tensors)
    loss.backward()
    grads = dict(net.named_parameters())
    assert not [n for n, p in grads.items() if p.grad is None]
    scale = max(p.grad.abs().max().item() for p in grads.values())
    zero = {n for n, p in grads.items() if p.grad.abs().max() < 1e-10 * scale}
    assert zero == {n for n in grads if n.endswith(STRUCTURALLY_ZERO_GRAD)}
    assert 'aux_semantic' not in net.eval()(feats)


def test_inference_mode_then_training():
    """Cached relative-position indices made under inference_mode do not break training."""
    _cached_relative_index.cache_clear()  # process-wide: other tests may have filled it
    net = _tiny(None, drop_path=0.0)
    feats = _feats(h=72, w=40)
    with torch.inference_mode():
        net.eval()(feats)
    net.train()(feats)['pred_masks'].sum().backward()
    assert (
        net.pixel_decoder.stages[0].blocks[0].attention.height_axis.key_rpe.embeddings.weight.grad
        is not None
    )


def test_drop_path_is_active_only_in_training():
    torch.manual_seed(0)
    net = _tiny(None, drop_path=0.5).train()
    _activate_residual_branches(net)
    feats = _feats()
    with torch.no_grad():
        a, b = net(feats), net(feats)
    assert not torch.allclose(a['pred_logits'], b['pred_logits'])
    net.eval()
    with torch.no_grad():
        a, b = net(feats), net(feats)
    assert torch.equal(a['pred_logits'], b['pred_logits'])


def test_syncbn_default_runs_on_cpu_single_process():
    torch.manual_seed(0)
    net = _tiny('aspp', norm_cfg=dict(type='SyncBN', eps=1e-3, momentum=0.01))
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    assert all(m.eps == 1e-3 and m.momentum == 0.01 for m in norms)
    out = net.train()(_feats())
    out['pred_masks'].sum().backward()
    with torch.no_grad():
        assert torch.isfinite(net.eval()(_feats())['pred_masks']).all()
    bn = _tiny('aspp')
    ranks = {
        type(m).__name__ for m in bn.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
    }
    assert ranks == {'BatchNorm1d', 'BatchNorm2d', 'BatchNorm3d'}


def test_official_initialisation():
    torch.manual_seed(0)
    net = _tiny('aspp')
    layer = net.transformer_decoder.kmax_transformer_layers[0]
    block = net.pixel_decoder.stages[0].blocks[0]
    for conv in (block.conv3_bn, layer.query_conv3_bn, layer.query_ffn_conv2_bn):
        assert torch.all(conv.norm.weight == 0)  # zero-gamma residual branches
    assert torch.all(layer.kmeans_query_conv3_bn.norm.weight == 0)
    for predictor in (layer.predictor, net.transformer_decoder.predictor):
        assert torch.all(predictor.pixel_space_mask_batch_norm.weight == 0.1)
        assert torch.all(predictor.transformer_class_head.conv.bias == 0)
    assert torch.all(block.conv1_bn_act.norm.weight == 1)

    def check_trunc_normal(weight: torch.Tensor, std: float) -> None:
        # TF truncated normal: +-2 std of a unit normal, scaled; its std is 0.8796 * std
        assert weight.abs().max() <= 2 * std + 1e-6
        tolerance = 4 / math.sqrt(weight.numel())  # ~5 standard errors of a sample std
        assert abs(weight.std().item() / (0.8796 * std) - 1) < tolerance

    check_trunc_normal(layer.query_ffn_conv1_bn_act.conv.weight, math.sqrt(2 / 256))  # he
    check_trunc_normal(layer.query_qkv_conv_bn.conv.weight, 256**-0.5)
    check_trunc_normal(net.transformer_decoder.cluster_centers.weight, 1.0)
    check_trunc_normal(block.attention.height_axis.value_rpe.embeddings.weight, 1.0)
    # re-initialising (what mmengine's runner calls) restores the same rules
    with torch.no_grad():
        block.conv3_bn.norm.weight.fill_(3.0)
    net.init_weights()
    assert torch.all(block.conv3_bn.norm.weight == 0)


def test_cityscapes_style_fifth_stage():
    """A fifth, finest stage on a stride-2 feature: masks at stride 2; 4 features -> error."""
    torch.manual_seed(0)
    net = KMaXNetwork(
        [8, 8, 16, 32, 64],
        5,
        6,
        pixel_decoder=dict(
            dec_layers=(1, 1, 1, 1, 1),
            dec_channels=(16, 8, 8, 4, 4),
            layer_types=('axial', 'axial', 'bottleneck', 'bottleneck', 'bottleneck'),
        ),
        transformer_decoder=dict(dec_layers=(1, 1, 1), aux_semantic_head='light'),
        norm_cfg=BN,
    ).train()
    feats = _feats(channels=(8, 8, 16, 32, 64), strides=(2, 4, 8, 16, 32))
    out = net(feats)
    assert out['pred_masks'].shape == (2, 6, 32, 48)
    assert out['pixel_feature'].shape == (2, 128, 32, 48)
    assert out['aux_semantic'].shape == (2, 5, 2, 3)
    with pytest.raises(ValueError, match='stem'):
        net(feats[1:])


def test_half_precision_and_autocast():
    """bfloat16 models and CPU autocast run; softmax/LayerNorm/k-means sums stay float32 inside."""
    golden = load_golden('kmax', 'small')
    net = _network_from_golden(golden['kwargs'], torch.float32)
    net.load_state_dict(convert_official(golden['state_dict']), strict=True)
    expected = golden['outputs']['pred_masks']
    feats = [f.float() for f in golden['features']]
    with torch.no_grad():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            amp = net(feats)['pred_masks']
        half = net.to(torch.bfloat16)([f.bfloat16() for f in feats])['pred_masks']
    assert half.dtype == torch.bfloat16
    for out in (amp, half):
        assert (out.double() - expected).abs().max() / expected.abs().max() < 5e-2


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match='one entry per stage'):
        KMaXNetwork([8, 16, 32, 64], 5, pixel_decoder=dict(dec_layers=(1, 1, 1)), norm_cfg=BN)
    with pytest.raises(ValueError, match='do not match the pixel decoder'):
        _tiny(transformer_decoder=dict(dec_layers=(1, 1, 1), in_channels=(1, 2, 3, 4)))
    with pytest.raises(ValueError, match='block type'):
        _tiny(pixel_decoder=dict(dec_channels=(16, 8, 8, 4), layer_types=('x',) * 4))
    with pytest.raises(ValueError, match='aux_semantic_head'):
        _tiny('aspp_light')
    with pytest.raises(ValueError, match='takes 4 features'):
        _tiny()(_feats()[:3])


@pytest.mark.slow
def test_export_keeps_sizes_symbolic():
    """torch.export with dynamic H, W (align_corners parities included) matches eager."""
    torch.manual_seed(0)
    net = _tiny(None).eval()

    class Wrapper(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, res2, res3, res4, res5):
            out = self.net([res2, res3, res4, res5])
            return out['pred_logits'], out['pred_masks'], out['aux_outputs'][0]['pred_masks']

    dims = [(torch.export.Dim(f'h{i}', min=2), torch.export.Dim(f'w{i}', min=2)) for i in range(4)]
    program = torch.export.export(
        Wrapper(net),
        tuple(_feats(1, 64, 96)),
        dynamic_shapes=tuple({2: h, 3: w} for h, w in dims),
    ).module()
    for h, w in [(64, 96), (129, 97)]:
        feats = [
            torch.randn(1, c, h // s + h % 2, w // s + w % 2)
            for c, s in zip((8, 16, 32, 64), (4, 8, 16, 32))
        ]
        with torch.no_grad():
            expected = Wrapper(net)(*feats)
        for a, b in zip(program(*feats), expected):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
