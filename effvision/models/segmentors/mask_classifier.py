"""Panoptic segmentation with a mask-classification head, as an mmdet detector.

:class:`PanopticMaskClassifier` is mmdet's ``MaskFormer`` detector (backbone, optional neck,
``panoptic_head``, ``panoptic_fusion_head``; training through the head's ``loss``) with two changes
that mmdet 3.3.0 cannot express: the head hands over class and mask *logits* (the merging rule,
sigmoid or softmax-over-queries masks, belongs to the fusion head), and semantic results are
attached to the data samples (``pred_sem_seg``) instead of being refused, so one model is evaluated
with PQ and mIoU in the same test run.

:class:`MaskClassificationFusionHead` merges the logits into mmdet's panoptic encoding with either
Mask2Former's rule (PEM) or kMaX-DeepLab's (see
:mod:`effvision.models.decode_heads.mask_classification`).
"""

from __future__ import annotations

import torch
from mmdet.models.detectors import MaskFormer
from mmengine.model import BaseModule
from mmengine.structures import PixelData
from torch import Tensor

from effvision.models.decode_heads.mask_classification import (
    kmax_panoptic_inference,
    mask_probabilities,
    maskformer_panoptic_inference,
)
from effvision.registry import MODELS

FUSION_RULES = ('maskformer', 'kmax')


