"""Panoptic quality (PQ, SQ, RQ), computed in memory, without panopticapi.

Kirillov et al., "Panoptic Segmentation", CVPR 2019. The rules are those of the COCO panoptic
evaluation (cocodataset/panopticapi ``evaluation.py``, which mmdet 3.x vendors as
``mmdet.evaluation.functional.pq_compute_single_core``):

* a prediction and a ground-truth segment of the same class match when their IoU is above 0.5
  (strictly); the union leaves out the prediction's pixels on VOID, and matches are unique;
* crowd regions never match; unmatched ground truth that is not crowd is a false negative;
* an unmatched prediction is a false positive unless more than half of it lies on VOID plus the
  crowd regions of its own class;
* per class ``PQ = sum(IoU of TPs) / (TP + FP/2 + FN/2)``, ``SQ = sum(IoU) / TP`` (0 without TPs),
  ``RQ = TP / (TP + FP/2 + FN/2)``; the reported values average over the classes with
  ``TP + FP + FN > 0`` (all, things, stuff), in percent.

Differences from mmdet's ``CocoPanopticMetric``, none of which changes a number on COCO-style
data: nothing is written to disk (mmdet writes every prediction as a PNG and reads it back); the
ground-truth areas are counted on the PNG (panopticapi reads them from the JSON when it has one);
a prediction's crowd overlap sums every crowd region of its class (panopticapi keeps the last one
per class; the COCO and Cityscapes formats have at most one); a split with no class to average
reports NaN (panopticapi divides by zero); ``format_only`` (test-server submissions) is not
offered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import mmcv
import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.fileio import get, load
from mmengine.logging import print_log
from prettytable import PrettyTable

from effvision.datasets.transforms.loading import rgb2id
from effvision.registry import METRICS

# mmdet's panoptic encoding (mmdet.evaluation.functional.INSTANCE_OFFSET): a pixel of a prediction
# holds ``label + instance_id * INSTANCE_OFFSET``.
INSTANCE_OFFSET = 1000

# Columns of the per-class statistics.
TP, FP, FN, IOU = range(4)

# (segment id, label, is crowd) of one ground-truth segment.
Segment = tuple[int, int, bool]

# Ids below this are made contiguous with a counting table (Cityscapes', mmdet's predictions);
# larger ones (COCO's RGB-coded ids reach 2**24) with a sort.
_TABLE_LIMIT = 1 << 22


def _compact(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` for a flat integer array, faster for the small
    id ranges of most maps (a counting table instead of a sort)."""
    values = values.astype(np.int64, copy=False)
    if values.size and values.min() >= 0 and values.max() < _TABLE_LIMIT:
        uniq = np.flatnonzero(np.bincount(values))
        table = np.zeros(int(uniq[-1]) + 1, dtype=np.int64)
        table[uniq] = np.arange(len(uniq))
        return uniq, table[values]
    return np.unique(values, return_inverse=True)


