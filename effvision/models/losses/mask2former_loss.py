"""Mask2Former's set-prediction losses as PEM trains with them: Hungarian matching on randomly
sampled points, then class cross-entropy and point-sampled sigmoid BCE and dice on every output.

Cheng et al., "Masked-attention Mask Transformer for Universal Image Segmentation", CVPR 2022;
used unchanged by Cavagnero et al., "PEM: Prototype-based Efficient MaskFormer", CVPR 2024,
official code NiccoloCavagnero/PEM at 2dfeb3d (``pem/modeling/criterion.py``, ``matcher.py``,
``pem/maskformer_model.py`` for the weights). Same numbers as the official criterion on the same
inputs and random state (the point sampling is mmdet's/mmcv's, identical to detectron2's).
Differences: the loss weights are applied here and the keys follow mmdet (``loss_cls``,
``d0.loss_cls``, ...). As in the official code, target pixels outside every mask (ignored or
padded) are negatives for the mask losses; mmdet's ``Mask2FormerHead`` differs from the official
criterion in normalising by the matched rather than the ground-truth mask count, which we do not
follow.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.ops import point_sample
from mmdet.models.utils import get_uncertain_point_coords_with_randomness
from mmengine.dist import all_reduce

from effvision.registry import MODELS

from .matching import MatchIndices, check_prediction, check_target, hungarian_match, query_index


def point_sigmoid_ce_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over points of every prediction against every target.

    Args:
        logits: (Q, P) mask logits at P points.
        targets: (N, P) target mask values at the same points.

    Returns:
        (Q, N) costs.
    """
    # BCE(x, t) = softplus(-x) * t + softplus(x) * (1 - t), split so both terms are matmuls.
    positive = F.softplus(-logits)
    negative = F.softplus(logits)
    return (positive @ targets.T + negative @ (1 - targets).T) / logits.shape[1]


