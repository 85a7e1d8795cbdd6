"""PanopticQualityMetric: hand-computed PQ/SQ/RQ, COCO's void and crowd rules, and torchmetrics.

The ground truth is written as COCO panoptic PNGs (ids ``R + 256 G + 256^2 B``) in ``tmp_path``,
the predictions are mmdet panoptic maps (``label + instance * 1000``, VOID = number of classes).
Classes: two things (``a``, ``b``) then two stuff classes (``s``, ``t``), labels 0-3.
"""

from __future__ import annotations

import json
import math
import pickle

import cv2
import numpy as np
import pytest
import torch
from mmengine.evaluator import Evaluator

from effvision.evaluation import PanopticQualityMetric
from effvision.evaluation.panoptic_metric import INSTANCE_OFFSET, panoptic_stats
from effvision.registry import METRICS

CLASSES = ('a', 'b', 's', 't')
THINGS = ('a', 'b')
A, B, S, T = range(4)
VOID = len(CLASSES)
KEYS = ('PQ', 'SQ', 'RQ', 'PQ_th', 'SQ_th', 'RQ_th', 'PQ_st', 'SQ_st', 'RQ_st')


def write_png(path, ids: np.ndarray) -> str:
    ids = ids.astype(np.int64)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    assert cv2.imwrite(str(path), rgb[..., ::-1])
    return str(path)


def pan(label: int, instance: int = 0) -> int:
    return label + instance * INSTANCE_OFFSET


def sample(path: str, segments, pred: np.ndarray, img_id: int = 0, **pred_meta) -> dict:
    """A data sample as mmengine's Evaluator hands it over: ``segments`` is ``(id, label,
    crowd)``, turned into the dataset's ``segments_info`` (crowd things have is_thing False)."""
    info = [
        {'id': i, 'category': label, 'is_thing': CLASSES[label] in THINGS and not crowd}
        for i, label, crowd in segments
    ]
    pred_pan = {'sem_seg': torch.as_tensor(pred)[None], **pred_meta}
    return dict(img_id=img_id, seg_map_path=path, segments_info=info, pred_panoptic_seg=pred_pan)


def make_metric(**kwargs) -> PanopticQualityMetric:
    metric = PanopticQualityMetric(**kwargs)
    metric.dataset_meta = dict(classes=CLASSES, thing_classes=THINGS, stuff_classes=('s', 't'))
    return metric


def evaluate(tmp_path, gt_ids, segments, pred, **kwargs) -> dict:
    metric = make_metric(**kwargs)
    metric.process({}, [sample(write_png(tmp_path / 'gt.png', gt_ids), segments, pred)])
    return metric.compute_metrics(metric.results)


def scene():
    """4x8: stuff s on the left half, t on the right; thing a (2x2) in s, thing b (2x2) in t."""
    gt = np.full((4, 8), 1)
    gt[:, 4:] = 2
    gt[1:3, 1:3] = 1001
    gt[1:3, 5:7] = 2001
    segments = [(1, S, False), (2, T, False), (1001, A, False), (2001, B, False)]
    pred = np.full((4, 8), pan(S))
    pred[:, 4:] = pan(T)
    pred[1:3, 1:3] = pan(A, 1)
    pred[1:3, 5:7] = pan(B, 2)
    return gt, segments, pred


def test_registered_under_an_unused_name():
    from mmdet.registry import METRICS as MMDET_METRICS
    from mmengine.registry import METRICS as MMENGINE_METRICS
    from mmseg.registry import METRICS as MMSEG_METRICS

    assert METRICS.get('PanopticQualityMetric') is PanopticQualityMetric
    for registry in (MMDET_METRICS, MMSEG_METRICS, MMENGINE_METRICS):
        assert 'PanopticQualityMetric' not in registry.module_dict
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope('mmdet'):
        built = MMDET_METRICS.build(dict(type='effvision.PanopticQualityMetric'))
    assert isinstance(built, PanopticQualityMetric)


def test_perfect(tmp_path):
    gt, segments, pred = scene()
    result = evaluate(tmp_path, gt, segments, pred)
    assert result == {key: 100.0 for key in KEYS}