@MODELS.register_module()
class MaskClassificationFusionHead(BaseModule):
    """Turns mask-classification logits into panoptic and semantic maps, per image.

    Args:
        num_things_classes: Thing classes (labels ``0..num_things-1``).
        num_stuff_classes: Stuff classes (the labels after the things).
        rule: ``'maskformer'`` (sigmoid masks, Mask2Former's merging; PEM) or ``'kmax'``
            (softmax-over-queries masks, kMaX-DeepLab's merging).
        test_cfg: Thresholds, passed in by the detector from its ``test_cfg``: ``panoptic_on``,
            ``semantic_on`` (default both True); for ``'maskformer'`` ``object_mask_thr`` (0.8) and
            ``iou_thr`` (0.8); for ``'kmax'`` ``thing_thr`` (0.7), ``stuff_thr`` (0.5),
            ``overlap_thr`` (0.8), ``pixel_confidence_thr`` (0.4), ``reorder_class_weight`` (1),
            ``reorder_mask_weight`` (1).
        init_cfg: Unused (no parameters).
    """

    def __init__(
        self,
        num_things_classes: int,
        num_stuff_classes: int,
        rule: str = 'maskformer',
        test_cfg: dict | None = None,
        loss_panoptic=None,
        init_cfg: dict | None = None,
        **kwargs,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if rule not in FUSION_RULES:
            raise ValueError(f'rule must be one of {FUSION_RULES}, got {rule!r}')
        if loss_panoptic is not None:
            raise ValueError('MaskClassificationFusionHead has no loss; remove loss_panoptic')
        self.num_things_classes = num_things_classes
        self.num_stuff_classes = num_stuff_classes
        self.num_classes = num_things_classes + num_stuff_classes
        self.rule = rule
        self.test_cfg = dict(test_cfg or {})
        known = {
            'maskformer': {'object_mask_thr', 'iou_thr'},
            'kmax': {
                'thing_thr', 'stuff_thr', 'overlap_thr', 'pixel_confidence_thr',
                'reorder_class_weight', 'reorder_mask_weight',
            },
        }[rule] | {'panoptic_on', 'semantic_on', 'instance_on'}  # fmt: skip
        unknown = set(self.test_cfg) - known
        if unknown:
            raise ValueError(
                f'unknown test_cfg keys for the {rule!r} fusion rule: {sorted(unknown)}; '
                f'known: {sorted(known)}'
            )
        if self.test_cfg.get('instance_on', False):
            raise ValueError('instance results are not implemented; set test_cfg.instance_on=False')

    @property
    def mask_activation(self) -> str:
        return 'softmax' if self.rule == 'kmax' else 'sigmoid'

    def loss(self, **kwargs) -> dict:
        """No loss: the fusion head only merges at inference."""
        return {}

    def panoptic(self, cls_logits: Tensor, mask_logits: Tensor) -> Tensor:
        """``(H, W)`` panoptic map (mmdet encoding) of one image from ``(Q, K+1)``/``(Q, H, W)``."""
        cfg = self.test_cfg
        if self.rule == 'kmax':
            return kmax_panoptic_inference(
                cls_logits,
                mask_logits,
                num_things=self.num_things_classes,
                thing_thr=cfg.get('thing_thr', 0.7),
                stuff_thr=cfg.get('stuff_thr', 0.5),
                overlap_thr=cfg.get('overlap_thr', 0.8),
                pixel_confidence_thr=cfg.get('pixel_confidence_thr', 0.4),
                reorder_class_weight=cfg.get('reorder_class_weight', 1.0),
                reorder_mask_weight=cfg.get('reorder_mask_weight', 1.0),
            )
        return maskformer_panoptic_inference(
            cls_logits,
            mask_logits,
            num_things=self.num_things_classes,
            object_mask_thr=cfg.get('object_mask_thr', 0.8),
            overlap_thr=cfg.get('iou_thr', 0.8),
        )

    def predict(
        self,
        mask_cls_results: Tensor,
        mask_pred_results: Tensor,
        batch_data_samples: list,
        rescale: bool = False,
        **kwargs,
    ) -> list[dict]:
        """Panoptic (``pan_results``) and semantic (``sem_results``) maps of a batch.

        Args:
            mask_cls_results: ``(B, Q, K+1)`` class logits.
            mask_pred_results: ``(B, Q, H, W)`` mask logits at the padded input size.
            batch_data_samples: mmdet data samples (``img_shape``, ``ori_shape``,
                ``batch_input_shape`` in their metainfo).
            rescale: Resize to ``ori_shape`` (else the maps are at ``img_shape``).

        Returns:
            One dict per image with ``PixelData`` values (``sem_seg`` field, ``(1, H, W)`` int64).
        """
        results = []
        for cls_logits, mask_logits, sample in zip(
            mask_cls_results, mask_pred_results, batch_data_samples
        ):
            meta = sample.metainfo
            height, width = meta['img_shape'][:2]
            mask_logits = mask_logits[:, :height, :width]
            if rescale:
                out_h, out_w = meta['ori_shape'][:2]
                # kMaX resizes with align_corners when the padded canvas width is odd.
                canvas_w = meta.get('batch_input_shape', mask_pred_results.shape[-2:])[1]
                align = self.rule == 'kmax' and canvas_w % 2 == 1
                mask_logits = torch.nn.functional.interpolate(
                    mask_logits[None], size=(out_h, out_w), mode='bilinear', align_corners=align
                )[0]
            result = {}
            if self.test_cfg.get('panoptic_on', True):
                panoptic = self.panoptic(cls_logits, mask_logits)
                result['pan_results'] = PixelData(sem_seg=panoptic[None])
            if self.test_cfg.get('semantic_on', True):
                cls_prob = cls_logits.softmax(dim=-1)[:, :-1]
                masks = mask_probabilities(mask_logits, self.mask_activation)
                scores = torch.einsum('qc,qhw->chw', cls_prob, masks)
                result['sem_results'] = PixelData(sem_seg=scores.argmax(dim=0)[None])
            results.append(result)
        return results


def attach_predictions(
    fusion_head: MaskClassificationFusionHead,
    cls_logits: Tensor,
    mask_logits: Tensor,
    batch_data_samples: list,
    rescale: bool = True,
) -> list:
    """Merges a batch's logits and sets ``pred_panoptic_seg``/``pred_sem_seg`` on its samples.

    Shared by the PyTorch model and the exported one (:mod:`effvision.deploy`), so both
    post-process identically.

    Args:
        fusion_head: The model's fusion head (rule and thresholds).
        cls_logits: ``(B, Q, K+1)`` class logits.
        mask_logits: ``(B, Q, H, W)`` mask logits at the padded input size.
        batch_data_samples: mmdet data samples with their metainfo.
        rescale: Return maps at ``ori_shape``.

    Returns:
        The data samples, with their predictions set.
    """
    results = fusion_head.predict(cls_logits, mask_logits, batch_data_samples, rescale=rescale)
    for sample, result in zip(batch_data_samples, results):
        if 'pan_results' in result:
            sample.pred_panoptic_seg = result['pan_results']
        if 'sem_results' in result:
            sample.pred_sem_seg = result['sem_results']
    return batch_data_samples


@MODELS.register_module()
class PanopticMaskClassifier(MaskFormer):
    """mmdet's ``MaskFormer`` detector for effvision's mask-classification heads.

    The ``panoptic_head`` is a :class:`~effvision.models.decode_heads.mask_classification.
    MaskClassificationHead` (``effvision.KMaXHead``, ``effvision.PEMHead``) built with
    ``num_things_classes``/``num_stuff_classes``; the ``panoptic_fusion_head`` is
    ``effvision.MaskClassificationFusionHead``. Predictions carry ``pred_panoptic_seg`` (mmdet's
    encoding, read by ``effvision.PanopticQualityMetric``) and ``pred_sem_seg`` (class ids).
    """

    def predict(self, batch_inputs: Tensor, batch_data_samples: list, rescale: bool = True) -> list:
        """Panoptic and semantic predictions of a batch.

        Args:
            batch_inputs: ``(B, 3, H, W)`` normalised, padded images.
            batch_data_samples: mmdet data samples with their metainfo.
            rescale: Return maps at ``ori_shape``.

        Returns:
            The data samples with ``pred_panoptic_seg`` and/or ``pred_sem_seg`` set.
        """
        feats = self.extract_feat(batch_inputs)
        metas = [sample.metainfo for sample in batch_data_samples]
        cls_logits, mask_logits = self.panoptic_head.predict_mask_classification(feats, metas)
        return attach_predictions(
            self.panoptic_fusion_head, cls_logits, mask_logits, batch_data_samples, rescale
        )

    def _forward(self, batch_inputs: Tensor, batch_data_samples: list | None = None):
        """Raw class and mask logits (for export and inspection)."""
        feats = self.extract_feat(batch_inputs)
        return self.panoptic_head(feats)
