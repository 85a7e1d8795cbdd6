"""PEM network: golden parity with the official head, its quirk options, DCN paths, export."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from effvision.models.decode_heads.pem_head import (
    CSM,
    DeformLayer,
    ModulatedDeformConv,
    PEMNetwork,
    PrototypeCrossAttention,
    SinePositionalEncoding,
    convert_official,
    modulated_deform_conv2d_reference,
)
from tests.conftest import golden_dir, load_golden

CASES = ['small', 'small_odd']


def _official_network(kwargs: dict, **options) -> PEMNetwork:
    """Our network built from the golden file's official constructor arguments."""
    dec = kwargs['transformer_decoder']
    pix = kwargs['pixel_decoder']
    return PEMNetwork(
        kwargs['backbone_channels'],
        dec['num_classes'],
        conv_dim=pix['conv_dim'],
        mask_dim=pix['mask_dim'],
        hidden_dim=dec['hidden_dim'],
        num_queries=dec['num_queries'],
        num_heads=dec['nheads'],
        dim_feedforward=dec['dim_feedforward'],
        num_layers=dec['dec_layers'],
        pre_norm=dec['pre_norm'],
        enforce_input_project=dec['enforce_input_project'],
        **options,
    )


def _run_golden(case: str, dtype=torch.float64, **options) -> tuple[dict, dict]:
    """Every golden output of ``case`` from our network (hooks for the intermediate ones)."""
    golden = load_golden('pem', case)
    net = _official_network(golden['kwargs'], **options).to(dtype).eval()
    net.load_state_dict(convert_official(golden['state_dict']), strict=True)
    got = {}

    def pixel_hook(module, args, out):
        got['pixel_decoder_mask_features'] = out[0]
        for name, x in zip(('os32', 'os16', 'os8'), out[1]):
            got[f'pixel_decoder_multi_scale_{name}'] = x

    net.pixel_decoder.register_forward_hook(pixel_hook)
    for i, layer in enumerate(net.pixel_decoder.dcn):
        layer.register_forward_hook(
            lambda m, a, out, i=i: got.__setitem__(f'pixel_decoder_dcn{i}_upsampled', out[1])
        )
    for i, layer in enumerate(net.predictor.transformer_ffn_layers):
        # The official queries are (Q, B, C); ours are batch-first.
        layer.register_forward_hook(
            lambda m, a, out, i=i: got.__setitem__(f'layer{i}_query_out', out.transpose(0, 1))
        )
    with torch.no_grad():
        out = net([f.to(dtype) for f in golden['features']])
    got['pred_logits'], got['pred_masks'] = out['pred_logits'], out['pred_masks']
    for i, aux in enumerate(out['aux_outputs']):
        got[f'aux{i}_pred_logits'] = aux['pred_logits']
        got[f'aux{i}_pred_masks'] = aux['pred_masks']
    return got, golden['outputs']


def _max_diffs(got: dict, expected: dict) -> dict[str, float]:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].shape == value.shape, key
    return {k: (got[k].double() - v).abs().max().item() for k, v in expected.items()}


# ---------------------------------------------------------------------------------------------
# Golden parity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('dcn_impl', ['torchvision', 'pytorch'])
@pytest.mark.parametrize('case', CASES)
def test_matches_official_float64(case, dcn_impl):
    """Every stored output (final, aux0-3, pixel decoder incl. DCN upsampling, per-layer
    queries) at the README tolerance; measured ~1e-14."""
    diffs = _max_diffs(*_run_golden(case, dcn_impl=dcn_impl))
    assert max(diffs.values()) < 1e-9, diffs


@pytest.mark.parametrize('case', CASES)
def test_matches_official_float32(case):
    diffs = _max_diffs(*_run_golden(case, dtype=torch.float32))
    assert max(diffs.values()) < 5e-5, diffs


def test_published_keys_map():
    """Every key of the published ADE20K R50 head converts to one of ours, with its shape."""
    keys = json.loads((golden_dir('pem') / 'keys_r50_ade20k_semantic.json').read_text())
    net = PEMNetwork([256, 512, 1024, 2048], 150)
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    official = {k: torch.empty(shape, device='meta') for k, shape in keys.items()}
    converted = {k: list(v.shape) for k, v in convert_official(official).items()}
    assert converted == ours


