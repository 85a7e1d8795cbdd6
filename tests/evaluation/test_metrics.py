"""SubsetIoUMetric: IoUMetric plus mean IoUs over class subsets."""

from __future__ import annotations

from pathlib import Path

import mmseg.registry
import numpy as np
import pytest
import torch
from mmengine.config import Config

from effvision.evaluation import SubsetIoUMetric
from effvision.registry import METRICS

CLASSES = ('a', 'b', 'c', 'd', 'e')
CONFIG = (
    Path(__file__).resolve().parents[2]
    / 'configs/_base_/datasets/uda_synthia_to_cityscapes_512x512.py'
)


def sample(pred: np.ndarray, label: np.ndarray) -> dict:
    return dict(
        pred_sem_seg=dict(data=torch.from_numpy(pred)[None]),
        gt_sem_seg=dict(data=torch.from_numpy(label)[None]),
    )


def hand_iou(preds, labels, num_classes, ignore=255) -> np.ndarray:
    pred, label = (
        np.concatenate([p.ravel() for p in preds]),
        np.concatenate([x.ravel() for x in labels]),
    )
    keep = label != ignore
    pred, label = pred[keep], label[keep]
    iou = []
    for c in range(num_classes):
        inter = np.sum((pred == c) & (label == c))
        union = np.sum((pred == c) | (label == c))
        iou.append(inter / union if union else np.nan)
    return np.array(iou)


def evaluate(metric, preds, labels, classes=CLASSES) -> dict:
    metric.dataset_meta = dict(classes=classes)
    metric.process({}, [sample(p, x) for p, x in zip(preds, labels)])
    return metric.evaluate(len(preds))


def test_registered_and_free_upstream():
    assert METRICS.get('SubsetIoUMetric') is SubsetIoUMetric
    assert 'SubsetIoUMetric' not in mmseg.registry.METRICS.module_dict


def test_subsets_match_hand_computed_iou():
    rng = np.random.default_rng(0)
    # Class 4 ('e') never occurs in labels or predictions: its IoU is NaN and ignored.
    labels = [rng.integers(0, 4, (6, 7)) for _ in range(2)]
    preds = [rng.integers(0, 4, (6, 7)) for _ in range(2)]
    labels[0][0, :3] = 255
    subsets = dict(mAB=[0, 1], mBCE=[1, 2, 4], mAll=[0, 1, 2, 3, 4])
    metric = SubsetIoUMetric(class_subsets=subsets, iou_metrics=['mIoU'])
    metrics = evaluate(metric, preds, labels)
    iou = hand_iou(preds, labels, len(CLASSES))
    assert np.isnan(iou[4])
    for name, ids in subsets.items():
        assert metrics[name] == pytest.approx(round(np.nanmean(iou[ids]) * 100, 2), abs=1e-9)
    assert metrics['mIoU'] == pytest.approx(metrics['mAll'], abs=0.01)  # IoUMetric's keys kept
    assert {'aAcc', 'mIoU', 'mAcc'} <= set(metrics)


def test_nan_to_num_applies_to_subsets():
    label = np.array([[0, 1], [1, 0]])
    metric = SubsetIoUMetric(class_subsets=dict(m=[0, 4]), nan_to_num=0)
    metrics = evaluate(metric, [label.copy()], [label])
    assert metrics['m'] == 50.0  # IoU 1 for 'a', NaN -> 0 for 'e'


def test_without_subsets_it_is_iou_metric():
    label = np.array([[0, 1], [2, 3]])
    pred = np.array([[0, 1], [2, 2]])
    ours = evaluate(SubsetIoUMetric(), [pred], [label])
    theirs = evaluate(mmseg.registry.METRICS.build(dict(type='IoUMetric')), [pred], [label])
    assert ours == theirs


def test_synthia_config_evaluator_reports_16_and_13():
    cfg = Config.fromfile(CONFIG)
    metric = METRICS.build(cfg.val_evaluator)
    cityscapes = mmseg.registry.DATASETS.get('CityscapesDataset').METAINFO['classes']
    # Every class predicted perfectly except terrain/truck/train (9, 14, 16) and wall (3).
    label = np.arange(19).reshape(1, 19).repeat(2, 0)
    pred = label.copy()
    pred[:, [3, 9, 14, 16]] = 0
    metrics = evaluate(metric, [pred], [label], classes=cityscapes)
    # Road: 2 labelled pixels, 10 predicted (its own 2 and the 8 of the four missed classes).
    assert metrics['mIoU16'] == round((14 + 2 / 10) / 16 * 100, 2) == 88.75
    assert metrics['mIoU13'] == round((12 + 2 / 10) / 13 * 100, 2) == 93.85


@pytest.mark.parametrize(
    'subsets, match',
    [
        (dict(mIoU=[0, 1]), 'taken by IoUMetric'),
        (dict(m=[]), 'non-empty list of class ids'),
        (dict(m=[0, -1]), 'non-empty list of class ids'),
        (dict(m=['road']), 'non-empty list of class ids'),
        (dict(m=[1, 1]), 'repeats a class id'),
    ],
)
def test_bad_subsets(subsets, match):
    with pytest.raises(ValueError, match=match):
        SubsetIoUMetric(class_subsets=subsets)


def test_subset_beyond_the_dataset_classes():
    metric = SubsetIoUMetric(class_subsets=dict(m=[0, 7]))
    label = np.zeros((2, 2), np.int64)
    with pytest.raises(ValueError, match='names class id 7, but the dataset has 5 classes'):
        evaluate(metric, [label], [label])


def test_det_sem_seg_iou_metric_reads_mmdet_label_maps():
    """mmdet samples keep label maps in ``sem_seg``; the result equals IoUMetric on ``data``."""
    from effvision.evaluation.metrics import DetSemSegIoUMetric

    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 5, (6, 7)) for _ in range(3)]
    labels = [rng.integers(0, 5, (6, 7)) for _ in range(3)]
    labels[0][0, :3] = 255
    det = DetSemSegIoUMetric(iou_metrics=['mIoU'])
    seg = METRICS.build(dict(type='IoUMetric', iou_metrics=['mIoU']))
    for metric in (det, seg):
        metric.dataset_meta = dict(classes=CLASSES)
    det.process({}, [
        dict(
            pred_sem_seg=dict(sem_seg=torch.from_numpy(p)[None]),
            gt_sem_seg=dict(sem_seg=torch.from_numpy(g)[None]),
        )
        for p, g in zip(preds, labels)
    ])  # fmt: skip
    seg.process({}, [sample(p, g) for p, g in zip(preds, labels)])
    assert det.compute_metrics(det.results) == seg.compute_metrics(seg.results)
    expected = np.nanmean(hand_iou(preds, labels, len(CLASSES))) * 100
    assert det.compute_metrics(det.results)['mIoU'] == pytest.approx(expected, abs=0.01)
    with pytest.raises(KeyError, match='semantic_on'):
        det.process({}, [dict(gt_sem_seg=dict(sem_seg=torch.zeros(1, 2, 2)))])