def panoptic_stats(
    gt_ids: np.ndarray,
    gt_segments: Sequence[Segment],
    pred: np.ndarray,
    num_classes: int,
    void_label: int | None = None,
) -> np.ndarray:
    """Per-class TP, FP, FN counts and summed TP IoU of one image (COCO panoptic rules).

    Args:
        gt_ids: ``(H, W)`` ground-truth segment ids (a panoptic PNG through :func:`rgb2id`).
        gt_segments: ``(segment id, label, is crowd)`` of every ground-truth segment; pixels
            whose id is not listed are VOID.
        pred: ``(H, W)`` prediction in mmdet's encoding, ``label + instance * INSTANCE_OFFSET``;
            label ``num_classes`` (and ``void_label``) is VOID.
        num_classes: Number of classes ``K``.
        void_label: A second VOID label (a prediction's ``ignore_index``), if any.

    Returns:
        ``(K, 4)`` float64 array, columns ``TP, FP, FN, IOU``.
    """
    gt_ids = np.asarray(gt_ids).ravel()
    pred = np.asarray(pred).ravel()
    if gt_ids.size != pred.size:
        raise ValueError(f'ground truth has {gt_ids.size} pixels, prediction {pred.size}')
    seg_ids = np.array([int(s[0]) for s in gt_segments], dtype=np.int64)
    gt_labels = np.array([int(s[1]) for s in gt_segments], dtype=np.int64)
    gt_crowd = np.array([bool(s[2]) for s in gt_segments], dtype=bool)
    if len(np.unique(seg_ids)) != len(seg_ids):
        raise ValueError(f'ground-truth segment ids repeat: {seg_ids.tolist()}')
    if gt_labels.size and (gt_labels.min() < 0 or gt_labels.max() >= num_classes):
        raise ValueError(f'ground-truth labels must lie in [0, {num_classes}), got {gt_labels}')

    # Ground-truth pixels -> 0 (VOID) or 1 + the index of their segment.
    uniq, inverse = _compact(gt_ids)
    index_of_id = {int(i): n + 1 for n, i in enumerate(seg_ids)}
    gt_index = np.array([index_of_id.get(int(u), 0) for u in uniq], dtype=np.int64)[inverse]

    # Predicted pixels -> 0 (VOID) or 1 + the index of their segment.
    uniq, inverse = _compact(pred)
    labels = uniq % INSTANCE_OFFSET
    void = labels == num_classes
    if void_label is not None:
        void |= labels == void_label
    bad = (uniq < 0) | ((labels > num_classes) & ~void)
    if bad.any():
        raise ValueError(
            f'prediction holds segment ids {uniq[bad].tolist()}, whose labels (id % '
            f'{INSTANCE_OFFSET}) are not classes of this {num_classes}-class dataset nor VOID '
            f'({num_classes})'
        )
    pred_labels = labels[~void]
    index_of_uniq = np.zeros(len(uniq), dtype=np.int64)
    index_of_uniq[~void] = np.arange(1, len(pred_labels) + 1)
    pred_index = index_of_uniq[inverse]

    num_gt, num_pred = len(seg_ids), len(pred_labels)
    joint = np.bincount(
        gt_index * (num_pred + 1) + pred_index, minlength=(num_gt + 1) * (num_pred + 1)
    ).reshape(num_gt + 1, num_pred + 1)
    inter = joint[1:, 1:]
    gt_area = joint[1:].sum(1)
    pred_area = joint[:, 1:].sum(0)
    pred_on_void = joint[0, 1:]

    same_class = gt_labels[:, None] == pred_labels[None, :]
    union = gt_area[:, None] + pred_area[None, :] - inter - pred_on_void[None, :]
    iou = np.divide(inter, union, out=np.zeros(inter.shape), where=inter > 0)
    match = same_class & ~gt_crowd[:, None] & (iou > 0.5)

    stats = np.zeros((num_classes, 4), dtype=np.float64)
    gt_hit, pred_hit = np.nonzero(match)
    np.add.at(stats[:, TP], gt_labels[gt_hit], 1)
    np.add.at(stats[:, IOU], gt_labels[gt_hit], iou[gt_hit, pred_hit])
    missed = ~match.any(1) & ~gt_crowd
    np.add.at(stats[:, FN], gt_labels[missed], 1)
    # An unmatched prediction mostly on VOID or on a crowd region of its class is not counted.
    ignored = pred_on_void + (inter * (same_class & gt_crowd[:, None])).sum(0)
    false_pos = ~match.any(0) & (ignored / np.maximum(pred_area, 1) <= 0.5)
    np.add.at(stats[:, FP], pred_labels[false_pos], 1)
    return stats


