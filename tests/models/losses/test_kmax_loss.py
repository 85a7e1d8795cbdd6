"""KMaXCriterion: every term against a hand computation, matching, void pixels, empty targets,
sampling, gradients and errors. Parity with the official criterion is checked outside the repo
(it needs the official code); these tests pin the same formulas independently."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from effvision.models.losses.kmax_loss import KMaXCriterion, gumbel_topk, sampling_stride
from effvision.registry import MODELS

# ---------------------------------------------------------------------------------------------
# The hand case: one 8x8 image, predictions at 2x2 (stride 4), K = 2 classes, 3 queries.
# Subsampling [::4, ::4] keeps input pixels (0,0), (0,4), (4,0), (4,4) = prediction pixels 0..3.
# Mask A (class 0) is the top half -> pixels 0, 1; mask B (class 1) the bottom-left block ->
# pixel 2; the bottom-right block is void -> pixel 3, except a speck C (class 1) at (5, 5) that
# the subsampling misses, so it must be dropped.
# ---------------------------------------------------------------------------------------------
MASK_LOGITS = [[3.0, 2.0, -1.0, 0.0], [-1.0, 0.0, 2.5, 0.5], [0.0, -1.0, 0.0, 2.0]]
CLASS_LOGITS = [[2.0, -1.0, 0.0], [-0.5, 1.5, 0.2], [0.1, -0.3, 1.0]]
ANGLES = [0.0, 0.3, 2.0, 4.0]  # pixel embeddings (cos, sin)
SEMANTIC_LOGITS = [[0.5, -0.2, 1.0, 0.3], [-1.0, 0.7, 0.4, 0.0], [0.2, 0.1, -0.6, 2.0]]
GT = {'A': ([1, 1, 0, 0], 0), 'B': ([0, 0, 1, 0], 1)}
NON_VOID = [1, 1, 1, 0]


def _hand_case(dtype=torch.float64):
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :4] = True
    masks[1, 4:, :4] = True
    masks[2, 5, 5] = True
    semantic = torch.full((8, 8), 255)
    semantic[:4] = 0
    semantic[4:, :4] = 1
    semantic[5, 5] = 1
    target = dict(labels=torch.tensor([0, 1, 1]), masks=masks, semantic=semantic)
    feature = torch.tensor(
        [[math.cos(a) for a in ANGLES], [math.sin(a) for a in ANGLES]], dtype=torch.float64
    )
    outputs = dict(
        pred_logits=torch.tensor([CLASS_LOGITS], dtype=dtype),
        pred_masks=torch.tensor([MASK_LOGITS], dtype=dtype).view(1, 3, 2, 2),
        pixel_feature=feature.to(dtype).view(1, 2, 2, 2),
        aux_semantic=torch.tensor([SEMANTIC_LOGITS], dtype=dtype).view(1, 3, 2, 2),
    )
    return outputs, [target]


def _softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def _expected_hand_losses():
    """The published formulas, written out pixel by pixel for the hand case."""
    probs = [_softmax([MASK_LOGITS[q][px] for q in range(3)]) for px in range(4)]
    p = [[probs[px][q] for px in range(4)] for q in range(3)]  # p[query][pixel]
    cls = [_softmax(row) for row in CLASS_LOGITS]

    def similarity(q, mask):  # matching dice, void pixels' probability zeroed
        pv = [p[q][px] * NON_VOID[px] for px in range(4)]
        inter = sum(pv[px] * mask[px] for px in range(4))
        return inter / ((sum(pv) + sum(mask)) / 2 + 1e-5)

    # The assumed matching q0 <-> A, q1 <-> B must be the optimum of -dice x prob.
    def total(assign):
        return sum(-similarity(q, GT[n][0]) * cls[q][GT[n][1]] for q, n in zip(assign, 'AB'))

    best = min(itertools.permutations(range(3), 2), key=total)
    assert best == (0, 1)

    void = [1 - v for v in NON_VOID]
    weights = [
        max(similarity(0, GT['A'][0]), 1e-5),
        max(similarity(1, GT['B'][0]), 1e-5),
        max(sum(p[2][px] * void[px] for px in range(4)) / (sum(p[2]) + 1e-5), 1e-5),
    ]
    target_class = [0, 1, 2]
    alpha = [0.75, 0.75, 0.25]
    terms = [-math.log(cls[q][target_class[q]]) * alpha[q] * weights[q] for q in range(3)]
    loss_cls = 3.0 * sum(terms) / 3

    owner = [0, 0, 1]  # matched query of pixels 0..2; pixel 3 is void
    loss_mask = 0.3 * sum(-math.log(p[owner[px]][px]) for px in range(3)) / 3

    dice_terms = []
    for q, name in ((0, 'A'), (1, 'B')):
        mask, label = GT[name]
        pv = [p[q][px] * NON_VOID[px] for px in range(4)]
        dice = (2 * sum(pv[px] * mask[px] for px in range(4)) + 1) / (sum(pv) + sum(mask) + 1)
        dice_terms.append((1 - dice) * max(cls[q][label], 1e-5))
    loss_dice = 3.0 * sum(dice_terms) * 0.75 / 3

    group = [0, 0, 1, None]
    feats = [(math.cos(a), math.sin(a)) for a in ANGLES]
    insdis = []
    for k in range(3):
        same = [1.0 if group[j] == group[k] else 0.0 for j in range(4)]
        logits = [(feats[k][0] * feats[j][0] + feats[k][1] * feats[j][1]) / 0.3 for j in range(4)]
        log_norm = math.log(sum(math.exp(v) for v in logits))
        insdis.append(-sum(s / sum(same) * (v - log_norm) for s, v in zip(same, logits)))
    loss_insdis = sum(insdis) / 3

    semantic = [0, 0, 1]
    sem_ce = []
    for px in range(3):
        column = [SEMANTIC_LOGITS[c][px] for c in range(3)]
        sem_ce.append(-math.log(_softmax(column)[semantic[px]]))
    loss_aux_semantic = sum(sem_ce) / 3
    return dict(
        loss_cls=loss_cls,
        loss_mask=loss_mask,
        loss_dice=loss_dice,
        loss_insdis=loss_insdis,
        loss_aux_semantic=loss_aux_semantic,
    )


def _hand_criterion(**kwargs):
    # Four pixels: K >= 4 draws them all, so the Gumbel sampling cannot change the loss.
    kwargs = dict(dict(insdis_sample_k=4096, aux_semantic_sample_k=0), **kwargs)
    return KMaXCriterion(num_classes=2, **kwargs)


def test_every_term_matches_the_hand_computation():
    outputs, targets = _hand_case()
    losses = _hand_criterion()(outputs, targets)
    expected = _expected_hand_losses()
    assert set(losses) == set(expected)
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-10, abs=1e-12), key


def test_sampled_aux_semantic_equals_plain_when_all_pixels_are_drawn():
    outputs, targets = _hand_case()
    plain = _hand_criterion(aux_semantic_sample_k=0)(outputs, targets)
    sampled = _hand_criterion(aux_semantic_sample_k=64)(outputs, targets)
    torch.testing.assert_close(sampled['loss_aux_semantic'], plain['loss_aux_semantic'])


def test_aux_outputs_share_the_final_matching_and_use_mmdet_keys():
    outputs, targets = _hand_case()
    aux = {k: v.clone() for k, v in outputs.items() if k != 'aux_semantic'}
    outputs['aux_outputs'] = [aux, dict(aux)]
    losses = _hand_criterion()(outputs, targets)
    for i in range(2):
        for term in ('loss_cls', 'loss_mask', 'loss_dice', 'loss_insdis'):
            torch.testing.assert_close(losses[f'd{i}.{term}'], losses[term])
    assert 'd0.loss_aux_semantic' not in losses  # final output only


def test_unshared_matching_treats_each_aux_output_on_its_own():
    gen = torch.Generator().manual_seed(3)
    outputs, targets = _random_case(gen, batch=2, queries=6)
    aux = _random_outputs(gen, 2, 6, 8, 8)
    outputs['aux_outputs'] = [aux]
    crit = KMaXCriterion(4, share_final_matching=False, insdis_sample_k=64, aux_semantic_weight=0)
    losses = crit(outputs, targets)
    alone = crit(aux, targets)
    for term in ('loss_cls', 'loss_mask', 'loss_dice', 'loss_insdis'):
        torch.testing.assert_close(losses[f'd0.{term}'], alone[term])
    shared = KMaXCriterion(4, insdis_sample_k=64, aux_semantic_weight=0)(outputs, targets)
    # Shared matching weights the aux classes with the final output's dice: a different number.
    assert not torch.allclose(shared['d0.loss_cls'], alone['loss_cls'])


def test_weights_scale_terms_and_zero_drops_them():
    outputs, targets = _hand_case()
    base = _hand_criterion()(outputs, targets)
    crit = _hand_criterion(
        class_weight=1.0, dice_weight=6.0, mask_weight=0.0, insdis_weight=2.0,
        aux_semantic_weight=0.0,
    )  # fmt: skip
    losses = crit(outputs, targets)
    assert set(losses) == {'loss_cls', 'loss_dice', 'loss_insdis'}
    torch.testing.assert_close(losses['loss_cls'], base['loss_cls'] / 3)
    torch.testing.assert_close(losses['loss_dice'], base['loss_dice'] * 2)
    torch.testing.assert_close(losses['loss_insdis'], base['loss_insdis'] * 2)


# ---------------------------------------------------------------------------------------------
# Void pixels
# ---------------------------------------------------------------------------------------------
def test_void_pixels_give_no_mask_gradient():
    outputs, targets = _hand_case()
    outputs['pred_masks'].requires_grad_(True)
    losses = _hand_criterion()(outputs, targets)
    (grad,) = torch.autograd.grad(losses['loss_mask'] + losses['loss_dice'], outputs['pred_masks'])
    assert grad[..., 1, 1].abs().max() == 0  # the void pixel
    assert grad[..., 0, 0].abs().max() > 0


def test_void_pixels_are_not_sampled_while_labelled_ones_remain():
    outputs, targets = _hand_case()
    outputs['pixel_feature'].requires_grad_(True)
    crit = _hand_criterion(insdis_sample_k=3)  # exactly the labelled pixels
    losses = []
    for _ in range(5):
        loss = crit(outputs, targets)['loss_insdis']
        (grad,) = torch.autograd.grad(loss, outputs['pixel_feature'])
        assert grad[..., 1, 1].abs().max() == 0
        losses.append(loss.item())
    assert losses == pytest.approx([losses[0]] * 5, rel=1e-12)
    # With K = 4 the void pixel is drawn as filler and enters the others' softmax.
    assert losses[0] != pytest.approx(_expected_hand_losses()['loss_insdis'], rel=1e-6)


def test_ignored_semantic_pixels_do_not_count():
    outputs, targets = _hand_case()
    outputs['aux_semantic'].requires_grad_(True)
    loss = _hand_criterion()(outputs, targets)['loss_aux_semantic']
    (grad,) = torch.autograd.grad(loss, outputs['aux_semantic'])
    assert grad[..., 1, 1].abs().max() == 0


def test_a_mask_missed_by_the_subsampling_is_dropped():
    outputs, targets = _hand_case()
    without = dict(targets[0])
    without['labels'], without['masks'] = without['labels'][:2], without['masks'][:2]
    crit = _hand_criterion()
    torch.testing.assert_close(crit(outputs, targets), crit(outputs, [without]))


# ---------------------------------------------------------------------------------------------
# Random cases: matching invariance, empty targets, gradients
# ---------------------------------------------------------------------------------------------
def _random_outputs(gen, batch, queries, h, w, classes=4, dim=8, semantic_channels=5):
    return dict(
        pred_logits=torch.randn(batch, queries, classes + 1, generator=gen),
        pred_masks=torch.randn(batch, queries, h, w, generator=gen) * 3,
        pixel_feature=F.normalize(torch.randn(batch, dim, h, w, generator=gen), dim=1),
        aux_semantic=torch.randn(batch, semantic_channels, h, w, generator=gen),
    )


def _random_target(gen, size, segments, classes=4):
    """Segments made of 4x4 blocks (so none vanishes at stride 4), 0 = void."""
    h, w = size
    seg = torch.randint(0, segments + 1, (-(-h // 4), -(-w // 4)), generator=gen)
    seg = seg.repeat_interleave(4, 0).repeat_interleave(4, 1)[:h, :w]
    ids = [i for i in range(1, segments + 1) if (seg == i).any()]
    masks = torch.stack([seg == i for i in ids]) if ids else torch.zeros(0, h, w, dtype=torch.bool)
    labels = torch.randint(0, classes, (len(ids),), generator=gen)
    semantic = torch.full((h, w), 255)
    for mask, label in zip(masks, labels):
        semantic[mask] = label
    return dict(labels=labels, masks=masks, semantic=semantic)


def _random_case(gen, batch=2, queries=8, size=(32, 32), segments=(5, 3)):
    outputs = _random_outputs(gen, batch, queries, size[0] // 4, size[1] // 4)
    targets = [_random_target(gen, size, segments[b % len(segments)]) for b in range(batch)]
    return outputs, targets


def test_permuted_targets_give_the_same_losses():
    gen = torch.Generator().manual_seed(0)
    outputs, targets = _random_case(gen)
    permuted = []
    for target in targets:
        order = torch.randperm(len(target['labels']), generator=gen)
        permuted.append(dict(target, labels=target['labels'][order], masks=target['masks'][order]))
    crit = KMaXCriterion(4, insdis_sample_k=16, aux_semantic_sample_k=16)
    torch.manual_seed(1)
    reference = crit(outputs, targets)
    torch.manual_seed(1)
    losses = crit(outputs, permuted)
    torch.testing.assert_close(losses, reference)


def test_matching_finds_the_queries_that_predict_the_targets():
    gen = torch.Generator().manual_seed(0)
    target = _random_target(gen, (32, 32), 4)
    masks = target['masks'][:, ::4, ::4].float()
    queries = torch.randperm(6, generator=gen)[: len(masks)]
    pred_masks = torch.full((1, 6, 8, 8), -4.0)
    pred_masks[0, queries] = masks * 8 - 4
    pred_logits = torch.zeros(1, 6, 5)
    pred_logits[0, :, -1] = 10.0
    pred_logits[0, queries, -1] = 0.0
    pred_logits[0, queries, target['labels']] = 10.0
    outputs = dict(pred_logits=pred_logits, pred_masks=pred_masks)
    losses = KMaXCriterion(4, insdis_weight=0, aux_semantic_weight=0)(outputs, [target])
    # Any other matching would put a -4 logit on the target pixels (mask-ID CE of about 8).
    assert losses['loss_mask'] < 0.3 * 0.01
    assert losses['loss_dice'] < 0.01
    assert losses['loss_cls'] < 0.01


def test_permuted_queries_give_the_same_losses():
    gen = torch.Generator().manual_seed(8)
    outputs, targets = _random_case(gen)
    order = torch.randperm(8, generator=gen)
    permuted = dict(outputs)
    permuted['pred_logits'] = outputs['pred_logits'][:, order]
    permuted['pred_masks'] = outputs['pred_masks'][:, order]
    crit = KMaXCriterion(4, insdis_sample_k=16, aux_semantic_sample_k=16)
    torch.manual_seed(1)
    reference = crit(outputs, targets)
    torch.manual_seed(1)
    torch.testing.assert_close(crit(permuted, targets), reference)


@pytest.mark.parametrize('segments', [(0, 3), (0, 0)])
def test_images_without_masks(segments):
    gen = torch.Generator().manual_seed(2)
    outputs, targets = _random_case(gen, segments=segments)
    leaves = [v.requires_grad_(True) for v in outputs.values()]
    losses = KMaXCriterion(4, insdis_sample_k=16, aux_semantic_sample_k=16)(outputs, targets)
    assert set(losses) == {'loss_cls', 'loss_mask', 'loss_dice', 'loss_insdis', 'loss_aux_semantic'}
    for key, value in losses.items():
        assert torch.isfinite(value), key
    grads = torch.autograd.grad(sum(losses.values()), leaves, allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    if segments == (0, 0):
        # Nothing labelled: every query is void, the pixel terms have nothing to compare.
        for key in ('loss_mask', 'loss_dice', 'loss_insdis', 'loss_aux_semantic'):
            assert losses[key].item() == 0, key
        assert losses['loss_cls'] > 0


def test_more_masks_than_queries():
    gen = torch.Generator().manual_seed(4)
    outputs, targets = _random_case(gen, queries=2, segments=(6, 5))
    losses = KMaXCriterion(4, insdis_sample_k=16, aux_semantic_sample_k=16)(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_gradients_reach_every_output():
    gen = torch.Generator().manual_seed(5)
    outputs, targets = _random_case(gen)
    outputs['aux_outputs'] = [_random_outputs(gen, 2, 8, 8, 8) for _ in range(2)]
    for aux in outputs['aux_outputs']:
        aux.pop('aux_semantic')
    leaves = {k: v for k, v in outputs.items() if k != 'aux_outputs'}
    for i, aux in enumerate(outputs['aux_outputs']):
        leaves.update({f'aux{i}.{k}': v for k, v in aux.items()})
    for value in leaves.values():
        value.requires_grad_(True)
    losses = KMaXCriterion(4, insdis_sample_k=32, aux_semantic_sample_k=32)(outputs, targets)
    assert len(losses) == 5 + 2 * 4
    grads = torch.autograd.grad(sum(losses.values()), list(leaves.values()))
    for name, grad in zip(leaves, grads):
        assert torch.isfinite(grad).all() and grad.abs().max() > 0, name


def test_half_precision_outputs_are_promoted():
    gen = torch.Generator().manual_seed(6)
    outputs, targets = _random_case(gen)
    half = {k: v.to(torch.bfloat16) for k, v in outputs.items()}
    crit = KMaXCriterion(4, insdis_sample_k=16, aux_semantic_sample_k=16)
    torch.manual_seed(0)
    losses = crit(half, targets)
    torch.manual_seed(0)
    reference = crit({k: v.float() for k, v in half.items()}, targets)
    assert all(v.dtype == torch.float32 for v in losses.values())
    torch.testing.assert_close(losses, reference)


def test_odd_canvas_and_stride_32_aux_semantic():
    """deeplab2's odd canvases (129x97 -> 33x25) and a Cityscapes-style stride-32 aux head."""
    gen = torch.Generator().manual_seed(7)
    target = _random_target(gen, (129, 97), 6)
    outputs = _random_outputs(gen, 1, 8, 33, 25)
    outputs['aux_semantic'] = torch.randn(1, 4, 5, 4, generator=gen)
    crit = KMaXCriterion(4, insdis_sample_temperature=0.6, aux_semantic_sample_k=0)
    losses = crit(outputs, [target])
    assert all(torch.isfinite(v) for v in losses.values())
    semantic = target['semantic'][::32, ::32]
    assert semantic.shape == (5, 4)
    expected = F.cross_entropy(outputs['aux_semantic'], semantic[None], ignore_index=255)
    torch.testing.assert_close(losses['loss_aux_semantic'], expected)


