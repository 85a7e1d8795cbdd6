"""What every mask-classification head shares: targets, inference, panoptic merging.

A mask-classification head (kMaX-DeepLab, PEM) predicts, for each of ``Q`` queries, class logits
over ``K`` classes plus a void / no-object logit, and a mask logit map. This module turns that into
what mmseg and mmdet expect, once for every such head:

* :class:`MaskClassificationHead` is the base of the registered heads. It is a decode head for
  mmseg's ``EncoderDecoder`` (``loss`` reads ``gt_sem_seg``; ``predict`` returns per-class scores
  ``einsum(class probabilities, mask probabilities)``, so mmseg's metrics, TTA and resizing work
  unchanged) and the ``panoptic_head`` of
  :class:`~effvision.models.segmentors.PanopticMaskClassifier` (``loss`` reads mmdet's panoptic
  ``gt_instances`` + ``gt_sem_seg``).
* Target building: semantic samples give one mask per class present; panoptic samples one mask per
  thing instance and one per stuff class (as mmdet's ``preprocess_panoptic_gt``). Pixels in no
  target mask (ignore / VOID / crowd) are void.
* Inference helpers: :func:`semantic_inference`, :func:`maskformer_panoptic_inference`
  (Mask2Former's rule, used by PEM) and :func:`kmax_panoptic_inference` (kMaX-DeepLab's rule).
  Panoptic maps use mmdet's encoding: ``label`` for stuff, ``label + instance_id *
  INSTANCE_OFFSET`` for things (ids from 1), ``num_classes`` for VOID; labels put the things first
  (``label < num_things``) as mmdet does.

Masks are either independent sigmoids (Mask2Former, PEM: ``mask_activation='sigmoid'``) or a softmax
across the queries (kMaX-DeepLab's "mask-ID": ``'softmax'``); every helper takes that switch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor

from effvision.registry import MODELS

# mmdet's panoptic id encoding (mmdet.evaluation.functional.INSTANCE_OFFSET); kept as a constant so
# this module imports without mmdet.
INSTANCE_OFFSET = 1000
MASK_ACTIVATIONS = ('sigmoid', 'softmax')


def mask_probabilities(mask_logits: Tensor, activation: str) -> Tensor:
    """Mask probabilities from mask logits.

    Args:
        mask_logits: ``(..., Q, H, W)`` mask logits, queries on dim -3.
        activation: ``'sigmoid'`` (independent masks) or ``'softmax'`` (a distribution over the
            queries at every pixel, kMaX-DeepLab).

    Returns:
        Probabilities of the same shape.
    """
    if activation == 'sigmoid':
        return mask_logits.sigmoid()
    if activation == 'softmax':
        return mask_logits.softmax(dim=-3)
    raise ValueError(f'mask activation must be one of {MASK_ACTIVATIONS}, got {activation!r}')


def semantic_inference(cls_logits: Tensor, mask_logits: Tensor, activation: str) -> Tensor:
    """Per-class scores: the class probabilities (void dropped) weighted by the mask probabilities.

    Args:
        cls_logits: ``(B, Q, K+1)`` class logits, the last one void / no-object.
        mask_logits: ``(B, Q, H, W)`` mask logits.
        activation: See :func:`mask_probabilities`.

    Returns:
        ``(B, K, H, W)`` scores (not normalised; argmax gives the class).
    """
    cls_prob = cls_logits.softmax(dim=-1)[..., :-1]
    masks = mask_probabilities(mask_logits, activation)
    return torch.einsum('bqc,bqhw->bchw', cls_prob, masks)


def maskformer_panoptic_inference(
    cls_logits: Tensor,
    mask_logits: Tensor,
    *,
    num_things: int,
    object_mask_thr: float = 0.8,
    overlap_thr: float = 0.8,
    activation: str = 'sigmoid',
) -> Tensor:
    """Mask2Former's panoptic merging (used by PEM), for one image.

    Queries whose best class is not no-object and scores above ``object_mask_thr`` compete for
    every pixel by ``score * mask probability``; a query keeps the pixels it wins that its own mask
    also covers (probability >= 0.5), unless it won less than ``overlap_thr`` of its mask. Stuff
    queries of the same class merge into one segment.

    Args:
        cls_logits: ``(Q, K+1)`` class logits.
        mask_logits: ``(Q, H, W)`` mask logits at the output resolution.
        num_things: Labels below this are things.
        object_mask_thr: Minimum class probability of a kept query.
        overlap_thr: Minimum fraction of a query's own mask that it must win.
        activation: See :func:`mask_probabilities`.

    Returns:
        ``(H, W)`` int64 panoptic map in mmdet's encoding (VOID = ``K``).
    """
    num_classes = cls_logits.shape[-1] - 1
    scores, labels = cls_logits.softmax(dim=-1).max(dim=-1)
    masks = mask_probabilities(mask_logits, activation)
    keep = labels.ne(num_classes) & (scores > object_mask_thr)
    scores, labels, masks = scores[keep], labels[keep], masks[keep]
    height, width = mask_logits.shape[-2:]
    panoptic = torch.full((height, width), num_classes, dtype=torch.long, device=cls_logits.device)
    if masks.shape[0] == 0:
        return panoptic
    winner = (scores[:, None, None] * masks).argmax(dim=0)
    instance_id = 1
    for k in range(labels.shape[0]):
        label = int(labels[k])
        won = winner == k
        own = masks[k] >= 0.5
        mask = won & own
        won_area, own_area = int(won.sum()), int(own.sum())
        if won_area == 0 or own_area == 0 or not bool(mask.any()):
            continue
        if won_area / own_area < overlap_thr:
            continue
        if label < num_things:
            panoptic[mask] = label + instance_id * INSTANCE_OFFSET
            instance_id += 1
        else:
            panoptic[mask] = label
    return panoptic


def kmax_panoptic_inference(
    cls_logits: Tensor,
    mask_logits: Tensor,
    *,
    num_things: int,
    thing_thr: float = 0.7,
    stuff_thr: float = 0.5,
    overlap_thr: float = 0.8,
    pixel_confidence_thr: float = 0.4,
    reorder_class_weight: float = 1.0,
    reorder_mask_weight: float = 1.0,
) -> Tensor:
    """kMaX-DeepLab's panoptic merging (deeplab2's MaX-DeepLab post-processor), for one image.

    Masks are a softmax over the queries; a query's binary mask is where its probability exceeds
    ``pixel_confidence_thr`` and its mask score is the mean probability inside. Queries are pasted
    in decreasing ``class score ** w_c * mask score ** w_m`` when their class score passes the
    thing or stuff threshold and the still-free part of their mask is more than ``overlap_thr`` of
    it.
    The class score excludes the void logit (softmax over ``K+1``, void dropped, then max).

    Args:
        cls_logits: ``(Q, K+1)`` class logits.
        mask_logits: ``(Q, H, W)`` mask logits at the output resolution.
        num_things: Labels below this are things.
        thing_thr: Class-score threshold of things (COCO 0.7, Cityscapes 0.5, ADE20K 0.4).
        stuff_thr: Class-score threshold of stuff (COCO 0.5, Cityscapes 0.3, ADE20K 0.4).
        overlap_thr: Minimum free fraction of a pasted mask (COCO/ADE20K 0.8, Cityscapes 0.9).
        pixel_confidence_thr: Mask probability of a pixel in the binary mask.
        reorder_class_weight: Exponent of the class score in the ranking.
        reorder_mask_weight: Exponent of the mask score in the ranking (Cityscapes 0).

    Returns:
        ``(H, W)`` int64 panoptic map in mmdet's encoding (VOID = ``K``).
    """
    num_classes = cls_logits.shape[-1] - 1
    cls_scores, labels = cls_logits.softmax(dim=-1)[:, :-1].max(dim=-1)
    probs = mask_logits.softmax(dim=0)
    binary = probs > pixel_confidence_thr
    area = binary.flatten(1).sum(dim=1)
    mask_scores = (probs * binary).flatten(1).sum(dim=1) / area.clamp(min=1)
    ranking = cls_scores**reorder_class_weight * mask_scores**reorder_mask_weight
    order = torch.argsort(ranking, descending=True)

    height, width = mask_logits.shape[-2:]
    panoptic = torch.full((height, width), num_classes, dtype=torch.long, device=cls_logits.device)
    free = torch.ones((height, width), dtype=torch.bool, device=cls_logits.device)
    instance_id = 1
    for k in order.tolist():
        label = int(labels[k])
        is_thing = label < num_things
        if float(cls_scores[k]) <= (thing_thr if is_thing else stuff_thr):
            continue
        new = binary[k] & free
        # Official: new > original * overlap (strict), also for an empty mask (0 > 0 is false).
        if not float(new.sum()) > float(area[k]) * overlap_thr:
            continue
        if is_thing:
            panoptic[new] = label + instance_id * INSTANCE_OFFSET
            instance_id += 1
        else:  # stuff of one class is one segment, as the official merges them
            panoptic[new] = label
        free &= ~new
    return panoptic


# When the bilinear upsampling of mask logits to the input size aligns corners: 'never' (PEM,
# Mask2Former), or 'odd_width' (kMaX-DeepLab: iff the padded canvas width is odd, as official).
ALIGN_CORNERS_RULES = ('never', 'odd_width')


def mask_upsample_align_corners(rule: str, size: tuple[int, int]) -> bool:
    """``align_corners`` of the mask upsampling to ``size`` (H, W) under ``rule``."""
    if rule not in ALIGN_CORNERS_RULES:
        raise ValueError(f'align_corners rule must be one of {ALIGN_CORNERS_RULES}, got {rule!r}')
    return rule == 'odd_width' and size[1] % 2 == 1


def _resize(x: Tensor, size: tuple[int, int], align_corners: bool) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode='bilinear', align_corners=align_corners)


class MaskClassificationHead(BaseModule):
    """Base of the mask-classification heads: targets, losses, mmseg and mmdet inference.

    A subclass builds its network and criterion in ``__init__`` and implements ``forward(inputs)``
    returning the decoder output dict (``pred_logits (B, Q, K+1)``, ``pred_masks (B, Q, h, w)``,
    ``aux_outputs``, ...). It sets ``mask_activation`` (``'sigmoid'`` / ``'softmax'``) and
    ``mask_align_corners`` (one of :data:`ALIGN_CORNERS_RULES`).

    Args:
        num_classes: ``K``, classes without void. For panoptic use, things first.
        num_things_classes: Thing classes (panoptic); ``None`` for semantic-only use.
        num_stuff_classes: Stuff classes (panoptic); ``None`` for semantic-only use.
        ignore_index: Label of unlabelled pixels in ``gt_sem_seg``.
        align_corners: mmseg's decode-head attribute (used by ``EncoderDecoder`` when it resizes).
        in_index: Which backbone outputs feed the head (mmseg's convention), default all.
        train_cfg: Passed in by mmdet's detector; unused.
        test_cfg: Passed in by mmdet's detector; unused (the fusion head holds the thresholds).
        init_cfg: mmengine init config.
    """

    mask_activation = 'sigmoid'
    mask_align_corners = 'never'

    def __init__(
        self,
        *,
        num_classes: int,
        num_things_classes: int | None = None,
        num_stuff_classes: int | None = None,
        ignore_index: int = 255,
        align_corners: bool = False,
        in_index: list[int] | tuple[int, ...] | None = None,
        train_cfg: dict | None = None,
        test_cfg: dict | None = None,
        init_cfg: dict | list | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if (num_things_classes is None) != (num_stuff_classes is None):
            raise ValueError('set both num_things_classes and num_stuff_classes, or neither')
        if num_things_classes is not None and num_things_classes + num_stuff_classes != num_classes:
            raise ValueError(
                f'num_things_classes + num_stuff_classes must equal num_classes, got '
                f'{num_things_classes} + {num_stuff_classes} != {num_classes}'
            )
        self.num_classes = num_classes
        # mmseg's EncoderDecoder reads these.
        self.out_channels = num_classes
        self.align_corners = align_corners
        self.ignore_index = ignore_index
        self.threshold = None
        # mmdet's MaskFormer detector reads these.
        self.num_things_classes = num_things_classes
        self.num_stuff_classes = num_stuff_classes
        self.in_index = None if in_index is None else list(in_index)
        self.train_cfg = train_cfg
        self.test_cfg = test_cfg

    def build_criterion(self, loss: dict) -> None:
        """Builds ``self.criterion`` from ``loss``, filling in (or checking) ``num_classes``."""
        loss = dict(loss)
        loss.setdefault('num_classes', self.num_classes)
        if loss['num_classes'] != self.num_classes:
            raise ValueError(
                f'loss.num_classes ({loss["num_classes"]}) differs from the head '
                f'({self.num_classes})'
            )
        self.criterion = MODELS.build(loss)

    # ----------------------------------------------------------------------------------- inputs
    def select_inputs(self, inputs: list[Tensor] | tuple[Tensor, ...]) -> list[Tensor]:
        """The backbone outputs this head uses, in order."""
        inputs = list(inputs)
        return inputs if self.in_index is None else [inputs[i] for i in self.in_index]

    def upsample_align_corners(self, size: tuple[int, int]) -> bool:
        """``align_corners`` of the bilinear mask upsampling to ``size`` (kMaX: odd width)."""
        return mask_upsample_align_corners(self.mask_align_corners, size)

    # ---------------------------------------------------------------------------------- targets
    def get_targets(self, batch_data_samples: list, pad_shape: tuple[int, int]) -> list[dict]:
        """Mask-classification targets, one dict per image.

        Args:
            batch_data_samples: mmseg ``SegDataSample`` (semantic: ``gt_sem_seg``) or mmdet
                ``DetDataSample`` (panoptic: ``gt_instances`` with thing masks and labels, plus
                ``gt_sem_seg`` with thing and stuff labels, 255 VOID).
            pad_shape: ``(H, W)`` of the network input; targets are padded to it as void.

        Returns:
            Dicts with ``labels`` ``(N,)`` int64, ``masks`` ``(N, H, W)`` bool and ``semantic``
            ``(H, W)`` int64 (``ignore_index`` where void).
        """
        return [self._targets_single(sample, pad_shape) for sample in batch_data_samples]

    def _targets_single(self, sample, pad_shape: tuple[int, int]) -> dict:
        if 'gt_sem_seg' not in sample:
            raise KeyError(
                'mask-classification targets need gt_sem_seg in every data sample; use '
                'LoadAnnotations (mmseg) or a panoptic loader with with_seg=True (mmdet)'
            )
        semantic = _pixel_data(sample.gt_sem_seg).squeeze(0).long()
        semantic = _pad_to(semantic, pad_shape, self.ignore_index)
        if 'gt_instances' in sample:
            return self._panoptic_targets(sample.gt_instances, semantic, pad_shape)
        labels = torch.unique(semantic)
        labels = labels[(labels != self.ignore_index) & (labels < self.num_classes)]
        masks = semantic[None] == labels[:, None, None]
        return dict(labels=labels, masks=masks, semantic=semantic)

    def _panoptic_targets(self, instances, semantic: Tensor, pad_shape: tuple[int, int]) -> dict:
        if self.num_things_classes is None:
            raise ValueError(
                'panoptic training needs num_things_classes and num_stuff_classes in the head '
                'config (things first in the class list)'
            )
        device = semantic.device
        masks = instances.masks
        if hasattr(masks, 'to_tensor'):  # mmdet BitmapMasks
            masks = masks.to_tensor(dtype=torch.bool, device=device)
        masks = _pad_to(masks.bool(), pad_shape, False)
        labels = instances.labels.long().to(device)
        stuff = torch.unique(semantic)
        stuff = stuff[(stuff >= self.num_things_classes) & (stuff < self.num_classes)]
        stuff_masks = semantic[None] == stuff[:, None, None]
        return dict(
            labels=torch.cat([labels, stuff]),
            masks=torch.cat([masks, stuff_masks]),
            semantic=semantic,
        )

    # ----------------------------------------------------------------------------------- losses
    def loss(self, inputs: list[Tensor], batch_data_samples: list, train_cfg=None) -> dict:
        """Losses of a batch (mmseg's and mmdet's head entry point).

        Args:
            inputs: Backbone features, NCHW, finest first.
            batch_data_samples: See :meth:`get_targets`.
            train_cfg: Unused (mmseg passes its train_cfg).

        Returns:
            Named scalar losses.
        """
        outputs = self(inputs)
        targets = self.get_targets(batch_data_samples, _input_shape(batch_data_samples[0].metainfo))
        return self.criterion(outputs, targets)

    # -------------------------------------------------------------------------------- inference
    def predict_mask_classification(
        self, inputs: list[Tensor], batch_img_metas: list[dict]
    ) -> tuple[Tensor, Tensor]:
        """Class logits and mask logits upsampled to the padded input size.

        Returns:
            ``(B, Q, K+1)`` class logits and ``(B, Q, H, W)`` mask logits.
        """
        outputs = self(inputs)
        size = _input_shape(batch_img_metas[0])
        masks = _resize(outputs['pred_masks'], size, self.upsample_align_corners(size))
        return outputs['pred_logits'], masks

    def predict(self, inputs: list[Tensor], batch_img_metas: list[dict], test_cfg=None) -> Tensor:
        """Per-class segmentation scores for mmseg's ``EncoderDecoder``.

        Returns:
            ``(B, K, H, W)`` scores at the padded input size (mmseg crops and resizes them).
        """
        cls_logits, mask_logits = self.predict_mask_classification(inputs, batch_img_metas)
        return semantic_inference(cls_logits, mask_logits, self.mask_activation)


def _input_shape(meta: dict) -> tuple[int, int]:
    """``(H, W)`` of the network input from a sample's metainfo.

    mmdet sets ``batch_input_shape``; mmseg pads to ``pad_shape`` (``img_shape`` when nothing was
    padded), as mmseg's own Mask2FormerHead reads it.
    """
    size = meta.get('batch_input_shape') or meta.get('pad_shape') or meta['img_shape']
    return tuple(int(v) for v in size[:2])


def _pixel_data(pixel_data) -> Tensor:
    """A label map's tensor: mmseg stores it as ``data``, mmdet's PackDetInputs as ``sem_seg``."""
    return pixel_data.data if 'data' in pixel_data else pixel_data.sem_seg


def _pad_to(x: Tensor, size: tuple[int, int], value) -> Tensor:
    """Pads the last two dims of ``x`` at the bottom/right to ``size`` (inputs are padded so)."""
    height, width = x.shape[-2:]
    if (height, width) == tuple(size):
        return x
    if height > size[0] or width > size[1]:
        raise ValueError(f'label map {height}x{width} is larger than the input {size[0]}x{size[1]}')
    return F.pad(x, (0, size[1] - width, 0, size[0] - height), value=value)
