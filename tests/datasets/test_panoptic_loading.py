"""LoadCocoPanopticAnnotations: mmdet's LoadPanopticAnnotations without panopticapi."""

from __future__ import annotations

import sys
import types

import cv2
import numpy as np
import pytest
import torch
from mmdet.structures.bbox import HorizontalBoxes
from mmdet.structures.mask import BitmapMasks

from effvision.datasets import LoadCocoPanopticAnnotations
from effvision.datasets.transforms import rgb2id
from effvision.registry import TRANSFORMS

# Labels: things 0 (a), 1 (b); stuff 2 (s), 3 (t).
H, W = 6, 8


def panoptic_png(path) -> str:
    """Segment ids: s (id 5) left, t (id 70000, needs the G and B channels) right, a thing of
    each class, a crowd region of a (id 7), VOID (0) and an id missing from segments_info (9)."""
    ids = np.full((H, W), 5)
    ids[:, 4:] = 70000
    ids[0:2, 0:2] = 1001
    ids[3:5, 5:8] = 2001
    ids[4:6, 0:3] = 7
    ids[0, 4:8] = 0
    ids[5, 7] = 9
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    assert cv2.imwrite(str(path), rgb[..., ::-1])
    return str(path)


def results_dict(path: str) -> dict:
    """What CocoPanopticDataset + LoadImageFromFile hand to the loader."""
    return dict(
        seg_map_path=path,
        ori_shape=(H, W),
        height=H,
        width=W,
        instances=[
            dict(bbox=[0.0, 0.0, 2.0, 2.0], bbox_label=0, ignore_flag=0),
            dict(bbox=[5.0, 3.0, 8.0, 5.0], bbox_label=1, ignore_flag=0),
        ],
        segments_info=[
            dict(id=5, category=2, is_thing=False),
            dict(id=70000, category=3, is_thing=False),
            dict(id=1001, category=0, is_thing=True),
            dict(id=2001, category=1, is_thing=True),
            dict(id=7, category=0, is_thing=False),  # crowd: the dataset clears is_thing
        ],
    )


def test_rgb2id():
    color = np.array([[[1, 0, 0], [0, 1, 0], [0, 0, 1], [255, 255, 255]]], np.uint8)
    ids = rgb2id(color)
    np.testing.assert_array_equal(ids, [[1, 256, 65536, 256**3 - 1]])
    assert ids.dtype == np.int32
    assert rgb2id(color.astype(np.uint16)).dtype == np.int64
    with pytest.raises(ValueError, match=r'\(H, W, 3\)'):
        rgb2id(np.zeros((4, 4), np.uint8))


def test_registered_under_an_unused_name():
    from mmcv.transforms import TRANSFORMS as MMCV_TRANSFORMS
    from mmdet.registry import TRANSFORMS as MMDET_TRANSFORMS
    from mmengine.registry import DefaultScope
    from mmseg.registry import TRANSFORMS as MMSEG_TRANSFORMS

    assert TRANSFORMS.get('LoadCocoPanopticAnnotations') is LoadCocoPanopticAnnotations
    for registry in (MMDET_TRANSFORMS, MMSEG_TRANSFORMS, MMCV_TRANSFORMS):
        assert 'LoadCocoPanopticAnnotations' not in registry.module_dict
    with DefaultScope.overwrite_default_scope('mmdet'):
        built = MMDET_TRANSFORMS.build(dict(type='effvision.LoadCocoPanopticAnnotations'))
    assert isinstance(built, LoadCocoPanopticAnnotations)


def test_hand_checked_output(tmp_path):
    out = LoadCocoPanopticAnnotations()(results_dict(panoptic_png(tmp_path / 'pan.png')))

    expected_seg = np.full((H, W), 2)
    expected_seg[:, 4:] = 3
    expected_seg[0:2, 0:2] = 0
    expected_seg[3:5, 5:8] = 1
    expected_seg[4:6, 0:3] = 0  # crowd regions keep their class in the semantic map
    expected_seg[0, 4:8] = 255
    expected_seg[5, 7] = 255
    np.testing.assert_array_equal(out['gt_seg_map'], expected_seg)
    assert out['gt_seg_map'].dtype == np.int32  # as mmdet's loader with panopticapi's rgb2id

    masks = out['gt_masks']
    assert isinstance(masks, BitmapMasks) and (masks.height, masks.width) == (H, W)
    assert len(masks) == 2  # the two non-crowd things, in segments_info order
    np.testing.assert_array_equal(masks.masks[0], (expected_seg == 0) & (np.arange(H) < 2)[:, None])
    assert masks.masks[1].sum() == 6 and masks.masks[1][3:5, 5:8].all()

    assert isinstance(out['gt_bboxes'], HorizontalBoxes)
    torch.testing.assert_close(
        out['gt_bboxes'].tensor, torch.tensor([[0.0, 0.0, 2.0, 2.0], [5.0, 3.0, 8.0, 5.0]])
    )
    np.testing.assert_array_equal(out['gt_bboxes_labels'], [0, 1])
    assert out['gt_bboxes_labels'].dtype == np.int64
    np.testing.assert_array_equal(out['gt_ignore_flags'], [False, False])


def test_same_output_as_mmdet(tmp_path, monkeypatch):
    """mmdet's own transform, given a stand-in panopticapi with the published rgb2id formula."""
    from mmdet.datasets.transforms import LoadPanopticAnnotations

    def reference_rgb2id(color):
        color = color.astype(np.int32)
        return color[:, :, 0] + 256 * color[:, :, 1] + 256 * 256 * color[:, :, 2]

    stub = types.ModuleType('panopticapi')
    stub.utils = types.SimpleNamespace(rgb2id=reference_rgb2id)
    monkeypatch.setitem(sys.modules, 'panopticapi', stub)

    path = panoptic_png(tmp_path / 'pan.png')
    for flags in (
        {},
        dict(with_mask=False),
        dict(with_seg=False),
        dict(with_bbox=False, with_label=False),
    ):
        ours = LoadCocoPanopticAnnotations(**flags)(results_dict(path))
        theirs = LoadPanopticAnnotations(**flags)(results_dict(path))
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(ours[key], value)
                assert ours[key].dtype == value.dtype, key
            elif isinstance(value, BitmapMasks):
                np.testing.assert_array_equal(ours[key].masks, value.masks)
            elif isinstance(value, HorizontalBoxes):
                torch.testing.assert_close(ours[key].tensor, value.tensor)
            else:
                assert ours[key] == value, key