# ---------------------------------------------------------------------------------------------
# Helpers: stride, sampling
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    'size, target, stride',
    [
        ((128, 96), (32, 24), 4),
        ((129, 97), (33, 25), 4),
        ((1281, 1281), (321, 321), 4),
        ((1025, 2049), (33, 65), 32),
        ((32, 24), (4, 3), 8),
        ((64, 64), (64, 64), 1),
    ],
)
def test_sampling_stride(size, target, stride):
    assert sampling_stride(size, target) == stride
    assert torch.zeros(size)[::stride, ::stride].shape == target


@pytest.mark.parametrize('size, target', [((128, 96), (30, 24)), ((128, 96), (32, 12))])
def test_sampling_stride_rejects_other_sizes(size, target):
    with pytest.raises(ValueError, match='power-of-two stride'):
        sampling_stride(size, target)


def test_gumbel_topk_follows_the_softmax():
    probs = torch.tensor([0.1, 0.2, 0.7])
    draws = gumbel_topk(probs.log().expand(20000, -1).contiguous(), 1)[:, 0]
    freq = torch.bincount(draws, minlength=3).double() / len(draws)
    torch.testing.assert_close(freq, probs.double(), atol=0.015, rtol=0)


def test_gumbel_topk_without_replacement_and_capped():
    logits = torch.tensor([[0.0, 0.0, -99999.0, 0.0]]).expand(200, -1).contiguous()
    draws = gumbel_topk(logits, 3)
    assert (draws != 2).all()
    assert (draws.sort(-1).values == torch.tensor([0, 1, 3])).all()
    assert gumbel_topk(logits, 10).shape == (200, 4)


