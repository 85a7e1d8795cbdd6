"""Shared mask-classification pieces: targets, semantic inference, both panoptic merging rules."""

from __future__ import annotations

import math

import pytest
import torch
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks
from mmengine.structures import InstanceData, PixelData
from mmseg.structures import SegDataSample

from effvision.models.decode_heads.mask_classification import (
    INSTANCE_OFFSET,
    MaskClassificationHead,
    kmax_panoptic_inference,
    maskformer_panoptic_inference,
    semantic_inference,
)
from effvision.models.segmentors.mask_classifier import MaskClassificationFusionHead

BIG = 20.0  # a logit whose sigmoid / softmax is 1 to float32 precision


def _cls(rows: list[list[float]]) -> torch.Tensor:
    """Class logits from probabilities (log, so softmax gives them back)."""
    return torch.tensor(rows).clamp(min=1e-12).log()


def test_semantic_inference_is_class_prob_times_mask_prob():
    cls = _cls([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])[None]  # 2 queries, 2 classes + void
    masks = torch.tensor([[[0.0]], [[math.log(3.0)]]])[None]  # sigmoid: 0.5 and 0.75
    out = semantic_inference(cls, masks, 'sigmoid')
    expected = torch.tensor([0.6 * 0.5 + 0.2 * 0.75, 0.3 * 0.5 + 0.2 * 0.75])
    torch.testing.assert_close(out[0, :, 0, 0], expected)
    # softmax over the queries: the two masks share each pixel (1/4 and 3/4)
    out = semantic_inference(cls, masks, 'softmax')
    expected = torch.tensor([0.6 * 0.25 + 0.2 * 0.75, 0.3 * 0.25 + 0.2 * 0.75])
    torch.testing.assert_close(out[0, :, 0, 0], expected)
    with pytest.raises(ValueError, match='mask activation'):
        semantic_inference(cls, masks, 'relu')


def _masks(*regions: tuple[slice, slice], size=(4, 4), inside=BIG, outside=-BIG) -> torch.Tensor:
    out = torch.full((len(regions), *size), outside)
    for q, (rows, cols) in enumerate(regions):
        out[q, rows, cols] = inside
    return out


def test_maskformer_rule_things_stuff_void_and_overlap():
    # 2 things (labels 0, 1), 1 stuff (label 2); K = 3, void = 3.
    cls = _cls(
        [
            [0.9, 0.05, 0.03, 0.02],  # thing 0, left half
            [0.01, 0.95, 0.02, 0.02],  # thing 1, top-right quarter (outscores query 2)
            [0.05, 0.02, 0.9, 0.03],  # stuff, right half (loses the top-right to query 1)
            [0.05, 0.02, 0.03, 0.9],  # no-object
            [0.5, 0.2, 0.2, 0.1],  # below object_mask_thr 0.8
        ]
    )
    masks = _masks(
        (slice(None), slice(0, 2)),
        (slice(0, 2), slice(2, 4)),
        (slice(None), slice(2, 4)),
        (slice(None), slice(None)),
        (slice(None), slice(None)),
    )
    # query 2 wins only half of its own mask: dropped at overlap 0.8, kept at 0.4.
    out = maskformer_panoptic_inference(cls, masks, num_things=2, overlap_thr=0.8)
    expected = torch.full((4, 4), 3)
    expected[:, :2] = 0 + 1 * INSTANCE_OFFSET
    expected[:2, 2:] = 1 + 2 * INSTANCE_OFFSET
    assert torch.equal(out, expected)
    out = maskformer_panoptic_inference(cls, masks, num_things=2, overlap_thr=0.4)
    expected[2:, 2:] = 2
    assert torch.equal(out, expected)


def test_maskformer_rule_merges_stuff_and_handles_nothing_kept():
    cls = _cls([[0.02, 0.95, 0.03], [0.02, 0.95, 0.03]])  # two stuff queries of class 1
    masks = _masks((slice(0, 2), slice(None)), (slice(2, 4), slice(None)))
    out = maskformer_panoptic_inference(cls, masks, num_things=1)
    assert torch.equal(out, torch.ones(4, 4, dtype=torch.long))
    empty = maskformer_panoptic_inference(cls, masks, num_things=1, object_mask_thr=0.99)
    assert torch.equal(empty, torch.full((4, 4), 2))


def test_kmax_rule_ranks_thresholds_and_pastes_free_pixels():
    # Softmax over queries: where a query's logit is BIG it owns the pixel.
    cls = _cls(
        [
            [0.8, 0.1, 0.05, 0.05],  # thing 0 (score 0.8 > 0.7), left half
            [0.1, 0.65, 0.2, 0.05],  # thing 1 but score 0.65 < thing_thr 0.7: skipped
            [0.05, 0.05, 0.6, 0.3],  # stuff 2 (0.6 > 0.5), right half
            [0.05, 0.05, 0.55, 0.35],  # stuff 2 again: merges into the same segment
        ]
    )
    masks = torch.full((4, 4, 4), -BIG)
    masks[0, :, :2] = BIG
    masks[1, 0, 0] = 2 * BIG  # steals one pixel from query 0 but is not confident
    masks[2, :2, 2:] = BIG
    masks[3, 2:, 2:] = BIG
    out = kmax_panoptic_inference(cls, masks, num_things=2)
    expected = torch.full((4, 4), 3)
    expected[:, :2] = 0 + 1 * INSTANCE_OFFSET
    expected[0, 0] = 3  # query 1 owns it, is skipped, so nobody pastes it
    expected[:, 2:] = 2
    assert torch.equal(out, expected)
    # a stricter stuff threshold drops both stuff queries
    out = kmax_panoptic_inference(cls, masks, num_things=2, stuff_thr=0.65)
    assert (out[:, 2:] == 3).all()