def summarize(stats: np.ndarray, is_thing: Sequence[bool] | np.ndarray) -> dict[str, dict]:
    """PQ, SQ, RQ (fractions) averaged over all classes, things and stuff.

    Args:
        stats: ``(K, 4)`` statistics summed over the dataset (``TP, FP, FN, IOU``).
        is_thing: ``(K,)`` whether each class is a thing.

    Returns:
        ``{'All' | 'Things' | 'Stuff': {'pq', 'sq', 'rq', 'n'}, 'classwise': {'pq', 'sq', 'rq'}
        (K,) arrays}``; ``n`` counts the classes averaged (NaN values when it is 0).
    """
    tp, fp, fn, iou = stats.T
    denom = tp + 0.5 * fp + 0.5 * fn
    present = denom > 0
    pq = np.divide(iou, denom, out=np.zeros_like(iou), where=present)
    sq = np.divide(iou, tp, out=np.zeros_like(iou), where=tp > 0)
    rq = np.divide(tp, denom, out=np.zeros_like(iou), where=present)
    is_thing = np.asarray(is_thing, dtype=bool)
    return {
        'All': _average(pq, sq, rq, present),
        'Things': _average(pq, sq, rq, present & is_thing),
        'Stuff': _average(pq, sq, rq, present & ~is_thing),
        'classwise': {'pq': pq, 'sq': sq, 'rq': rq},
    }


def _average(pq: np.ndarray, sq: np.ndarray, rq: np.ndarray, subset: np.ndarray) -> dict:
    n = int(subset.sum())
    if n == 0:
        return {'pq': math.nan, 'sq': math.nan, 'rq': math.nan, 'n': 0}
    return {
        'pq': float(pq[subset].mean()),
        'sq': float(sq[subset].mean()),
        'rq': float(rq[subset].mean()),
        'n': n,
    }


