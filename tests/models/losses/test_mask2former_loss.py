"""Mask2FormerCriterion (PEM's losses): the whole computation replayed by hand from the same
random points, matching, empty targets, deep supervision, gradients and errors. Parity with the
official PEM criterion is checked outside the repo (it needs the official code)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from effvision.models.losses.mask2former_loss import (
    Mask2FormerCriterion,
    point_dice_cost,
    point_sigmoid_ce_cost,
)
from effvision.registry import MODELS

SMALL = dict(num_points=4, oversample_ratio=2.0, importance_sample_ratio=0.5)


def _bilinear(grid, x, y):
    """grid_sample at a [0, 1]^2 point, align_corners=False, zeros outside (point_sample)."""
    height, width = len(grid), len(grid[0])
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    value = 0.0
    for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yi < height and 0 <= xi < width:
                value += wy * wx * grid[yi][xi]
    return value


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _bce(x, t):
    return max(x, 0) - x * t + math.log1p(math.exp(-abs(x)))


def _dice(logits, targets):
    probs = [_sigmoid(v) for v in logits]
    inter = sum(p * t for p, t in zip(probs, targets))
    return 1 - (2 * inter + 1) / (sum(probs) + sum(targets) + 1)


def _softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def _replayed_losses(outputs, targets, num_classes, seed, num_points, oversample_ratio, ratio):
    """The official procedure, step by step, drawing the same random numbers in the same order."""
    torch.manual_seed(seed)
    logits_all, masks_all = outputs['pred_logits'].tolist(), outputs['pred_masks'].tolist()
    gt_masks = [t['masks'].double().tolist() for t in targets]
    gt_labels = [t['labels'].tolist() for t in targets]
    num_masks = max(sum(len(lab) for lab in gt_labels), 1)
    queries = len(logits_all[0])

    # Matching: per image, P shared points, cost 2 * -p(class) + 5 * BCE + 5 * dice.
    pairs = []  # (image, query, target) in query order per image
    for b, (logits, masks) in enumerate(zip(logits_all, masks_all)):
        points = torch.rand(1, num_points, 2)[0].tolist()
        pred = [[_bilinear(m, x, y) for x, y in points] for m in masks]
        gt = [[_bilinear(m, x, y) for x, y in points] for m in gt_masks[b]]

        def cost(q, n, pred=pred, gt=gt, logits=logits, b=b):
            bce = sum(_bce(x, t) for x, t in zip(pred[q], gt[n])) / num_points
            prob = _softmax(logits[q])[gt_labels[b][n]]
            return 5 * bce - 2 * prob + 5 * _dice(pred[q], gt[n])

        n_gt = len(gt_labels[b])
        if queries >= n_gt:
            choices = [
                list(zip(p, range(n_gt))) for p in itertools.permutations(range(queries), n_gt)
            ]
        else:
            choices = [
                list(zip(range(queries), p)) for p in itertools.permutations(range(n_gt), queries)
            ]
        best = min(choices, key=lambda c: sum(cost(q, n) for q, n in c))
        pairs.extend((b, q, n) for q, n in sorted(best))

    # Class loss: CE over K+1 with the no-object class weighted 0.1, weighted mean.
    numerator = denominator = 0.0
    for b, logits in enumerate(logits_all):
        matched = {q: gt_labels[b][n] for bb, q, n in pairs if bb == b}
        for q in range(queries):
            label = matched.get(q, num_classes)
            weight = 0.1 if label == num_classes else 1.0
            numerator += weight * -math.log(_softmax(logits[q])[label])
            denominator += weight
    loss_cls = numerator / denominator

    # Mask losses: oversampled candidates, the most uncertain (|logit| smallest) kept, the rest
    # fresh random points; BCE mean over points and dice, summed over matches / num_masks.
    candidates = torch.rand(len(pairs), int(num_points * oversample_ratio), 2).tolist()
    n_uncertain = int(ratio * num_points)
    fresh = torch.rand(len(pairs), num_points - n_uncertain, 2).tolist()
    loss_mask = loss_dice = 0.0
    for i, (b, q, n) in enumerate(pairs):
        pred_map, gt_map = masks_all[b][q], gt_masks[b][n]
        ranked = sorted(candidates[i], key=lambda p: abs(_bilinear(pred_map, *p)))
        points = ranked[:n_uncertain] + fresh[i]
        pred = [_bilinear(pred_map, x, y) for x, y in points]
        gt = [_bilinear(gt_map, x, y) for x, y in points]
        loss_mask += sum(_bce(x, t) for x, t in zip(pred, gt)) / num_points
        loss_dice += _dice(pred, gt)
    return dict(
        loss_cls=2.0 * loss_cls,
        loss_mask=5.0 * loss_mask / num_masks,
        loss_dice=5.0 * loss_dice / num_masks,
    )


def _case(gen, batch, queries, gt_counts, classes=3, size=(4, 6), scale=2):
    """Predictions at (h, w), targets at scale x that (the padded input)."""
    h, w = size
    outputs = dict(
        pred_logits=torch.randn(batch, queries, classes + 1, generator=gen, dtype=torch.float64),
        pred_masks=torch.randn(batch, queries, h, w, generator=gen, dtype=torch.float64) * 3,
    )
    targets = []
    for count in gt_counts:
        masks = torch.rand(count, h * scale, w * scale, generator=gen) > 0.5
        labels = torch.randint(0, classes, (count,), generator=gen)
        targets.append(dict(labels=labels, masks=masks))
    return outputs, targets


@pytest.mark.parametrize(
    'queries, gt_counts',
    [(3, [2]), (2, [3]), (3, [2, 0]), (4, [1, 3])],
    ids=['more_queries', 'more_targets', 'with_empty_image', 'batch'],
)
def test_matches_a_hand_replay_of_the_official_procedure(queries, gt_counts):
    gen = torch.Generator().manual_seed(queries * 10 + len(gt_counts))
    outputs, targets = _case(gen, len(gt_counts), queries, gt_counts)
    crit = Mask2FormerCriterion(3, **SMALL)
    torch.manual_seed(11)
    losses = crit(outputs, targets)
    expected = _replayed_losses(outputs, targets, 3, 11, **_replay_args())
    assert set(losses) == set(expected)
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-9, abs=1e-12), key


def _replay_args():
    return dict(
        num_points=SMALL['num_points'],
        oversample_ratio=SMALL['oversample_ratio'],
        ratio=SMALL['importance_sample_ratio'],
    )


def test_costs_by_hand():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 1.0]], dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 0.0]], dtype=torch.float64)
    ce = point_sigmoid_ce_cost(logits, targets)
    dice = point_dice_cost(logits, targets)
    for q in range(2):
        for n in range(3):
            x, t = logits[q].tolist(), targets[n].tolist()
            assert ce[q, n].item() == pytest.approx(sum(map(_bce, x, t)) / 2, rel=1e-12)
            assert dice[q, n].item() == pytest.approx(_dice(x, t), rel=1e-12)


def test_each_aux_output_is_matched_on_its_own():
    gen = torch.Generator().manual_seed(3)
    outputs, targets = _case(gen, 2, 5, [3, 2], size=(8, 8))
    aux, _ = _case(gen, 2, 5, [3, 2], size=(8, 8))
    crit = Mask2FormerCriterion(3, num_points=64)
    torch.manual_seed(0)
    final_alone = crit(outputs, targets)
    aux_alone = crit(aux, targets)  # continues the random stream, as the aux pass does
    torch.manual_seed(0)
    losses = crit(dict(outputs, aux_outputs=[aux, aux]), targets)
    assert set(losses) == {
        f'{prefix}loss_{term}' for prefix in ('', 'd0.', 'd1.') for term in ('cls', 'mask', 'dice')
    }
    for term in ('loss_cls', 'loss_mask', 'loss_dice'):
        torch.testing.assert_close(losses[term], final_alone[term])
        torch.testing.assert_close(losses[f'd0.{term}'], aux_alone[term])


def test_permuted_targets_give_the_same_losses():
    gen = torch.Generator().manual_seed(4)
    outputs, targets = _case(gen, 2, 6, [4, 3], size=(8, 8))
    permuted = []
    for target in targets:
        order = torch.randperm(len(target['labels']), generator=gen)
        permuted.append(dict(labels=target['labels'][order], masks=target['masks'][order]))
    crit = Mask2FormerCriterion(3, num_points=256)
    torch.manual_seed(2)
    reference = crit(outputs, targets)
    torch.manual_seed(2)
    torch.testing.assert_close(crit(outputs, permuted), reference)


def _three_regions(swap_masks):
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0, :8], masks[1, 8:, :8], masks[2, 8:, 8:] = True, True, True
    labels = torch.tensor([2, 0, 1])
    queries = torch.tensor([4, 0, 2])
    pred_masks = torch.full((1, 6, 16, 16), -10.0)
    pred_masks[0, queries] = masks.float() * 20 - 10
    if swap_masks:
        pred_masks[0, queries[:2]] = pred_masks[0, queries[[1, 0]]].clone()
    pred_logits = torch.full((1, 6, 4), -10.0)
    pred_logits[0, :, -1] = 10.0
    pred_logits[0, queries, -1] = -10.0
    pred_logits[0, queries, labels] = 10.0
    outputs = dict(pred_logits=pred_logits, pred_masks=pred_masks)
    return outputs, [dict(labels=labels, masks=masks)]


def test_matching_finds_the_queries_that_predict_the_targets():
    torch.manual_seed(0)
    right = Mask2FormerCriterion(3, num_points=512)(*_three_regions(False))
    assert right['loss_cls'] < 1e-3
    # Two queries trade masks but keep their classes: the matching follows the masks (cost 5 + 5
    # against 2 for the class), so the class loss jumps and the mask losses stay about the same.
    # They are not near 0: the uncertain points the loss samples lie on the mask borders.
    torch.manual_seed(0)
    swapped = Mask2FormerCriterion(3, num_points=512)(*_three_regions(True))
    assert swapped['loss_cls'] > 10
    for term in ('loss_mask', 'loss_dice'):
        assert swapped[term].item() == pytest.approx(right[term].item(), rel=0.1)


def test_no_targets_at_all():
    gen = torch.Generator().manual_seed(6)
    outputs, targets = _case(gen, 2, 4, [0, 0])
    leaves = [
        outputs['pred_logits'].requires_grad_(True),
        outputs['pred_masks'].requires_grad_(True),
    ]
    losses = Mask2FormerCriterion(3, **SMALL)(outputs, targets)
    assert losses['loss_mask'].item() == 0 and losses['loss_dice'].item() == 0
    expected_cls = -torch.log_softmax(outputs['pred_logits'], -1)[..., -1].mean() * 2.0
    torch.testing.assert_close(losses['loss_cls'], expected_cls)
    grads = torch.autograd.grad(sum(losses.values()), leaves)
    assert all(torch.isfinite(g).all() for g in grads)


def test_gradients_reach_every_output():
    gen = torch.Generator().manual_seed(7)
    outputs, targets = _case(gen, 2, 5, [2, 3], size=(8, 8))
    aux, _ = _case(gen, 2, 5, [2, 3], size=(8, 8))
    leaves = [*outputs.values(), *aux.values()]
    for leaf in leaves:
        leaf.requires_grad_(True)
    losses = Mask2FormerCriterion(3, num_points=128)(dict(outputs, aux_outputs=[aux]), targets)
    grads = torch.autograd.grad(sum(losses.values()), leaves)
    for grad in grads:
        assert torch.isfinite(grad).all() and grad.abs().max() > 0


def test_float32_defaults_run():
    gen = torch.Generator().manual_seed(8)
    outputs, targets = _case(gen, 2, 8, [3, 5], size=(16, 16), scale=4)
    outputs = {k: v.float() for k, v in outputs.items()}
    losses = Mask2FormerCriterion(3)(outputs, targets)  # 12544 points, as published
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_half_precision_outputs_are_promoted():
    gen = torch.Generator().manual_seed(10)
    outputs, targets = _case(gen, 2, 5, [2, 3], size=(8, 8))
    half = {k: v.to(torch.bfloat16).requires_grad_(True) for k, v in outputs.items()}
    crit = Mask2FormerCriterion(3, num_points=64)
    torch.manual_seed(0)
    losses = crit(half, targets)
    torch.manual_seed(0)
    reference = crit({k: v.detach().float() for k, v in half.items()}, targets)
    assert all(v.dtype == torch.float32 for v in losses.values())
    torch.testing.assert_close(losses, reference)
    grads = torch.autograd.grad(sum(losses.values()), list(half.values()))
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


def test_registered_in_our_scope_only():
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmseg.registry import MODELS as MMSEG_MODELS

    crit = MODELS.build(dict(type='Mask2FormerCriterion', num_classes=3, num_points=100))
    assert isinstance(crit, Mask2FormerCriterion) and crit.num_points == 100
    assert (crit.class_weight, crit.mask_weight, crit.dice_weight) == (2.0, 5.0, 5.0)
    assert (crit.cost_class, crit.cost_mask, crit.cost_dice) == (2.0, 5.0, 5.0)
    assert crit.no_object_weight == 0.1 and crit.num_points == 100
    assert 'Mask2FormerCriterion' not in MMSEG_MODELS.module_dict
    assert 'Mask2FormerCriterion' not in MMDET_MODELS.module_dict


def test_clear_errors():
    gen = torch.Generator().manual_seed(9)
    outputs, targets = _case(gen, 1, 3, [2])
    with pytest.raises(ValueError, match='num_classes'):
        Mask2FormerCriterion(4)(outputs, targets)
    with pytest.raises(ValueError, match=r'\[0, 3\)'):
        Mask2FormerCriterion(3)(outputs, [dict(targets[0], labels=torch.tensor([0, 3]))])
    with pytest.raises(ValueError, match='2 target dicts'):
        Mask2FormerCriterion(3)(outputs, targets * 2)
    with pytest.raises(KeyError, match='pred_masks'):
        Mask2FormerCriterion(3)(dict(pred_logits=outputs['pred_logits']), targets)
    with pytest.raises(ValueError, match='all be 0'):
        Mask2FormerCriterion(3, cost_class=0, cost_mask=0, cost_dice=0)
    with pytest.raises(ValueError, match='importance_sample_ratio'):
        Mask2FormerCriterion(3, importance_sample_ratio=1.5)