def test_convert_detectron2_checkpoint_forms():
    golden = load_golden('pem', 'small')
    head = golden['state_dict']
    stem = torch.ones(4, 3, 7, 7)
    checkpoint = {
        'model': {
            **{f'sem_seg_head.{k}': v.numpy() for k, v in head.items()},
            'backbone.stem.conv1.weight': stem,
        },
        'iteration': 10,
    }
    converted = convert_official(checkpoint, prefix='decode_head.')
    assert converted.pop('backbone.stem.conv1.weight') is stem
    assert set(converted) == {f'decode_head.{k}' for k in head}
    for key, value in head.items():
        torch.testing.assert_close(converted[f'decode_head.{key}'], value, rtol=0, atol=0)
    legacy = convert_official({'predictor.static_query.weight': torch.zeros(16, 32)})
    assert set(legacy) == {'predictor.query_feat.weight'}


# ---------------------------------------------------------------------------------------------
# Official quirks behind options: each flip changes the result, and does what its name says
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'option, key, low, high',
    [
        # Paper-style single sigmoid and per-query L2 normalisation change results outright.
        (dict(csm_double_sigmoid=False), 'pixel_decoder_mask_features', 1e-2, None),
        (dict(normalize_over_queries=False), 'layer0_query_out', 1e-2, None),
        # Both fixtures have fully masked queries at layer 0 (argmax diagnostics).
        (dict(unmask_rule='per_query'), 'layer0_query_out', 1e-2, None),
        # float64 encodings: a rounding-level change, within the README's 2e-6.
        (dict(pos_encoding_float32=False), 'pred_masks', 1e-9, 2e-6),
    ],
    ids=['csm_single_sigmoid', 'normalize_over_channels', 'unmask_per_query', 'pos_encoding_f64'],
)
def test_flipping_an_official_quirk_changes_the_output(option, key, low, high):
    got, expected = _run_golden('small', **option)
    diff = (got[key] - expected[key]).abs().max().item()
    assert diff > low
    if high is not None:
        assert max(_max_diffs(got, expected).values()) < high


def test_csm_sigmoid_count():
    csm = CSM(8, norm_cfg=dict(type='BN'), double_sigmoid=True).eval()
    x = torch.randn(2, 8, 5, 3)
    gate_logits = csm.mlp[0](x.mean(dim=(2, 3), keepdim=True))
    with torch.no_grad():
        torch.testing.assert_close(csm(x), x + x * gate_logits.sigmoid().sigmoid())
        csm.double_sigmoid = False
        torch.testing.assert_close(csm(x), x + x * gate_logits.sigmoid())


