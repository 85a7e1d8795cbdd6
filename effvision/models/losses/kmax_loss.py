"""kMaX-DeepLab's training losses: PQ-style class and dice terms, mask-ID cross-entropy, pixel-wise
instance discrimination and the auxiliary semantic loss, with one Hungarian matching per step.

Yu et al., "k-means Mask Transformer", ECCV 2022; official PyTorch code bytedance/kmax-deeplab at
f8e1d04 (``kmax_deeplab/modeling/criterion.py``, ``matcher.py``, ``kmax_model.py``, the dataset
mapper for the target resolution), itself a port of google-research/deeplab2's
``model/loss/max_deeplab_loss.py``. Same numbers as the official criterion on the same inputs and
random state. Differences: the targets arrive at the padded input size and are subsampled here
(the official dataset mapper did it); a subsampling stride is found for any power-of-two output
stride, even canvases included (the official aux-semantic stride formula assumed odd ones); the
Gumbel top-k draws at most as many pixels as the map has (the official ``topk`` fails on maps
smaller than K, e.g. 128x128 crops); non-finite losses are not zeroed (the official
``divide_no_nan`` hid a diverged model); the loss weights are applied here and the keys follow
mmdet (``loss_cls``, ``d0.loss_cls``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from effvision.registry import MODELS

from .matching import check_prediction, check_target, hungarian_match, query_index

# deeplab2's "-inf" for masked softmax logits: finite, so Gumbel noise still orders the masked
# pixels among themselves when there are fewer unmasked pixels than samples.
_MASKED_LOGIT = -99999.0
# deeplab2 weights the dice term by its focal alpha (0.75) and sums it over the mask slots before
# averaging over them; the PyTorch port folded that into this constant.
_DICE_MODIFIER = 0.75
_EPS = 1e-5


def sampling_stride(size: tuple[int, int], target: tuple[int, int]) -> int:
    """The power-of-two stride ``s`` that takes a ``size`` map onto a ``target`` one with ``[::s]``.

    A stride-``s`` network maps a side of ``n`` pixels onto ``ceil(n / s)`` with its output pixel
    ``i`` centred on input pixel ``s * i``, for even sides and for deeplab2's odd ``s * k + 1``
    canvases alike; ``[::s]`` picks exactly those input pixels.

    Args:
        size: (H, W) of the finer map.
        target: (h, w) of the coarser map.

    Raises:
        ValueError: when no power of two works for both sides.
    """
    strides = []
    for n, m in zip(size, target):
        stride = 1
        while -(-n // stride) > m:
            stride *= 2
        strides.append(stride if -(-n // stride) == m else None)
    if strides[0] is None or strides[0] != strides[1]:
        raise ValueError(
            f'cannot subsample targets of size {tuple(size)} to the prediction size '
            f'{tuple(target)}: the prediction must be at one power-of-two stride s of the padded '
            'input, i.e. ceil(H / s) x ceil(W / s); give the targets at the padded input size'
        )
    return strides[0]


def gumbel_topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Draws ``k`` indices per row without replacement, with probabilities ``softmax(logits)``.

    Args:
        logits: (B, L) unnormalised log-probabilities.
        k: Samples per row; capped at L (drawing all L is a permutation).

    Returns:
        (B, min(k, L)) int64 indices.
    """
    # One uniform draw of the logits' shape and dtype, as the official code does, so the same
    # random state gives the same samples; clamping away an exact 0 only avoids log(0).
    uniform = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device)
    uniform = uniform.clamp_min(torch.finfo(logits.dtype).tiny)
    gumbel = -torch.log(-torch.log(uniform))
    return torch.topk(logits + gumbel, min(k, logits.shape[-1]), dim=-1).indices


def mean_over_nonzero(loss: torch.Tensor) -> torch.Tensor:
    """(B, M) per-element losses -> scalar: each image's sum over its non-zero entries' count,
    then the mean over images (deeplab2's reduction; an image with no non-zero entry gives 0)."""
    count = (loss != 0).to(loss.dtype).sum(-1).clamp_min(1.0)
    return (loss.sum(-1) / count).mean()


