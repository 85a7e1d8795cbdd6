"""Segmentation metrics mmseg lacks: mean IoU over named class subsets, and on mmdet samples.

UDA from SYNTHIA to Cityscapes reports mIoU over the 16 classes SYNTHIA labels and over 13 of
them (``effvision.datasets.synthia.SYNTHIA_CLASS_SUBSETS``) besides the 19-class mIoU; the
official DAFormer code only prints the 19-class value and converts by hand (README).

A panoptic model (mmdet data samples) also predicts a semantic map; mmdet stores label maps in the
``sem_seg`` field of its ``PixelData`` where mmseg uses ``data``, so ``IoUMetric`` cannot read them:
:class:`DetSemSegIoUMetric` can.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from mmengine.logging import print_log
from mmseg.evaluation import IoUMetric

from effvision.registry import METRICS

# Keys IoUMetric already reports; a subset named like one would overwrite it.
_RESERVED = {'aAcc', 'mIoU', 'mAcc', 'mDice', 'mFscore', 'mPrecision', 'mRecall'}


@METRICS.register_module()
class SubsetIoUMetric(IoUMetric):
    """mmseg's :class:`~mmseg.evaluation.IoUMetric` plus the mean IoU over class subsets.

    Every subset adds one key, the NaN-ignoring mean of its classes' IoUs in percent, rounded
    to two decimals like ``mIoU``. Example, SYNTHIA -> Cityscapes::

        val_evaluator = dict(
            type='SubsetIoUMetric',
            iou_metrics=['mIoU'],
            class_subsets=dict(
                mIoU16=[0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18],
                mIoU13=[0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18],
            ),
        )

    Args:
        class_subsets: ``{metric name: class ids}``; ids index the dataset's classes.
        **kwargs: Passed to :class:`~mmseg.evaluation.IoUMetric` (``iou_metrics``,
            ``ignore_index``, ``nan_to_num``, ...); ``nan_to_num`` also applies to the IoUs
            averaged here.
    """

    def __init__(self, class_subsets: Mapping[str, Sequence[int]] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.class_subsets = self._check_subsets(class_subsets or {})

    @staticmethod
    def _check_subsets(subsets: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
        checked = {}
        for name, ids in subsets.items():
            if not isinstance(name, str) or name in _RESERVED:
                raise ValueError(
                    f'class subset name {name!r} is taken by IoUMetric ({sorted(_RESERVED)}); '
                    'name it after its size, e.g. mIoU16'
                )
            ids = tuple(ids)
            if not ids or not all(isinstance(i, (int, np.integer)) and i >= 0 for i in ids):
                raise ValueError(
                    f'class subset {name!r} must be a non-empty list of class ids (>= 0), got '
                    f'{list(ids)}'
                )
            if len(set(ids)) != len(ids):
                raise ValueError(f'class subset {name!r} repeats a class id: {list(ids)}')
            checked[name] = tuple(int(i) for i in ids)
        return checked

    def compute_metrics(self, results: list) -> dict[str, float]:
        """IoUMetric's metrics, then one mean IoU per class subset.

        Args:
            results: Per-image ``(intersect, union, pred area, label area)`` tensors.

        Returns:
            ``aAcc``, ``mIoU``, ... and the subsets' names.
        """
        metrics = super().compute_metrics(results)
        if self.format_only or not self.class_subsets:
            return metrics
        classes = self.dataset_meta['classes']
        intersect = sum(result[0] for result in results)
        union = sum(result[1] for result in results)
        iou = (intersect.double() / union.double()).numpy()
        if self.nan_to_num is not None:
            iou = np.nan_to_num(iou, nan=self.nan_to_num)
        for name, ids in self.class_subsets.items():
            if max(ids) >= len(classes):
                raise ValueError(
                    f'class subset {name!r} names class id {max(ids)}, but the dataset has '
                    f'{len(classes)} classes ({list(classes)})'
                )
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', RuntimeWarning)  # all NaN: no class was seen
                metrics[name] = float(np.round(np.nanmean(iou[list(ids)]) * 100, 2))
            print_log(f'{name} ({len(ids)} classes): {metrics[name]}', logger='current')
        return metrics


@METRICS.register_module()
class DetSemSegIoUMetric(IoUMetric):
    """mmseg's :class:`~mmseg.evaluation.IoUMetric` on mmdet data samples.

    mmdet's ``PackDetInputs`` stores the ground-truth label map as ``gt_sem_seg.sem_seg`` and
    mmdet-style models set ``pred_sem_seg.sem_seg``; mmseg reads ``.data``. Both layouts are
    accepted, so the same metric serves a panoptic model's semantic output, e.g.::

        val_evaluator = [
            dict(type='effvision.PanopticQualityMetric'),
            dict(type='effvision.DetSemSegIoUMetric', iou_metrics=['mIoU']),
        ]

    Class names come from the dataset's ``classes`` (things first for mmdet's panoptic sets).
    """

    def process(self, data_batch: dict, data_samples: Sequence[dict]) -> None:
        """Renames ``sem_seg`` label maps to ``data``, then runs ``IoUMetric.process``."""
        renamed = []
        for sample in data_samples:
            sample = dict(sample)
            for key in ('pred_sem_seg', 'gt_sem_seg'):
                if key not in sample:
                    if key == 'pred_sem_seg':
                        raise KeyError(
                            'DetSemSegIoUMetric needs pred_sem_seg in the predictions; enable '
                            'semantic output in the model (test_cfg.semantic_on=True)'
                        )
                    continue
                field = sample[key]
                if 'data' not in field and 'sem_seg' in field:
                    sample[key] = {**field, 'data': field['sem_seg']}
            renamed.append(sample)
        super().process(data_batch, renamed)
