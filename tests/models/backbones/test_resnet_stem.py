"""ResNetWithStem: mmdet's ResNet plus its stem feature, for kMaX-DeepLab's five-stage decoder."""

from __future__ import annotations

import pytest
import torch
from mmdet.models.backbones import ResNet

from effvision.models.backbones import ResNetWithStem
from effvision.models.decode_heads.kmax_head import KMaXNetwork
from effvision.registry import MODELS

BN = dict(type='BN', eps=1e-3, momentum=0.01)


def _pair(out_indices, stem_out_position) -> tuple[ResNet, ResNetWithStem]:
    torch.manual_seed(0)
    plain = ResNet(depth=18, norm_cfg=BN, out_indices=out_indices)
    with_stem = ResNetWithStem(
        depth=18, norm_cfg=BN, out_indices=out_indices, stem_out_position=stem_out_position
    )
    with_stem.load_state_dict(plain.state_dict(), strict=True)  # same keys, same weights
    plain.eval()  # mmdet's ResNet.train() returns None: no chaining
    with_stem.eval()
    return plain, with_stem


@pytest.mark.parametrize('position', [0, 1, 2, 4])
def test_stage_outputs_are_mmdet_resnets_and_the_stem_is_inserted(position):
    plain, with_stem = _pair(out_indices=(0, 1, 2, 3), stem_out_position=position)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = plain(x)
        stem = plain.maxpool(plain.relu(plain.norm1(plain.conv1(x))))
        outs = with_stem(x)
    assert len(outs) == 5
    assert torch.equal(outs[position], stem)
    assert stem.shape == (2, 64, 16, 24)
    rest = outs[:position] + outs[position + 1 :]
    for got, want in zip(rest, expected, strict=True):
        assert torch.equal(got, want)


def test_out_indices_subset_and_bad_position():
    _, with_stem = _pair(out_indices=(1, 3), stem_out_position=2)
    with torch.no_grad():
        outs = with_stem(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [128, 512, 64]
    with pytest.raises(ValueError, match=r'stem_out_position must be in \[0, 2\]'):
        ResNetWithStem(depth=18, out_indices=(1, 3), stem_out_position=3)


def test_registered_and_feeds_the_five_stage_kmax_decoder():
    backbone = MODELS.build(dict(type='ResNetWithStem', depth=18, norm_cfg=BN, stem_out_position=1))
    backbone.eval()
    # official Cityscapes order [res2, stem, res3, res4, res5] (ResNet-18 widths)
    net = KMaXNetwork(
        [64, 64, 128, 256, 512],
        5,
        8,
        pixel_decoder=dict(
            dec_layers=(1, 1, 1, 1, 1),
            dec_channels=(32, 16, 16, 8, 8),
            layer_types=('axial', 'axial', 'bottleneck', 'bottleneck', 'bottleneck'),
        ),
        transformer_decoder=dict(dec_layers=(1, 1, 1), aux_semantic_head='light'),
        norm_cfg=BN,
    ).eval()
    with torch.no_grad():
        out = net(list(backbone(torch.randn(1, 3, 65, 97))))
    # the finest stage runs at the stem's stride 4
    assert out['pred_logits'].shape == (1, 8, 6)
    assert out['pred_masks'].shape[-2:] == (17, 25)