def pq_class_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    void_index: int,
    alpha: float = 0.75,
) -> torch.Tensor:
    """Cross-entropy of each query's class, alpha-balanced (alpha for a class, 1 - alpha for
    void) and scaled by a per-query weight (the matched mask's dice in the PQ-style loss).

    Args:
        logits: (B, Q, K+1) class logits.
        labels: (B, Q) target class per query, ``void_index`` for unmatched queries.
        weights: (B, Q) per-query weights.
        void_index: The void class.
        alpha: Weight of non-void targets.
    """
    ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction='none')
    balance = torch.where(labels == void_index, 1.0 - alpha, alpha).to(ce.dtype)
    return mean_over_nonzero(ce * balance * weights)


def mask_id_cross_entropy(
    masks: torch.Tensor, targets: torch.Tensor, void: torch.Tensor
) -> torch.Tensor:
    """Per-pixel cross-entropy of the softmax across queries against the matched target mask.

    Args:
        masks: (B, Q, L) mask logits.
        targets: (B, Q, L) target probabilities per pixel (one-hot on the matched query, shared
            among overlapping masks, all zero on void pixels).
        void: (B, L) pixels left out.
    """
    ce = -(targets * F.log_softmax(masks, dim=1)).sum(1)
    return mean_over_nonzero(ce.masked_fill(void, 0.0))


def pq_dice_loss(
    masks: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    void: torch.Tensor | None,
) -> torch.Tensor:
    """One minus the (smoothed) dice of each query's softmax-across-queries mask with its target,
    scaled by a per-query weight (the matched class probability in the PQ-style loss), summed
    over queries x 0.75 / Q, averaged over images.

    Args:
        masks: (B, Q, L) mask logits.
        targets: (B, Q, L) target masks.
        weights: (B, Q) per-query weights (0 for unmatched queries).
        void: (B, L) pixels whose predicted probability is zeroed, or None.
    """
    probs = masks.softmax(1)
    if void is not None:
        probs = probs.masked_fill(void.unsqueeze(1), 0.0)
    dice = (2 * (probs * targets).sum(-1) + 1.0) / (probs.sum(-1) + targets.sum(-1) + 1.0)
    loss = (1.0 - dice) * weights
    return (loss.sum(1) * _DICE_MODIFIER / masks.shape[1]).mean()