def test_kmax_rule_overlap_is_strict_and_ranking_decides():
    # two confident things with the same mask: the better-ranked one takes it, the other has no
    # free pixels left (0 > 0.8 * area is false).
    cls = _cls([[0.75, 0.1, 0.15], [0.9, 0.05, 0.05]])
    masks = torch.zeros(2, 2, 2)  # softmax 0.5 each > pixel threshold 0.4: both own everything
    out = kmax_panoptic_inference(cls, masks, num_things=2)
    assert torch.equal(out, torch.full((2, 2), 0 + 1 * INSTANCE_OFFSET))


def _seg_sample(label: torch.Tensor) -> SegDataSample:
    sample = SegDataSample()
    sample.gt_sem_seg = PixelData(data=label[None])
    return sample


class _Head(MaskClassificationHead):
    def forward(self, inputs):
        raise NotImplementedError


def test_semantic_targets_one_mask_per_present_class_padded_as_void():
    head = _Head(num_classes=4)
    label = torch.tensor([[0, 0, 2], [255, 2, 2]])
    (target,) = head.get_targets([_seg_sample(label)], pad_shape=(3, 4))
    assert target['labels'].tolist() == [0, 2]
    assert target['masks'].shape == (2, 3, 4) and target['masks'].dtype == torch.bool
    assert target['masks'][0].sum() == 2 and target['masks'][1].sum() == 3
    assert not target['masks'][:, 2:, :].any() and not target['masks'][:, :, 3].any()
    assert (target['semantic'][2] == 255).all() and target['semantic'][1, 0] == 255


def test_panoptic_targets_things_then_stuff():
    head = _Head(num_classes=4, num_things_classes=2, num_stuff_classes=2)
    sample = DetDataSample()
    thing = torch.zeros(1, 2, 3, dtype=torch.uint8)
    thing[0, 0, 0] = 1
    sample.gt_instances = InstanceData(
        labels=torch.tensor([1]), masks=BitmapMasks(thing.numpy(), 2, 3)
    )
    # mmdet's gt_seg_map: thing AND stuff labels, 255 void; PackDetInputs stores it as sem_seg
    sample.gt_sem_seg = PixelData(sem_seg=torch.tensor([[[1, 3, 3], [2, 255, 3]]]))
    (target,) = head.get_targets([sample], pad_shape=(2, 3))
    assert target['labels'].tolist() == [1, 2, 3]
    assert target['masks'][0].nonzero().tolist() == [[0, 0]]
    assert target['masks'][2].sum() == 3
    with pytest.raises(ValueError, match='num_things_classes'):
        _Head(num_classes=4).get_targets([sample], pad_shape=(2, 3))


def test_head_rejects_inconsistent_class_counts():
    with pytest.raises(ValueError, match='must equal num_classes'):
        _Head(num_classes=4, num_things_classes=2, num_stuff_classes=1)
    with pytest.raises(ValueError, match='both'):
        _Head(num_classes=4, num_things_classes=2)


@pytest.mark.parametrize('rule', ['maskformer', 'kmax'])
def test_fusion_head_crops_padding_rescales_and_returns_both_maps(rule):
    head = MaskClassificationFusionHead(num_things_classes=2, num_stuff_classes=1, rule=rule)
    cls = _cls([[0.02, 0.95, 0.02, 0.01], [0.02, 0.02, 0.95, 0.01]])[None]
    masks = torch.full((1, 2, 8, 10), -BIG)
    masks[0, 0, :, :4] = BIG
    masks[0, 1, :, 4:] = BIG
    sample = DetDataSample(
        metainfo=dict(img_shape=(6, 8), ori_shape=(12, 16), batch_input_shape=(8, 10))
    )
    (result,) = head.predict(cls, masks, [sample], rescale=True)
    pan = result['pan_results'].sem_seg
    sem = result['sem_results'].sem_seg
    assert pan.shape == sem.shape == (1, 12, 16)
    assert (pan[0, :, :7] == 1 + INSTANCE_OFFSET).all() and (pan[0, :, 9:] == 2).all()
    assert (sem[0, :, :7] == 1).all() and (sem[0, :, 9:] == 2).all()


def test_fusion_head_rejects_unknown_thresholds():
    with pytest.raises(ValueError, match='unknown test_cfg keys'):
        MaskClassificationFusionHead(2, 1, rule='kmax', test_cfg=dict(object_mask_thr=0.8))
    with pytest.raises(ValueError, match='rule must be'):
        MaskClassificationFusionHead(2, 1, rule='detr')