def test_missed_segment(tmp_path):
    # b is predicted as t: b is a false negative; t's prediction covers 16 pixels of which 12 are
    # t's, IoU 12 / 16.
    gt, segments, pred = scene()
    pred[1:3, 5:7] = pan(T)
    result = evaluate(tmp_path, gt, segments, pred)
    # Classes a (1), s (1), t (0.75) matched; b: FN only, PQ = SQ = RQ = 0 but still averaged.
    assert result['PQ'] == pytest.approx(100 * (1 + 0 + 1 + 0.75) / 4)
    assert result['SQ'] == pytest.approx(100 * (1 + 0 + 1 + 0.75) / 4)
    assert result['RQ'] == pytest.approx(100 * 3 / 4)
    assert result['PQ_th'] == pytest.approx(50.0)
    assert result['RQ_th'] == pytest.approx(50.0)
    assert result['PQ_st'] == pytest.approx(100 * 1.75 / 2)
    assert result['SQ_st'] == pytest.approx(100 * 1.75 / 2)
    assert result['RQ_st'] == pytest.approx(100.0)


def test_false_positive(tmp_path):
    # An extra instance of b (2 pixels) on s: one FP for b (RQ = 1 / 1.5); s (12 pixels) keeps
    # 10 of them, IoU 10 / 12.
    gt, segments, pred = scene()
    pred[3, 0:2] = pan(B, 3)
    result = evaluate(tmp_path, gt, segments, pred)
    pq_b = 1 / 1.5
    assert result['PQ_th'] == pytest.approx(100 * (1 + pq_b) / 2)
    assert result['SQ_th'] == pytest.approx(100.0)
    assert result['RQ_th'] == pytest.approx(100 * (1 + pq_b) / 2)
    assert result['PQ_st'] == pytest.approx(100 * (10 / 12 + 1) / 2)
    assert result['RQ_st'] == pytest.approx(100.0)


@pytest.mark.parametrize(
    ('pred_cols', 'iou', 'matched'),
    [
        (4, 4 / 8, False),  # exactly 0.5 does not match (IoU must exceed 0.5)
        (5, 5 / 8, True),
        (10, 1.0, True),  # 2 of its 10 pixels lie on VOID: left out of the union
    ],
)
def test_iou_threshold_and_void_in_union(tmp_path, pred_cols, iou, matched):
    # Row 0: thing a on columns 0-7, VOID on 8-11. Row 1: stuff s. The prediction of a covers
    # columns 0..pred_cols-1 of row 0; the rest of row 0 is predicted VOID.
    gt = np.zeros((2, 12), np.int64)
    gt[0, :8] = 1001
    gt[1] = 1
    segments = [(1001, A, False), (1, S, False)]
    pred = np.full((2, 12), VOID)
    pred[0, :pred_cols] = pan(A, 1)
    pred[1] = pan(S)
    stats = panoptic_stats(gt, segments, pred, len(CLASSES))
    tp, fp, fn, iou_sum = stats[A]
    if matched:
        assert (tp, fp, fn) == (1, 0, 0)
        assert iou_sum == pytest.approx(iou)
    else:
        assert (tp, fp, fn, iou_sum) == (0, 1, 1, 0)
    result = evaluate(tmp_path, gt, segments, pred)
    pq_a = iou if matched else 0.0
    assert result['PQ_th'] == pytest.approx(100 * pq_a)
    assert result['PQ'] == pytest.approx(100 * (pq_a + 1) / 2)


@pytest.mark.parametrize(('on_void', 'counted'), [(3, False), (2, True)])
def test_false_positive_mostly_on_void_is_ignored(tmp_path, on_void, counted):
    # A 4-pixel prediction of b with `on_void` pixels on VOID: ignored when more than half.
    gt = np.full((2, 8), 1)
    gt[0, 4 : 4 + on_void] = 0
    pred = np.full((2, 8), pan(S))
    pred[0, 4:8] = pan(B, 1)
    stats = panoptic_stats(gt, [(1, S, False)], pred, len(CLASSES))
    assert stats[B, 1] == (1 if counted else 0)
    # s: 16 - on_void ground-truth pixels, its prediction 12 pixels none of them on VOID.
    assert stats[S, 3] == pytest.approx(12 / (16 - on_void))