def pixel_insdis_loss(
    pixel_feature: torch.Tensor,
    targets: torch.Tensor,
    sample_index: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Instance discrimination among sampled pixels: each pixel's softmax over the similarity of
    its embedding with the others' should put the mass on the pixels of its own mask.

    Args:
        pixel_feature: (B, D, L) L2-normalised pixel embeddings.
        targets: (B, Q, L) target masks (see :func:`mask_id_cross_entropy`).
        sample_index: (B, S) sampled pixels.
        temperature: Divides the cosine similarities.
    """
    gt = targets.gather(2, sample_index.unsqueeze(1).expand(-1, targets.shape[1], -1))
    feat = pixel_feature.gather(2, sample_index.unsqueeze(1).expand(-1, pixel_feature.shape[1], -1))
    log_prob = F.log_softmax((feat.transpose(1, 2) / temperature) @ feat, dim=-1)  # (B, S, S)
    # The target of pixel k is row k of gt^T gt, normalised to sum to 1 (at least 1 when void).
    # Its product with log_prob is taken through the masks, (B, S, Q), never forming the S x S
    # target: -sum_j T[k, j] log_prob[k, j] = -sum_q gt[q, k] (log_prob gt^T)[k, q] / n_k.
    gt_t = gt.transpose(1, 2)  # (B, S, Q)
    norm = (gt_t * gt.sum(-1).unsqueeze(1)).sum(-1).clamp_min(1.0)
    # Void pixels drawn as filler have an all-zero target: their loss is 0 and not counted.
    loss = -(gt_t * (log_prob @ gt_t)).sum(-1) / norm
    return mean_over_nonzero(loss)


def semantic_cross_entropy(
    logits: torch.Tensor,
    semantic: torch.Tensor,
    ignore_index: int,
    sample_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pixel cross-entropy on all pixels or on sampled ones.

    Args:
        logits: (B, C, L) class logits.
        semantic: (B, L) class ids, ``ignore_index`` for unlabelled pixels.
        ignore_index: Label left out.
        sample_index: (B, S) pixels to use, or None for all.
    """
    if sample_index is not None:
        semantic = semantic.gather(1, sample_index)
        logits = logits.gather(2, sample_index.unsqueeze(1).expand(-1, logits.shape[1], -1))
    ce = F.cross_entropy(logits, semantic, ignore_index=ignore_index, reduction='none')
    return mean_over_nonzero(ce)


@dataclass
class _Assignment:
    """Matched targets laid out per query, at the prediction's resolution (h, w)."""

    masks: torch.Tensor  # (B, Q, h*w) matched masks, normalised to sum to <= 1 per pixel
    labels: torch.Tensor  # (B, Q) matched class, void index for unmatched queries
    class_weight: torch.Tensor  # (B, Q) matched dice (void overlap if unmatched), >= eps
    dice_weight: torch.Tensor  # (B, Q) matched class probability (>= eps), 0 if unmatched
    void: torch.Tensor  # (B, h, w) pixels in no matched mask
    inverse_area: torch.Tensor  # (B, h, w) h*w / area of the pixel's mask (h*w on void)


@MODELS.register_module()
class KMaXCriterion(nn.Module):
    """kMaX-DeepLab's losses for the final prediction and every auxiliary one.

    Queries are matched to ground-truth masks once, on the final prediction, by maximising
    ``dice x class probability`` (masks are a softmax across queries; void pixels are zeroed
    before the dice), and the matching, with the per-query weights it gives, serves every output
    (``share_final_matching``). Each output gets the PQ-style class loss (cross-entropy weighted
    by the matched dice; unmatched queries are void, weighted by their overlap with void pixels),
    the PQ-style dice loss (weighted by the matched class probability), the mask-ID
    cross-entropy (per-pixel softmax across queries against the matched mask) and the pixel-wise
    instance discrimination on ``insdis_sample_k`` pixels drawn by Gumbel top-k with
    probabilities proportional to ``(1 / mask area) ** insdis_sample_temperature``. The final
    output adds the auxiliary semantic cross-entropy (on Gumbel-sampled pixels, or on all pixels
    when ``aux_semantic_sample_k`` is 0, as for Cityscapes).

    Targets are compared with the predictions at the predictions' resolution: masks and the
    semantic map given at the padded input size are subsampled with ``[::s, ::s]`` (see
    :func:`sampling_stride`), masks left empty by that are dropped, as the official dataset
    mapper does. Pixels in no mask are void.

    Defaults are the published COCO values (``kmax_deeplab/config.py`` and the COCO yaml);
    Cityscapes uses ``insdis_sample_temperature=0.6, aux_semantic_sample_temperature=1.0,
    aux_semantic_sample_k=0``.

    Args:
        num_classes: K, the number of classes (class logits have K + 1 entries, the last void).
        class_weight: Weight of the PQ-style class loss.
        dice_weight: Weight of the PQ-style dice loss.
        mask_weight: Weight of the mask-ID cross-entropy.
        insdis_weight: Weight of the pixel-wise instance discrimination (0 turns it off).
        aux_semantic_weight: Weight of the auxiliary semantic loss (0 turns it off).
        no_object_weight: Lower bound of the per-query PQ weights.
        focal_alpha: Class-loss weight of non-void targets (void gets 1 - alpha).
        insdis_temperature: Divides the pixel-embedding similarities.
        insdis_sample_temperature: Exponent of the inverse mask area in the pixel sampling.
        insdis_sample_k: Pixels sampled per image for the instance discrimination.
        aux_semantic_sample_temperature: As ``insdis_sample_temperature``, for the semantic loss.
        aux_semantic_sample_k: Pixels sampled per image for the semantic loss; 0 uses all.
        share_final_matching: Match on the final output only and reuse it for the auxiliary
            outputs (official); False matches each output on its own.
        mask_void_pixels: Zero void pixels' predicted probability in the matching and dice.
        ignore_index: Unlabelled pixels of the semantic target.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        class_weight: float = 3.0,
        dice_weight: float = 3.0,
        mask_weight: float = 0.3,
        insdis_weight: float = 1.0,
        aux_semantic_weight: float = 1.0,
        no_object_weight: float = 1e-5,
        focal_alpha: float = 0.75,
        insdis_temperature: float = 0.3,
        insdis_sample_temperature: float = 1.5,
        insdis_sample_k: int = 4096,
        aux_semantic_sample_temperature: float = 2.0,
        aux_semantic_sample_k: int = 4096,
        share_final_matching: bool = True,
        mask_void_pixels: bool = True,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f'num_classes must be >= 1, got {num_classes}')
        weights = dict(
            class_weight=class_weight,
            dice_weight=dice_weight,
            mask_weight=mask_weight,
            insdis_weight=insdis_weight,
            aux_semantic_weight=aux_semantic_weight,
        )
        negative = {k: v for k, v in weights.items() if v < 0}
        if negative:
            raise ValueError(f'loss weights must be >= 0, got {negative}')
        if insdis_sample_k < 1:
            raise ValueError(f'insdis_sample_k must be >= 1, got {insdis_sample_k}')
        if aux_semantic_sample_k < 0:
            raise ValueError(
                f'aux_semantic_sample_k must be >= 0 (0: all pixels), got {aux_semantic_sample_k}'
            )
        self.num_classes = num_classes
        self.class_weight = class_weight
        self.dice_weight = dice_weight
        self.mask_weight = mask_weight
        self.insdis_weight = insdis_weight
        self.aux_semantic_weight = aux_semantic_weight
        self.no_object_weight = no_object_weight
        self.focal_alpha = focal_alpha
        self.insdis_temperature = insdis_temperature
        self.insdis_sample_temperature = insdis_sample_temperature
        self.insdis_sample_k = insdis_sample_k
        self.aux_semantic_sample_temperature = aux_semantic_sample_temperature
        self.aux_semantic_sample_k = aux_semantic_sample_k
        self.share_final_matching = share_final_matching
        self.mask_void_pixels = mask_void_pixels
        self.ignore_index = ignore_index

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Computes the weighted losses.

        Args:
            outputs: ``pred_logits`` (B, Q, K+1), ``pred_masks`` (B, Q, h, w), ``pixel_feature``
                (B, D, h, w) (when ``insdis_weight`` > 0), ``aux_semantic`` (B, K or K+1, h', w')
                (when ``aux_semantic_weight`` > 0), ``aux_outputs``: list of dicts with the same
                first three keys, masks and features at (h, w).
            targets: One dict per image: ``labels`` (N,) int in [0, K), ``masks`` (N, H, W) bool
                at the padded input size, ``semantic`` (H, W) int (needed by the aux semantic
                loss), ``ignore_index`` on unlabelled pixels.

        Returns:
            ``loss_cls``, ``loss_dice``, ``loss_mask``, ``loss_insdis``, ``loss_aux_semantic``
            for the final output and ``d{i}.loss_cls`` ... for ``aux_outputs[i]``, each already
            weighted; terms with weight 0 are left out.
        """
        logits, masks = self._checked(outputs, 'outputs')
        # The losses are defined in float32 (the official code casts and leaves autocast).
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self._forward(outputs, targets, logits, masks)

    def _forward(
        self, outputs: dict, targets: list[dict], logits: torch.Tensor, masks: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        batch, _, h, w = masks.shape
        if len(targets) != batch:
            raise ValueError(f'got {len(targets)} target dicts for a batch of {batch}')
        gt_labels, gt_masks, semantic = self._prepare_targets(targets, (h, w), masks.device)

        assignment = self._assign(logits, masks, gt_labels, gt_masks)
        losses = self._output_losses(outputs, logits, masks, assignment, '')
        if self.aux_semantic_weight > 0:
            losses['loss_aux_semantic'] = self.aux_semantic_weight * self._aux_semantic_loss(
                outputs, semantic, assignment
            )
        for i, aux in enumerate(outputs.get('aux_outputs', [])):
            aux_logits, aux_masks = self._checked(aux, f'aux_outputs[{i}]')
            if aux_masks.shape != masks.shape or aux_logits.shape != logits.shape:
                raise ValueError(
                    f'aux_outputs[{i}] has logits {tuple(aux_logits.shape)} and masks '
                    f'{tuple(aux_masks.shape)}; the final output has {tuple(logits.shape)} and '
                    f'{tuple(masks.shape)} (aux masks must be upsampled to the final size)'
                )
            if not self.share_final_matching:
                assignment = self._assign(aux_logits, aux_masks, gt_labels, gt_masks)
            losses.update(self._output_losses(aux, aux_logits, aux_masks, assignment, f'd{i}.'))
        return losses

    def _checked(self, output: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        logits, masks = check_prediction(output, name, self.num_classes)
        return _float(logits), _float(masks)

    def _prepare_targets(
        self, targets: list[dict], size: tuple[int, int], device: torch.device
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        """Labels, (N, h*w) float masks and the (B, h, w) semantic map at the prediction size."""
        labels, masks, semantics = [], [], []
        for i, target in enumerate(targets):
            gt_masks, gt_labels = check_target(target, i, self.num_classes)
            stride = sampling_stride(gt_masks.shape[-2:], size)
            gt_masks = gt_masks[:, ::stride, ::stride].to(device).flatten(1)
            # A mask that the subsampling empties is dropped, as in the official mapper (which
            # built masks from the subsampled panoptic map): it could only add a spurious match.
            keep = gt_masks.any(1)
            masks.append(gt_masks[keep].float())
            labels.append(gt_labels.to(device)[keep].long())
            if 'semantic' in target:
                semantic = target['semantic']
                if semantic.shape != target['masks'].shape[-2:]:
                    raise ValueError(
                        f'targets[{i}]["semantic"] is {tuple(semantic.shape)}, its masks are '
                        f'{tuple(target["masks"].shape[-2:])}; give both at the padded input size'
                    )
                semantics.append(semantic[::stride, ::stride].to(device).long())
        semantic = torch.stack(semantics) if len(semantics) == len(targets) else None
        return labels, masks, semantic

    @torch.no_grad()
    def _assign(
        self,
        logits: torch.Tensor,
        masks: torch.Tensor,
        gt_labels: list[torch.Tensor],
        gt_masks: list[torch.Tensor],
    ) -> _Assignment:
        batch, num_queries, h, w = masks.shape
        flat = masks.detach().flatten(2)
        probs = flat.softmax(1)
        class_probs = logits.detach().softmax(-1)[..., :-1]

        indices, matched_dice, matched_prob = [], [], []
        for b in range(batch):
            target = gt_masks[b].to(flat.dtype)
            image_probs = probs[b]
            if self.mask_void_pixels:
                image_probs = image_probs * (target.sum(0, keepdim=True) > 0).to(flat.dtype)
            intersection = image_probs @ target.T
            half_sum = (image_probs.sum(-1)[:, None] + target.sum(-1)[None, :]) / 2.0
            dice = intersection / (half_sum + _EPS)
            prob = class_probs[b][:, gt_labels[b]]
            rows, cols = hungarian_match(-dice * prob)
            indices.append((rows, cols))
            matched_dice.append(dice[rows, cols])
            matched_prob.append(prob[rows, cols])

        src = query_index(indices)
        target_masks = flat.new_zeros(batch, num_queries, h * w)
        target_masks[src] = torch.cat([m[cols] for m, (_, cols) in zip(gt_masks, indices)]).to(
            flat.dtype
        )
        # Overlapping (instance) masks share a pixel; the per-pixel target must sum to 1.
        target_masks = target_masks / target_masks.sum(1, keepdim=True).clamp_min(1.0)

        labels = torch.full((batch, num_queries), self.num_classes, device=flat.device)
        labels[src] = torch.cat([lab[cols] for lab, (_, cols) in zip(gt_labels, indices)])

        void = target_masks.sum(1) < 1  # (B, h*w)
        area = torch.einsum('bql,bq->bl', target_masks, target_masks.sum(-1))
        inverse_area = (h * w) / area.clamp_min(1.0)

        # Unmatched queries are void; their class loss is weighted by how much of their mask
        # falls on void pixels (an IoU-like ratio, as deeplab2 does).
        class_weight = (probs * void.unsqueeze(1).to(flat.dtype)).sum(-1) / (probs.sum(-1) + _EPS)
        class_weight[src] = torch.cat(matched_dice).to(flat.dtype)
        class_weight = class_weight.clamp_min(self.no_object_weight)
        dice_weight = flat.new_zeros(batch, num_queries)
        dice_weight[src] = torch.cat(matched_prob).to(flat.dtype).clamp_min(self.no_object_weight)
        return _Assignment(
            masks=target_masks,
            labels=labels,
            class_weight=class_weight,
            dice_weight=dice_weight,
            void=void.view(batch, h, w),
            inverse_area=inverse_area.view(batch, h, w),
        )

    def _output_losses(
        self,
        output: dict,
        logits: torch.Tensor,
        masks: torch.Tensor,
        assignment: _Assignment,
        prefix: str,
    ) -> dict[str, torch.Tensor]:
        flat = masks.flatten(2)
        void = assignment.void.flatten(1)
        losses = {}
        if self.class_weight > 0:
            losses[prefix + 'loss_cls'] = self.class_weight * pq_class_loss(
                logits, assignment.labels, assignment.class_weight, self.num_classes,
                self.focal_alpha,
            )  # fmt: skip
        if self.mask_weight > 0:
            losses[prefix + 'loss_mask'] = self.mask_weight * mask_id_cross_entropy(
                flat, assignment.masks, void
            )
        if self.dice_weight > 0:
            losses[prefix + 'loss_dice'] = self.dice_weight * pq_dice_loss(
                flat, assignment.masks, assignment.dice_weight,
                void if self.mask_void_pixels else None,
            )  # fmt: skip
        if self.insdis_weight > 0:
            if 'pixel_feature' not in output:
                raise KeyError(
                    f'{prefix or "the final output "}has no "pixel_feature" for the instance '
                    'discrimination loss; output it from the decoder or set insdis_weight=0'
                )
            feature = _float(output['pixel_feature'])
            if feature.dim() != 4 or feature.shape[-2:] != masks.shape[-2:]:
                raise ValueError(
                    f'pixel_feature must be (B, D, h, w) at the mask size {tuple(masks.shape[-2:])}'
                    f', got {tuple(feature.shape)}'
                )
            index = self._sample_pixels(
                assignment.inverse_area, assignment.void, self.insdis_sample_temperature,
                self.insdis_sample_k,
            )  # fmt: skip
            losses[prefix + 'loss_insdis'] = self.insdis_weight * pixel_insdis_loss(
                feature.flatten(2), assignment.masks, index, self.insdis_temperature
            )
        return losses

    def _aux_semantic_loss(
        self, outputs: dict, semantic: torch.Tensor | None, assignment: _Assignment
    ) -> torch.Tensor:
        if 'aux_semantic' not in outputs:
            raise KeyError(
                'outputs has no "aux_semantic" logits; enable the decoder\'s auxiliary semantic '
                'head (it runs in training mode only) or set aux_semantic_weight=0'
            )
        if semantic is None:
            raise KeyError(
                'the auxiliary semantic loss needs targets[i]["semantic"] (H, W) class ids for '
                'every image; add it or set aux_semantic_weight=0'
            )
        logits = _float(outputs['aux_semantic'])
        if logits.dim() != 4 or logits.shape[1] not in (self.num_classes, self.num_classes + 1):
            raise ValueError(
                f'outputs["aux_semantic"] must be (B, {self.num_classes} or '
                f'{self.num_classes + 1}, h, w), got {tuple(logits.shape)}'
            )
        void, inverse_area = assignment.void, assignment.inverse_area
        if logits.shape[-2:] != semantic.shape[-2:]:
            # Subsampled from the mask-resolution targets, as the official code does.
            stride = sampling_stride(semantic.shape[-2:], logits.shape[-2:])
            semantic = semantic[:, ::stride, ::stride]
            void = void[:, ::stride, ::stride]
            inverse_area = inverse_area[:, ::stride, ::stride]
        index = None
        if self.aux_semantic_sample_k > 0:
            index = self._sample_pixels(
                inverse_area, void, self.aux_semantic_sample_temperature,
                self.aux_semantic_sample_k,
            )  # fmt: skip
        return semantic_cross_entropy(
            logits.flatten(2), semantic.flatten(1), self.ignore_index, index
        )

    @staticmethod
    def _sample_pixels(
        inverse_area: torch.Tensor, void: torch.Tensor, temperature: float, k: int
    ) -> torch.Tensor:
        """Gumbel top-k over pixels favouring small masks, void last: (B, min(k, L)) indices."""
        logits = torch.log(inverse_area.flatten(1)) * temperature
        logits = logits + void.flatten(1).to(logits.dtype) * _MASKED_LOGIT
        return gumbel_topk(logits, k)


def _float(x: torch.Tensor) -> torch.Tensor:
    """Half-precision outputs (AMP) are promoted; float32/float64 are kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