@METRICS.register_module()
class PanopticQualityMetric(BaseMetric):
    """PQ, SQ and RQ of mmdet panoptic predictions, with the keys of mmdet's CocoPanopticMetric.

    Reports ``coco_panoptic/PQ``, ``SQ``, ``RQ``, ``PQ_th``, ``SQ_th``, ``RQ_th``, ``PQ_st``,
    ``SQ_st``, ``RQ_st`` in percent, averaged over the classes that appear in the ground truth or
    the predictions (all, things, stuff), and logs a summary table (and a per-class one with
    ``classwise=True``).

    Predictions are ``pred_panoptic_seg.sem_seg``, ``(1, H, W)`` at the image's original size in
    mmdet's encoding (``label + instance_id * 1000``, VOID ``= len(classes)`` or the
    ``ignore_index`` in its metainfo). The dataset's ``classes`` and ``thing_classes`` say which
    labels are things. The ground truth comes from one of two places:

    * the data samples (``ann_file=None``): ``seg_map_path`` and ``segments_info`` as mmdet's
      ``CocoPanopticDataset`` provides them; keep them in ``PackDetInputs``' ``meta_keys``::

          dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                                'scale_factor', 'seg_map_path', 'segments_info'))

    * a COCO panoptic JSON (``ann_file`` and ``seg_prefix``, as mmdet's metric takes them): the
      segments of image ``img_id`` and their PNG ``seg_prefix/<file_name>``, as panopticapi reads
      them (segments the dataset filters out still count).

    Example (mmdet scope)::

        val_evaluator = dict(type='effvision.PanopticQualityMetric', classwise=True)

    Args:
        ann_file: COCO panoptic JSON of the ground truth; ``None`` reads the data samples.
        seg_prefix: Folder of the ground-truth PNGs named in ``ann_file``.
        classwise: Also log PQ, SQ, RQ, TP, FP, FN of every class.
        backend_args: File backend arguments for the JSON and the PNGs.
        collect_device: ``'cpu'`` or ``'gpu'``, for collecting results across processes.
        prefix: Prefix of the result keys; ``'coco_panoptic'`` by default, as mmdet's.
    """

    default_prefix: str | None = 'coco_panoptic'

    def __init__(
        self,
        ann_file: str | None = None,
        seg_prefix: str | None = None,
        classwise: bool = False,
        backend_args: dict | None = None,
        collect_device: str = 'cpu',
        prefix: str | None = None,
        **unsupported,
    ) -> None:
        if unsupported:
            raise TypeError(
                f'PanopticQualityMetric got {sorted(unsupported)}, which it does not take: it '
                'evaluates in memory and writes no files. To format results for the COCO test '
                'server (format_only, outfile_prefix), use mmdet.CocoPanopticMetric with '
                'panopticapi installed'
            )
        super().__init__(collect_device=collect_device, prefix=prefix)
        if ann_file is not None and seg_prefix is None:
            raise ValueError(
                'ann_file needs seg_prefix, the folder of its panoptic PNGs (e.g. '
                "'data/coco/annotations/panoptic_val2017/')"
            )
        self.classwise = classwise
        self.backend_args = backend_args
        self.seg_prefix = seg_prefix
        self._images = self._categories = None
        if ann_file is not None:
            content = load(ann_file, backend_args=backend_args)
            missing = {'annotations', 'categories'} - set(content)
            if missing:
                raise ValueError(
                    f'{ann_file} is not a COCO panoptic JSON: it lacks {sorted(missing)}'
                )
            self._images = {ann['image_id']: ann for ann in content['annotations']}
            self._categories = {cat['id']: cat for cat in content['categories']}
        self._label_of_category: dict[int, int] | None = None

    # -- dataset meta ---------------------------------------------------------------------------

    def _classes(self) -> tuple[list[str], np.ndarray]:
        meta = self.dataset_meta or {}
        if 'classes' not in meta or 'thing_classes' not in meta:
            raise ValueError(
                "PanopticQualityMetric needs the dataset's 'classes' and 'thing_classes' "
                f'(dataset_meta has {sorted(meta)}); evaluate through a runner with a panoptic '
                'dataset, or set metric.dataset_meta'
            )
        classes = list(meta['classes'])
        unknown = set(meta['thing_classes']) - set(classes)
        if unknown:
            raise ValueError(f'thing_classes {sorted(unknown)} are not among the classes')
        return classes, np.array([c in meta['thing_classes'] for c in classes], dtype=bool)

    def _category_labels(self, classes: list[str], is_thing: np.ndarray) -> dict[int, int]:
        """Map the JSON's category ids to labels by name (mmdet's datasets do the same)."""
        if self._label_of_category is None:
            mapping = {}
            for cat_id, cat in self._categories.items():
                if cat['name'] not in classes:
                    continue
                label = classes.index(cat['name'])
                if 'isthing' in cat and bool(cat['isthing']) != is_thing[label]:
                    kind = 'thing' if cat['isthing'] else 'stuff'
                    raise ValueError(
                        f'category {cat["name"]!r} is {kind} in ann_file but not in the '
                        "dataset's thing_classes; make the metainfo agree with the JSON"
                    )
                mapping[cat_id] = label
            self._label_of_category = mapping
        return self._label_of_category

    # -- ground truth ---------------------------------------------------------------------------

    def _ground_truth(
        self, sample: Mapping, classes: list[str], is_thing: np.ndarray
    ) -> tuple[str, list[Segment]]:
        """The ground truth PNG path and segments of one data sample."""
        if self._images is not None:
            img_id = sample.get('img_id')
            if img_id not in self._images:
                raise KeyError(
                    f'image id {img_id!r} has no annotation in ann_file; evaluate the split the '
                    'JSON describes, or drop ann_file to read the ground truth from the samples'
                )
            ann = self._images[img_id]
            labels = self._category_labels(classes, is_thing)
            segments = []
            for seg in ann['segments_info']:
                if seg['category_id'] not in labels:
                    raise ValueError(
                        f'image {img_id!r}: category id {seg["category_id"]} is not one of the '
                        f"dataset's classes"
                    )
                segments.append((seg['id'], labels[seg['category_id']], bool(seg['iscrowd'])))
            return f'{self.seg_prefix.rstrip("/")}/{ann["file_name"]}', segments

        missing = [key for key in ('seg_map_path', 'segments_info') if key not in sample]
        if missing or sample['seg_map_path'] is None:
            raise KeyError(
                f'the data samples lack the panoptic ground truth ({missing or "seg_map_path"}); '
                "add 'seg_map_path' and 'segments_info' to PackDetInputs' meta_keys, or pass "
                'ann_file and seg_prefix'
            )
        segments = []
        for seg in sample['segments_info']:
            label = int(seg['category'])
            # mmdet's CocoPanopticDataset marks a crowd region of a thing class is_thing=False.
            crowd = bool(is_thing[label]) and not seg['is_thing']
            segments.append((seg['id'], label, crowd))
        return sample['seg_map_path'], segments

    # -- BaseMetric -----------------------------------------------------------------------------

    def process(self, data_batch, data_samples: Sequence[Mapping]) -> None:
        """Count TP, FP, FN and TP IoU per class for every sample.

        Args:
            data_batch: The batch from the dataloader (unused).
            data_samples: Model outputs as dicts, each with ``pred_panoptic_seg`` (``sem_seg``:
                ``(1, H, W)`` int tensor) and the ground truth described in the class docstring.
        """
        classes, is_thing = self._classes()
        for sample in data_samples:
            if 'pred_panoptic_seg' not in sample:
                raise KeyError(
                    'PanopticQualityMetric needs pred_panoptic_seg in the predictions; enable '
                    'panoptic output in the model (test_cfg.panoptic_on=True)'
                )
            pan = sample['pred_panoptic_seg']
            pred = pan['sem_seg']
            pred = pred.cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
            pred = pred.reshape(pred.shape[-2:]) if pred.ndim == 3 else pred
            path, segments = self._ground_truth(sample, classes, is_thing)
            png = mmcv.imfrombytes(
                get(path, backend_args=self.backend_args), flag='color', channel_order='rgb'
            )
            if png is None:
                raise ValueError(f'could not decode the panoptic PNG {path}')
            gt_ids = rgb2id(png)
            if gt_ids.shape != pred.shape:
                raise ValueError(
                    f'{path}: ground truth is {gt_ids.shape[0]}x{gt_ids.shape[1]}, the '
                    f'prediction {pred.shape[0]}x{pred.shape[1]}; predict at ori_shape '
                    '(rescale=True) and load the annotations after Resize in the test pipeline'
                )
            stats = panoptic_stats(
                gt_ids, segments, pred, len(classes), void_label=pan.get('ignore_index')
            )
            # Only the classes this image touches: results travel between processes.
            rows = np.flatnonzero(stats[:, :3].any(1))
            self.results.append((rows, stats[rows]))

    def compute_metrics(self, results: list) -> dict[str, float]:
        """PQ, SQ, RQ in percent (all classes, things ``_th``, stuff ``_st``).

        Args:
            results: One ``(class ids, (n, 4) statistics)`` pair per image.

        Returns:
            ``PQ``, ``SQ``, ``RQ``, ``PQ_th``, ``SQ_th``, ``RQ_th``, ``PQ_st``, ``SQ_st``,
            ``RQ_st``.
        """
        classes, is_thing = self._classes()
        stats = np.zeros((len(classes), 4), dtype=np.float64)
        for rows, values in results:
            stats[rows] += values
        summary = summarize(stats, is_thing)
        self._log(summary, stats, classes, is_thing)
        metrics = {}
        for name, suffix in (('All', ''), ('Things', '_th'), ('Stuff', '_st')):
            for key in ('pq', 'sq', 'rq'):
                metrics[f'{key.upper()}{suffix}'] = 100 * summary[name][key]
        return metrics

    def _log(self, summary: dict, stats: np.ndarray, classes, is_thing) -> None:
        table = PrettyTable(['', 'PQ', 'SQ', 'RQ', 'categories'])
        for name in ('All', 'Things', 'Stuff'):
            row = summary[name]
            table.add_row([name, *(f'{100 * row[k]:.3f}' for k in ('pq', 'sq', 'rq')), row['n']])
        print_log('Panoptic Evaluation Results:\n' + table.get_string(), logger='current')
        if not self.classwise:
            return
        per_class = summary['classwise']
        table = PrettyTable(['category', 'kind', 'PQ', 'SQ', 'RQ', 'TP', 'FP', 'FN'])
        for label, name in enumerate(classes):
            table.add_row(
                [
                    name,
                    'thing' if is_thing[label] else 'stuff',
                    *(f'{100 * per_class[k][label]:.3f}' for k in ('pq', 'sq', 'rq')),
                    *(int(stats[label, col]) for col in (TP, FP, FN)),
                ]
            )
        print_log('Classwise Panoptic Evaluation Results:\n' + table.get_string(), logger='current')