def test_crowd(tmp_path):
    # Row 0: a crowd region of a (id 1, columns 0-5) and s. Predictions on the crowd region:
    # an instance of a with 3 of 4 pixels on it (ignored), one of b (a crowd of another class: FP).
    gt = np.full((2, 8), 2)
    gt[0, :6] = 1
    segments = [(1, A, True), (2, S, False)]
    pred = np.full((2, 8), pan(S))
    pred[0, 0:3] = pan(A, 1)
    pred[1, 0] = pan(A, 1)
    pred[0, 3:6] = pan(B, 2)
    stats = panoptic_stats(gt, segments, pred, len(CLASSES))
    assert tuple(stats[A, :3]) == (0, 0, 0)  # crowd never matches nor misses; a's FP ignored
    assert tuple(stats[B, :3]) == (0, 1, 0)
    assert tuple(stats[S, :3]) == (1, 0, 0)
    result = evaluate(tmp_path, gt, segments, pred)
    assert result['PQ_th'] == 0.0  # only b counts among the things
    # A crowd prediction that matched the crowd region exactly would not be a TP either.
    stats = panoptic_stats(gt, segments, np.where(gt == 1, pan(A, 1), pan(S)), len(CLASSES))
    assert tuple(stats[A, :3]) == (0, 0, 0)


def test_void_prediction_and_ignore_index(tmp_path):
    # Pixels predicted VOID (label = number of classes, or the prediction's ignore_index) are no
    # segment: the ground truth under them is missed.
    gt, segments, pred = scene()
    pred[:, 4:] = VOID
    stats = panoptic_stats(gt, segments, pred, len(CLASSES))
    assert tuple(stats[T, :3]) == (0, 0, 1) and tuple(stats[B, :3]) == (0, 0, 1)
    pred[:, 4:] = 255
    with pytest.raises(ValueError, match='not classes'):
        panoptic_stats(gt, segments, pred, len(CLASSES))
    stats_ignore = panoptic_stats(gt, segments, pred, len(CLASSES), void_label=255)
    np.testing.assert_array_equal(stats_ignore, stats)
    path = write_png(tmp_path / 'gt.png', gt)
    metric = make_metric()
    metric.process({}, [sample(path, segments, pred, ignore_index=255)])
    assert metric.compute_metrics(metric.results)['RQ_st'] == pytest.approx(50.0)


def test_unlisted_ground_truth_ids_are_void(tmp_path):
    # A PNG id not in segments_info (the dataset drops degenerate segments) is VOID: a prediction
    # on it is ignored.
    gt, segments, pred = scene()
    segments = [s for s in segments if s[0] != 2001]
    stats = panoptic_stats(gt, segments, pred, len(CLASSES))
    assert tuple(stats[B, :3]) == (0, 0, 0)
    # A prediction of t over it: the 4 VOID pixels stay out of the union, IoU 12 / 12.
    pred[1:3, 5:7] = pan(T)
    stats = panoptic_stats(gt, segments, pred, len(CLASSES))
    assert tuple(stats[T]) == (1, 0, 0, 1.0)


def test_large_ground_truth_ids():
    # COCO's RGB-coded ids reach 2**24 (counted with a sort, small ids with a table): same result.
    gt, segments, pred = scene()
    pred[1:3, 5:7] = pan(T)
    big = {i: i * 4099 + 2**23 for i, _, _ in segments}
    big_segments = [(big[i], label, crowd) for i, label, crowd in segments]
    big_gt = np.vectorize(big.get)(gt)
    assert big_gt.max() >= 2**23
    np.testing.assert_array_equal(
        panoptic_stats(big_gt, big_segments, pred, len(CLASSES)),
        panoptic_stats(gt, segments, pred, len(CLASSES)),
    )