def point_dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One minus the +1-smoothed dice of every sigmoid prediction with every target: (Q, N)."""
    probs = logits.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


@MODELS.register_module()
class Mask2FormerCriterion(nn.Module):
    """Mask2Former/PEM losses for the final prediction and every auxiliary one.

    Each output is matched on its own (Hungarian, cost ``cost_class * -p(class) + cost_mask *
    BCE + cost_dice * dice`` on ``num_points`` uniformly random points shared by all masks of an
    image). Matched and unmatched queries get a cross-entropy over K+1 classes (unmatched ones
    target the no-object class, weighted ``no_object_weight``); matched masks get a sigmoid BCE
    and a dice loss on ``num_points`` points, ``importance_sample_ratio`` of them the most
    uncertain of ``oversample_ratio x num_points`` random ones and the rest uniformly random.
    Mask losses are divided by the number of ground-truth masks in the batch (averaged over
    processes, at least 1). Computed in float32 (half-precision outputs are promoted) outside
    autocast. Defaults are PEM's published ones (all its configs).

    Args:
        num_classes: K, the number of classes (class logits have K + 1 entries, the last void).
        class_weight: Weight of the classification loss.
        mask_weight: Weight of the point BCE.
        dice_weight: Weight of the point dice loss.
        no_object_weight: Class-loss weight of the no-object class.
        cost_class: Matching cost weight of the class probability.
        cost_mask: Matching cost weight of the point BCE.
        cost_dice: Matching cost weight of the point dice.
        num_points: Points per mask, for the matching and for the losses.
        oversample_ratio: Candidates per point for the uncertainty-based sampling.
        importance_sample_ratio: Fraction of the points taken by uncertainty.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f'num_classes must be >= 1, got {num_classes}')
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError('cost_class, cost_mask and cost_dice cannot all be 0')
        if num_points < 1:
            raise ValueError(f'num_points must be >= 1, got {num_points}')
        if oversample_ratio < 1:
            raise ValueError(f'oversample_ratio must be >= 1, got {oversample_ratio}')
        if not 0 <= importance_sample_ratio <= 1:
            raise ValueError(
                f'importance_sample_ratio must lie in [0, 1], got {importance_sample_ratio}'
            )
        self.num_classes = num_classes
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.no_object_weight = no_object_weight
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Computes the weighted losses.

        Args:
            outputs: ``pred_logits`` (B, Q, K+1), ``pred_masks`` (B, Q, h, w) mask logits, and
                ``aux_outputs``: a list of dicts with the same two keys.
            targets: One dict per image: ``labels`` (N,) int in [0, K) and ``masks`` (N, H, W)
                bool at the padded input size (other keys are ignored).

        Returns:
            ``loss_cls``, ``loss_mask``, ``loss_dice`` for the final output and
            ``d{i}.loss_cls`` ... for ``aux_outputs[i]``, each already weighted.
        """
        logits, masks = check_prediction(outputs, 'outputs', self.num_classes)
        if len(targets) != logits.shape[0]:
            raise ValueError(f'got {len(targets)} target dicts for a batch of {logits.shape[0]}')
        labels, gt_masks, padded_masks = self._prepare_targets(targets, logits.device)

        num_masks = logits.new_tensor([float(sum(len(lab) for lab in labels))])
        all_reduce(num_masks, op='mean')
        num_masks = num_masks.clamp_min(1.0).item()

        # Everything in float32 (half-precision outputs promoted) outside autocast: the official
        # matcher leaves autocast for its costs, and its losses cast or autocast to float32.
        target = (labels, gt_masks, padded_masks)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            losses = self._output_losses(logits, masks, *target, num_masks, '')
            for i, aux in enumerate(outputs.get('aux_outputs', [])):
                aux_logits, aux_masks = check_prediction(aux, f'aux_outputs[{i}]', self.num_classes)
                losses.update(
                    self._output_losses(aux_logits, aux_masks, *target, num_masks, f'd{i}.')
                )
        return losses

    def _prepare_targets(
        self, targets: list[dict], device: torch.device
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Labels and masks per image, and all masks zero-padded to (B, N_max, H_max, W_max)."""
        labels, masks = [], []
        for i, target in enumerate(targets):
            gt_masks, gt_labels = check_target(target, i, self.num_classes)
            labels.append(gt_labels.to(device).long())
            masks.append(gt_masks.to(device))
        # The losses see the masks zero-padded to the largest size (bottom/right), the matching
        # sees each image's own, as in the official code; with every target at the padded input
        # size (the usual case) the two are the same.
        n, h, w = (max(m.shape[d] for m in masks) for d in range(3))
        padded = torch.zeros(len(masks), n, h, w, device=device)
        for out, m in zip(padded, masks):
            out[: m.shape[0], : m.shape[1], : m.shape[2]] = m
        return labels, masks, padded

    @torch.no_grad()
    def _match(
        self,
        logits: torch.Tensor,
        masks: torch.Tensor,
        labels: list[torch.Tensor],
        gt_masks: list[torch.Tensor],
    ) -> list[MatchIndices]:
        indices = []
        for b in range(logits.shape[0]):
            num_gt = len(labels[b])
            # One set of points per image, for all its masks (the official RNG call).
            points = torch.rand(1, self.num_points, 2, device=masks.device).to(masks.dtype)
            gt = point_sample(gt_masks[b][:, None].to(masks.dtype), points.expand(num_gt, -1, -1))
            pred = point_sample(masks[b][:, None], points.expand(masks.shape[1], -1, -1))
            pred, gt = pred[:, 0], gt[:, 0]
            cost = (
                self.cost_mask * point_sigmoid_ce_cost(pred, gt)
                - self.cost_class * logits[b].softmax(-1)[:, labels[b]]
                + self.cost_dice * point_dice_cost(pred, gt)
            )
            indices.append(hungarian_match(cost))
        return indices

    def _output_losses(
        self,
        logits: torch.Tensor,
        masks: torch.Tensor,
        labels: list[torch.Tensor],
        gt_masks: list[torch.Tensor],
        padded_masks: torch.Tensor,
        num_masks: float,
        prefix: str,
    ) -> dict[str, torch.Tensor]:
        logits, masks = _float(logits), _float(masks)
        indices = self._match(logits, masks, labels, gt_masks)
        src = query_index(indices)

        target_classes = torch.full(logits.shape[:2], self.num_classes, device=logits.device)
        target_classes[src] = torch.cat([lab[cols] for lab, (_, cols) in zip(labels, indices)])
        class_weights = logits.new_ones(self.num_classes + 1)
        class_weights[-1] = self.no_object_weight
        loss_cls = F.cross_entropy(logits.transpose(1, 2), target_classes, class_weights)

        pred = masks[src][:, None]  # (M, 1, h, w)
        target = torch.cat([gt[cols] for gt, (_, cols) in zip(padded_masks, indices)])[:, None]
        target = target.to(pred.dtype)
        with torch.no_grad():
            # mmdet draws float32 points, so it samples a float32 copy (float64 runs).
            points = get_uncertain_point_coords_with_randomness(
                pred.float(), None, self.num_points, self.oversample_ratio,
                self.importance_sample_ratio,
            ).to(pred.dtype)  # fmt: skip
            point_targets = point_sample(target, points)[:, 0]
        point_logits = point_sample(pred, points)[:, 0]

        bce = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction='none')
        loss_mask = bce.mean(1).sum() / num_masks
        probs = point_logits.sigmoid()
        dice = (2 * (probs * point_targets).sum(-1) + 1) / (
            probs.sum(-1) + point_targets.sum(-1) + 1
        )
        loss_dice = (1 - dice).sum() / num_masks
        return {
            prefix + 'loss_cls': self.class_weight * loss_cls,
            prefix + 'loss_mask': self.mask_weight * loss_mask,
            prefix + 'loss_dice': self.dice_weight * loss_dice,
        }


def _float(x: torch.Tensor) -> torch.Tensor:
    """Half precision is promoted (the official code casts to float32); float64 is kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