def test_pixels_of_small_masks_are_drawn_more_often():
    # Pixel 0 is a 1-pixel mask, pixels 1..3 one 3-pixel mask: weights (4/1)^1.5 vs (4/3)^1.5.
    inverse_area = torch.tensor([[4.0, 4 / 3, 4 / 3, 4 / 3]]).expand(20000, -1)
    void = torch.zeros(20000, 4, dtype=torch.bool)
    draws = KMaXCriterion._sample_pixels(inverse_area, void, 1.5, 1)[:, 0]
    expected = 8 / (8 + 3 * (4 / 3) ** 1.5)
    assert (draws == 0).double().mean().item() == pytest.approx(expected, abs=0.015)


# ---------------------------------------------------------------------------------------------
# Registry and errors
# ---------------------------------------------------------------------------------------------
def test_registered_in_our_scope_only():
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmseg.registry import MODELS as MMSEG_MODELS

    crit = MODELS.build(dict(type='KMaXCriterion', num_classes=3, class_weight=1.0))
    assert isinstance(crit, KMaXCriterion) and crit.class_weight == 1.0
    assert crit.insdis_sample_temperature == 1.5 and crit.no_object_weight == 1e-5
    assert 'KMaXCriterion' not in MMSEG_MODELS.module_dict
    assert 'KMaXCriterion' not in MMDET_MODELS.module_dict