def test_empty_split_is_nan(tmp_path):
    gt = np.full((2, 4), 1)
    result = evaluate(tmp_path, gt, [(1, S, False)], np.full((2, 4), pan(S)))
    assert math.isnan(result['PQ_th']) and math.isnan(result['SQ_th'])
    assert result['PQ'] == result['PQ_st'] == 100.0


def test_result_keys_match_mmdet(tmp_path):
    from mmdet.evaluation.metrics.coco_panoptic_metric import parse_pq_results

    split = {'pq': 0.5, 'sq': 0.5, 'rq': 0.5}
    mmdet_keys = parse_pq_results({'All': split, 'Things': split, 'Stuff': split}).keys()
    gt, segments, pred = scene()
    evaluator = Evaluator(PanopticQualityMetric())
    evaluator.dataset_meta = dict(classes=CLASSES, thing_classes=THINGS)
    evaluator.process([sample(write_png(tmp_path / 'gt.png', gt), segments, pred)])
    result = evaluator.evaluate(1)
    assert set(result) == {f'coco_panoptic/{key}' for key in mmdet_keys}
    assert set(mmdet_keys) == set(KEYS)


def test_classwise_table(tmp_path, monkeypatch):
    import effvision.evaluation.panoptic_metric as module

    logged = []
    monkeypatch.setattr(module, 'print_log', lambda msg, logger=None: logged.append(msg))
    gt, segments, pred = scene()
    pred[1:3, 5:7] = pan(T)
    evaluate(tmp_path, gt, segments, pred)
    assert len(logged) == 1 and logged[0].startswith('Panoptic Evaluation Results')
    logged.clear()
    evaluate(tmp_path, gt, segments, pred, classwise=True)
    assert logged[1].startswith('Classwise Panoptic Evaluation Results')
    out = logged[1]
    row_b = next(line for line in out.splitlines() if line.startswith('| ') and ' b ' in line)
    assert [cell.strip() for cell in row_b.split('|')[1:-1]] == [
        'b', 'thing', '0.000', '0.000', '0.000', '0', '0', '1'
    ]  # fmt: skip


def test_ground_truth_from_ann_file(tmp_path):
    # The JSON's own category ids and order (stuff first) map to labels by name; iscrowd comes
    # from the JSON. Same numbers as with the data samples.
    gt, segments, pred = scene()
    pred[3, 0:2] = pan(B, 3)
    gt[0, 0:2] = 7  # a crowd region of b
    segments = [*segments, (7, B, True)]
    (tmp_path / 'pan').mkdir()
    write_png(tmp_path / 'pan' / 'img.png', gt)
    cat_id = {S: 11, T: 12, A: 21, B: 22}
    content = {
        'images': [{'id': 5, 'file_name': 'img.jpg', 'height': 4, 'width': 8}],
        'annotations': [
            {
                'image_id': 5,
                'file_name': 'img.png',
                'segments_info': [
                    {'id': i, 'category_id': cat_id[label], 'iscrowd': int(crowd)}
                    for i, label, crowd in segments
                ],
            }
        ],
        'categories': [
            {'id': cat_id[label], 'name': CLASSES[label], 'isthing': int(label in (A, B))}
            for label in (S, T, A, B)
        ],
    }
    ann_file = tmp_path / 'pan.json'
    ann_file.write_text(json.dumps(content))
    from_json = make_metric(ann_file=str(ann_file), seg_prefix=str(tmp_path / 'pan'))
    from_json.process(
        {}, [{'img_id': 5, 'pred_panoptic_seg': {'sem_seg': torch.tensor(pred)[None]}}]
    )
    from_samples = make_metric()
    from_samples.process({}, [sample(str(tmp_path / 'pan' / 'img.png'), segments, pred)])
    expected = from_samples.compute_metrics(from_samples.results)
    assert from_json.compute_metrics(from_json.results) == expected
    assert expected['RQ_th'] < 100.0  # b's extra instance is a FP (on s, not on the crowd)

    with pytest.raises(KeyError, match='no annotation'):
        from_json.process({}, [{'img_id': 6, 'pred_panoptic_seg': {'sem_seg': torch.tensor(pred)}}])
    content['categories'][0]['isthing'] = 1
    ann_file.write_text(json.dumps(content))
    wrong = make_metric(ann_file=str(ann_file), seg_prefix=str(tmp_path / 'pan'))
    with pytest.raises(ValueError, match="'s' is thing in ann_file"):
        wrong.process({}, [{'img_id': 5, 'pred_panoptic_seg': {'sem_seg': torch.tensor(pred)}}])