@pytest.mark.parametrize('over_queries, dim', [(True, 1), (False, -1)])
def test_prototype_update_normalisation_axis(over_queries, dim):
    layer = PrototypeCrossAttention(
        16, 2, norm_cfg=dict(type='BN'), normalize_over_queries=over_queries
    ).eval()
    torch.nn.init.normal_(layer.alpha, mean=1.0, std=0.5)
    seen = {}
    layer.proj.register_forward_hook(lambda m, a, out: seen.__setitem__('proj', out))
    layer.final.register_forward_hook(lambda m, a, out: seen.__setitem__('final_in', a[0]))
    query, query_pos = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    memory, pos = torch.randn(2, 16, 4, 3), torch.randn(1, 16, 4, 3)
    with torch.no_grad():
        layer(query, memory, pos, query_pos, mask_logits=None)
        tokens = F.normalize(layer.feature_proj(memory + pos), dim=-1)
        queries = F.normalize(layer.query_proj(query + query_pos), dim=-1)
        prototypes = layer.select_prototypes(tokens, queries, None)
    normalised = (seen['final_in'] - prototypes) / layer.alpha
    torch.testing.assert_close(normalised, F.normalize(seen['proj'], dim=dim))
    norms = normalised.norm(dim=dim)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_unmask_rules():
    """'all_queries' lifts the mask only when every query is fully masked; 'per_query' lifts
    it for each fully masked query. Tokens are one-hot so the best token is known."""
    layer = PrototypeCrossAttention(4, 1, norm_cfg=dict(type='BN'))
    tokens = torch.eye(4).unsqueeze(0)  # (1, N=4, C=4), token n = e_n
    queries = torch.tensor([[[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]])  # best: 2 and 3
    logits = torch.ones(1, 2, 2, 2)  # (B, Q, H, W) with H * W = 4
    logits[0, 0] = -1.0  # query 0 fully masked
    logits[0, 1].view(-1)[3] = -1.0  # query 1 may not use token 3; its best allowed is 0
    expected_second = tokens[0, 0]

    layer.unmask_rule = 'all_queries'
    picked = layer.select_prototypes(tokens, queries, logits)
    torch.testing.assert_close(picked[0, 0], tokens[0, 0])  # all -inf: argmax is token 0
    torch.testing.assert_close(picked[0, 1], expected_second)

    layer.unmask_rule = 'per_query'
    picked = layer.select_prototypes(tokens, queries, logits)
    torch.testing.assert_close(picked[0, 0], tokens[0, 2])  # unmasked: its best token
    torch.testing.assert_close(picked[0, 1], expected_second)

    every_query_masked = -torch.ones(1, 2, 2, 2)
    for rule in ('all_queries', 'per_query'):
        layer.unmask_rule = rule
        picked = layer.select_prototypes(tokens, queries, every_query_masked)
        torch.testing.assert_close(picked[0], tokens[0, 2:4])


def test_positional_encoding_dtype_option():
    x = torch.zeros(1, 1, 3, 5, dtype=torch.float64)
    pe32 = SinePositionalEncoding(8, float32=True)(x)
    pe64 = SinePositionalEncoding(8, float32=False)(x)
    assert pe32.dtype == torch.float32 and pe64.dtype == torch.float64
    assert pe32.shape == pe64.shape == (1, 16, 3, 5)
    diff = (pe32.double() - pe64).abs().max().item()
    assert 0 < diff < 1e-6
    # Channel 0 is sin(y-coordinate), channel 8 sin(x-coordinate); the last row/column sits at
    # 2 pi / (1 + eps / size).
    for size, got in ((3, pe64[0, 0, :, 0]), (5, pe64[0, 8, 0, :])):
        coord = torch.arange(1, size + 1, dtype=torch.float64)
        torch.testing.assert_close(got, torch.sin(coord / (size + 1e-6) * 2 * torch.pi))


# ---------------------------------------------------------------------------------------------
# Modulated deformable conv
# ---------------------------------------------------------------------------------------------


def _dcn_inputs(h, w, dtype, stride=1, padding=1, dilation=1, channels=6):
    gen = torch.Generator().manual_seed(h * 31 + w)
    h_out = (h + 2 * padding - dilation * 2 - 1) // stride + 1
    w_out = (w + 2 * padding - dilation * 2 - 1) // stride + 1
    x = torch.randn(2, channels, h, w, generator=gen, dtype=dtype)
    # std 3 px: many samples fall partly or fully outside the map.
    offset = 3 * torch.randn(2, 18, h_out, w_out, generator=gen, dtype=dtype)
    mask = torch.rand(2, 9, h_out, w_out, generator=gen, dtype=dtype)
    weight = torch.randn(5, channels, 3, 3, generator=gen, dtype=dtype) / 5
    bias = torch.randn(5, generator=gen, dtype=dtype)
    return x, offset, mask, weight, bias


@pytest.mark.parametrize('geometry', [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
@pytest.mark.parametrize('size', [(7, 11), (1, 5)])
@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_dcn_reference_matches_torchvision(geometry, size, dtype, tol):
    stride, padding, dilation = geometry
    inputs = [
        t.requires_grad_()
        for t in _dcn_inputs(*size, dtype, stride=stride, padding=padding, dilation=dilation)
    ]
    x, offset, mask, weight, bias = inputs
    kwargs = dict(stride=stride, padding=padding, dilation=dilation)
    ours = modulated_deform_conv2d_reference(x, offset, mask, weight, bias, **kwargs)
    theirs = deform_conv2d(x, offset, weight, bias, mask=mask, **kwargs)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < tol
    if dtype == torch.float64:
        probe = torch.randn_like(ours)
        grads_ours = torch.autograd.grad((ours * probe).sum(), inputs)
        grads_theirs = torch.autograd.grad((theirs * probe).sum(), inputs)
        for name, a, b in zip(('x', 'offset', 'mask', 'weight', 'bias'), grads_ours, grads_theirs):
            assert (a - b).abs().max().item() < 1e-9, name


@pytest.mark.parametrize('impl', ['torchvision', 'pytorch'])
def test_dcn_offset_layout_is_interleaved_dy_dx(impl):
    """Channel 2k shifts tap k down, channel 2k + 1 right: a +1 shift of every tap equals a
    valid conv of the map padded by (0, 2) on that axis and (1, 1) on the other."""
    dcn = ModulatedDeformConv(4, 3, impl=impl).double()
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    mask = torch.ones(1, 9, 5, 6, dtype=torch.float64)
    for axis, pad in ((0, (1, 1, 0, 2)), (1, (0, 2, 1, 1))):
        offset = torch.zeros(1, 18, 5, 6, dtype=torch.float64)
        offset[:, axis::2] = 1.0
        expected = F.conv2d(F.pad(x, pad), dcn.weight)
        torch.testing.assert_close(dcn(x, offset, mask), expected)


def test_deform_layer_official_init():
    layer = DeformLayer(6, 6, norm_cfg=dict(type='BN')).eval()
    x = torch.randn(2, 6, 5, 4)
    offset_mask = layer.dcn_offset(x)
    assert not offset_mask.any()  # zero offsets, mask logits 0 -> sigmoid 0.5
    with torch.no_grad():
        torch.testing.assert_close(
            layer.dcn(x, offset_mask[:, :18], offset_mask[:, 18:].sigmoid()),
            0.5 * F.conv2d(x, layer.dcn.weight, padding=1),
        )
    ramp = torch.tensor([0.25, 0.75, 0.75, 0.25])
    bilinear = torch.outer(ramp, ramp).expand(6, 4, 4)
    torch.testing.assert_close(layer.up_sample.weight[:, 0], bilinear)
    # Only output channel 0 is bilinear, as official; the rest keep the default init.
    assert not torch.allclose(layer.up_sample.weight[:, 1], bilinear)


def test_unsupported_dcn_settings_raise():
    with pytest.raises(ValueError, match='impl'):
        ModulatedDeformConv(4, 4, impl='mmcv')
    x, offset, mask, _, _ = _dcn_inputs(5, 5, torch.float32)
    with pytest.raises(ValueError, match='grouped'):
        modulated_deform_conv2d_reference(x, offset, mask, torch.randn(4, 3, 3, 3))


# ---------------------------------------------------------------------------------------------
# Shapes, errors, training
# ---------------------------------------------------------------------------------------------

TINY = dict(
    conv_dim=16,
    mask_dim=16,
    hidden_dim=16,
    num_queries=6,
    num_heads=2,
    dim_feedforward=32,
    num_layers=4,
)
TINY_CHANNELS = [8, 16, 24, 32]


def _feats(sizes, batch=1, channels=TINY_CHANNELS):
    return [torch.randn(batch, c, h, w) for c, (h, w) in zip(channels, sizes)]


def test_ceil_halved_levels_are_cropped():
    """A 129x97 image through a ceil-mode backbone: the official code fails; we crop the
    upsampled maps to the next level and predict at the stride-4 size."""
    net = PEMNetwork(TINY_CHANNELS, 3, **TINY).eval()
    with torch.no_grad():
        out = net(_feats([(33, 25), (17, 13), (9, 7), (5, 4)], batch=2))
    assert out['pred_logits'].shape == (2, 6, 4)
    assert out['pred_masks'].shape == (2, 6, 33, 25)
    assert len(out['aux_outputs']) == 4
    assert all(a['pred_masks'].shape == (2, 6, 33, 25) for a in out['aux_outputs'])


def test_floor_halved_levels_raise_with_the_fix():
    net = PEMNetwork(TINY_CHANNELS, 3, **TINY).eval()
    with pytest.raises(RuntimeError, match='multiple of 32'):
        net(_feats([(33, 25), (16, 12), (8, 6), (4, 3)]))


def test_bad_inputs_raise():
    net = PEMNetwork(TINY_CHANNELS, 3, **TINY).eval()
    with pytest.raises(ValueError, match='4 levels'):
        net(_feats([(16, 16), (8, 8), (4, 4)]))
    with pytest.raises(ValueError, match=r'level 2 .*\(B, 24, H, W\)'):
        net(_feats([(16, 16), (8, 8), (4, 4), (2, 2)], channels=[8, 16, 20, 32]))
    with pytest.raises(ValueError, match='out_indices'):
        PEMNetwork([8, 16, 24], 3)
    with pytest.raises(ValueError, match='divisible'):
        PEMNetwork(TINY_CHANNELS, 3, **{**TINY, 'num_heads': 3})
    with pytest.raises(ValueError, match='unmask_rule'):
        PEMNetwork(TINY_CHANNELS, 3, unmask_rule='mask2former')


@pytest.mark.parametrize('dcn_impl', ['torchvision', 'pytorch'])
def test_training_forward_reaches_every_parameter(dcn_impl):
    net = PEMNetwork(TINY_CHANNELS, 3, dcn_impl=dcn_impl, **TINY).train()
    out = net(_feats([(16, 16), (8, 8), (4, 4), (2, 2)], batch=2))
    predictions = [out, *out['aux_outputs']]
    loss = sum(
        p['pred_logits'].square().mean() + p['pred_masks'].square().mean() for p in predictions
    )
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing
    # SyncBN (the default norm) falls back to batch statistics outside distributed training.
    assert net.pixel_decoder.out.bn.num_batches_tracked.item() == 1


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def _export_and_run(module, example, second, opset, tmp_path):
    """Dynamic-H/W dynamo export, then onnxruntime at the example and a second size."""
    ort = pytest.importorskip('onnxruntime')
    from torch.export import Dim

    dims = {2: Dim('H', min=2, max=1024), 3: Dim('W', min=2, max=1024)}
    path = tmp_path / 'model.onnx'
    torch.onnx.export(
        module,
        example,
        path,
        dynamo=True,
        opset_version=opset,
        dynamic_shapes=tuple(dims for _ in example),
        verbose=False,
    )
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    diffs = []
    for inputs in (example, second):
        feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
        got = torch.from_numpy(session.run(None, feed)[0])
        with torch.no_grad():
            diffs.append((got - module(*inputs)).abs().max().item())
    return diffs


@pytest.mark.parametrize('impl, opset', [('pytorch', 18), ('torchvision', 19)])
def test_dcn_exports_to_onnxruntime(impl, opset, tmp_path):
    """The measured export paths: the pure-PyTorch DCN at the deploy default opset 18, and
    torchvision's op, which becomes ONNX DeformConv, from opset 19 on."""
    dcn = ModulatedDeformConv(6, 5, impl=impl).eval()
    example = _dcn_inputs(12, 10, torch.float32)[:3]
    second = _dcn_inputs(23, 17, torch.float32)[:3]
    assert max(_export_and_run(dcn, example, second, opset, tmp_path)) < 1e-5


@pytest.mark.slow  # ~50 s on 2 cores (dynamo export of the whole decoder)
def test_network_exports_with_dynamic_size(tmp_path):
    class Logits(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, image):
            feats, x = [], image
            for i, channels in enumerate(TINY_CHANNELS):
                x = F.avg_pool2d(x, 4 if i == 0 else 2, ceil_mode=True)
                feats.append(x[:, :1].expand(-1, channels, -1, -1) * (i + 1))
            return self.net(feats)['pred_masks']

    net = PEMNetwork(TINY_CHANNELS, 3, norm_cfg=dict(type='BN'), dcn_impl='pytorch', **TINY)
    for layer in net.pixel_decoder.dcn:
        torch.nn.init.normal_(layer.dcn_offset.weight, std=0.3)
    model = Logits(net).eval()
    # The second size is not a multiple of 32: the crop path is in the graph too.
    diffs = _export_and_run(
        model, (torch.randn(1, 3, 128, 96),), (torch.randn(1, 3, 100, 70),), 18, tmp_path
    )
    assert max(diffs) < 1e-4


@pytest.mark.gpu
def test_matches_official_float64_cuda():
    golden = load_golden('pem', 'small_odd')
    net = _official_network(golden['kwargs']).double().cuda().eval()
    net.load_state_dict(convert_official(golden['state_dict']), strict=True)
    with torch.no_grad():
        out = net([f.cuda() for f in golden['features']])
    diff = (out['pred_masks'].cpu() - golden['outputs']['pred_masks']).abs().max().item()
    assert diff < 1e-9