def test_clear_errors():
    outputs, targets = _hand_case()
    with pytest.raises(ValueError, match='num_classes'):
        KMaXCriterion(3)(outputs, targets)
    no_feature = {k: v for k, v in outputs.items() if k != 'pixel_feature'}
    with pytest.raises(KeyError, match='insdis_weight=0'):
        _hand_criterion()(no_feature, targets)
    no_semantic = {k: v for k, v in outputs.items() if k != 'aux_semantic'}
    with pytest.raises(KeyError, match='aux_semantic_weight=0'):
        _hand_criterion()(no_semantic, targets)
    no_target_semantic = [{k: v for k, v in targets[0].items() if k != 'semantic'}]
    with pytest.raises(KeyError, match='semantic'):
        _hand_criterion()(outputs, no_target_semantic)
    odd_shape = [dict(targets[0], masks=torch.zeros(3, 16, 8) > 0, semantic=torch.zeros(16, 8))]
    with pytest.raises(ValueError, match='power-of-two stride'):
        _hand_criterion()(outputs, odd_shape)
    with pytest.raises(ValueError, match='padded input size'):
        _hand_criterion()(outputs, [dict(targets[0], semantic=torch.zeros(4, 4))])
    with pytest.raises(ValueError, match=r'\[0, 2\)'):
        _hand_criterion()(outputs, [dict(targets[0], labels=torch.tensor([0, 2, 1]))])
    with pytest.raises(ValueError, match='2 target dicts'):
        _hand_criterion()(outputs, targets * 2)
    with pytest.raises(ValueError, match='>= 0'):
        KMaXCriterion(2, dice_weight=-1.0)