def test_results_merge_across_processes(tmp_path):
    # collect_results pickles each rank's results and concatenates them: the per-image entries
    # must survive that and sum to the single-process numbers, whatever the split.
    rng = np.random.default_rng(0)
    samples = []
    for i in range(6):
        gt, segments, pred = scene()
        pred[rng.integers(4), :] = pan(int(rng.integers(4)), int(rng.integers(1, 4)))
        samples.append(sample(write_png(tmp_path / f'{i}.png', gt), segments, pred, img_id=i))
    single = make_metric()
    single.process({}, samples)
    ranks = [make_metric(), make_metric()]
    ranks[0].process({}, samples[0::2])
    ranks[1].process({}, samples[1::2])
    gathered = [r for rank in ranks for r in pickle.loads(pickle.dumps(rank.results))]
    assert make_metric().compute_metrics(gathered) == single.compute_metrics(single.results)


def test_clear_errors(tmp_path):
    gt, segments, pred = scene()
    path = write_png(tmp_path / 'gt.png', gt)
    metric = make_metric()
    no_gt = sample(path, segments, pred)
    del no_gt['segments_info']
    with pytest.raises(KeyError, match="'seg_map_path' and 'segments_info' to PackDetInputs"):
        metric.process({}, [no_gt])
    with pytest.raises(ValueError, match='predict at ori_shape'):
        metric.process({}, [sample(path, segments, pred[:, :4])])
    with pytest.raises(KeyError, match='pred_panoptic_seg'):
        metric.process({}, [{'seg_map_path': path, 'segments_info': []}])
    with pytest.raises(TypeError, match='format_only'):
        PanopticQualityMetric(format_only=True)
    with pytest.raises(ValueError, match='seg_prefix'):
        PanopticQualityMetric(ann_file='x.json')
    bare = PanopticQualityMetric()
    with pytest.raises(ValueError, match='thing_classes'):
        bare.process({}, [sample(path, segments, pred)])


def random_panoptic(rng: np.random.Generator, height: int, width: int, num_things: int):
    """(label, instance) maps of random rectangles over a stuff background; things get new
    instance ids, stuff keeps instance 0 (one segment per stuff class, as COCO's format)."""
    num_classes = len(CLASSES)
    label = np.full((height, width), rng.integers(num_things, num_classes))
    instance = np.zeros((height, width), np.int64)
    for n in range(1, int(rng.integers(3, 10))):
        y, x = rng.integers(0, height - 2), rng.integers(0, width - 2)
        h, w = rng.integers(2, height // 2 + 2), rng.integers(2, width // 2 + 2)
        cls = rng.integers(num_classes)
        label[y : y + h, x : x + w] = cls
        instance[y : y + h, x : x + w] = n if cls < num_things else 0
    return label, instance


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_matches_torchmetrics(tmp_path, seed):
    """Same per-class TP/FP/FN/IoU and averages as torchmetrics' PanopticQuality.

    torchmetrics implements the same matching (IoU > 0.5, union without the prediction's pixels
    on ground-truth VOID, unmatched predictions mostly on VOID ignored) but differs in three
    conventions, which this comparison keeps out of play:
    * it has no crowd regions: the ground truth here has none;
    * it also removes ground truth under *predicted* VOID from the union, and ignores a missed
      ground-truth segment mostly under predicted VOID (COCO counts it as a FN): the predictions
      here cover every pixel;
    * its VOID is any category outside ``things``/``stuffs``: ground-truth VOID pixels get the
      label ``len(CLASSES)``, which it maps to its void colour.
    Stuff instance ids are 0 on both sides (torchmetrics resets them; COCO has one segment per
    stuff class). torchmetrics only averages over all classes; the things/stuff split is checked
    on its per-class states with COCO's rule (classes with TP + FP + FN > 0).
    """
    from torchmetrics.detection import PanopticQuality

    rng = np.random.default_rng(seed)
    num_things = len(THINGS)
    reference = PanopticQuality(
        things=set(range(num_things)),
        stuffs=set(range(num_things, len(CLASSES))),
        return_sq_and_rq=True,
    )
    metric = make_metric()
    for i in range(12):
        height, width = rng.integers(12, 30, size=2)
        gt_label, gt_instance = random_panoptic(rng, height, width, num_things)
        gt_label[rng.random((height, width)) < 0.08] = VOID  # scattered VOID pixels
        # Prediction: the ground truth shifted, one thing relabelled, a few random segments
        # painted over it, and no VOID (filled with a stuff class).
        shift = tuple(int(v) for v in rng.integers(-1, 2, size=2))
        pred_label = np.roll(gt_label, shift, axis=(0, 1))
        pred_instance = np.roll(gt_instance, shift, axis=(0, 1))
        void = pred_label == VOID
        pred_label[void], pred_instance[void] = rng.integers(num_things, len(CLASSES)), 0
        things = np.unique(pred_instance[pred_instance > 0])
        if things.size:
            relabel = pred_instance == rng.choice(things)
            pred_label[relabel] = rng.integers(num_things)
        extra_label, extra_instance = random_panoptic(rng, height, width, num_things)
        paint = (extra_instance > 0) & (extra_instance <= rng.integers(1, 4))
        pred_label[paint], pred_instance[paint] = extra_label[paint], extra_instance[paint] + 50

        # Our inputs: a PNG of segment ids (unique per (label, instance)) + segments_info, and
        # the prediction in mmdet's encoding (instance ids start at 1 for things).
        gt_ids = np.where(gt_label == VOID, 0, 1 + gt_label * 1000 + gt_instance)
        segments = [(int(s), int((s - 1) // 1000), False) for s in np.unique(gt_ids) if s != 0]
        pred = pred_label + (pred_instance + (pred_label < num_things)) * INSTANCE_OFFSET
        path = write_png(tmp_path / f'{i}.png', gt_ids)
        metric.process({}, [sample(path, segments, pred, img_id=i)])
        to_tm = lambda lab, ins: torch.from_numpy(np.stack([lab, ins], -1))[None]  # noqa: E731
        reference.update(to_tm(pred_label, pred_instance), to_tm(gt_label, gt_instance))

    ours = make_metric().compute_metrics(metric.results)
    stats = np.zeros((len(CLASSES), 4))
    for rows, values in metric.results:
        stats[rows] += values
    tm_stats = torch.stack(
        [
            reference.true_positives.double(),
            reference.false_positives.double(),
            reference.false_negatives.double(),
            reference.iou_sum,
        ],
        -1,
    ).numpy()
    np.testing.assert_array_equal(stats[:, :3], tm_stats[:, :3])
    # torchmetrics divides in float32 (ours, like panopticapi, in float64): ~1e-7 per IoU.
    np.testing.assert_allclose(stats[:, 3], tm_stats[:, 3], rtol=1e-6, atol=0)
    # Every kind of count occurs, for things and for stuff.
    assert (stats[:2, :3].sum(0) > 0).all() and (stats[2:, :3].sum(0) > 0).all()

    pq, sq, rq = (100 * v.item() for v in reference.compute())
    assert (ours['PQ'], ours['SQ'], ours['RQ']) == pytest.approx((pq, sq, rq), abs=1e-4)
    tp, fp, fn, iou = tm_stats.T
    denom = tp + fp / 2 + fn / 2
    for suffix, subset in (('_th', slice(0, num_things)), ('_st', slice(num_things, None))):
        present = denom[subset] > 0
        assert ours['PQ' + suffix] == pytest.approx(
            100 * (iou[subset][present] / denom[subset][present]).mean(), abs=1e-4
        )
        assert ours['RQ' + suffix] == pytest.approx(
            100 * (tp[subset][present] / denom[subset][present]).mean(), abs=1e-12
        )
