"""Export of panoptic mask-classification models (kMaX-DeepLab, PEM): logits in the graph.

The graph of a ``PanopticMaskClassifier`` is the network only::

    input        'input'        float32 (N, 3, H, W), normalised and padded as mmdet's
                                DetDataPreprocessor (or kMaX's CanvasDetDataPreprocessor) does
    output       'cls_logits'   float32 (N, Q, K+1): per query, K class logits and no-object last
    output       'mask_logits'  float32 (N, Q, h, w): per query, mask logits at the head's stride

Everything after the logits stays on the host, as the issue asks and as deployments prefer
(thresholds change without a re-export): the bilinear upsampling of the masks to the input size
(with the head's ``align_corners`` rule, recorded in ``deploy.json``), the crop to the image and
the resize to its original size, then the merging into a panoptic map with the config's rule and
thresholds (:class:`effvision.models.segmentors.MaskClassificationFusionHead`, the very code the
PyTorch model runs). Keeping the masks at stride 4 in the graph also keeps H and W free of the
kMaX rule's branch on the width's parity, so the models export with dynamic sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effvision.models.decode_heads.mask_classification import (
    MaskClassificationHead,
    mask_upsample_align_corners,
    semantic_inference,
)

from .runner import SegmentorRunner

__all__ = [
    'OUTPUT_NAMES',
    'PanopticLogitsWrapper',
    'check_panoptic_parity',
    'compare_panoptic',
    'is_panoptic',
    'panoptic_postprocess_meta',
    'runner_mask_logits',
    'upsample_masks',
]

OUTPUT_NAMES = ('cls_logits', 'mask_logits')


def is_panoptic(model: nn.Module) -> bool:
    """Whether ``model`` is an mmdet panoptic detector (has a ``panoptic_head``)."""
    return getattr(model, 'panoptic_head', None) is not None


class PanopticLogitsWrapper(nn.Module):
    """The part of a ``PanopticMaskClassifier`` that goes into the graph.

    Args:
        detector: An ``effvision.PanopticMaskClassifier`` (a mask-classification
            ``panoptic_head`` and ``MaskClassificationFusionHead``).

    Raises:
        ExportError: Another panoptic model (e.g. mmdet's own Mask2Former).
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        from effvision.models.segmentors.mask_classifier import MaskClassificationFusionHead

        from .onnx import ExportError

        head = getattr(detector, 'panoptic_head', None)
        fusion = getattr(detector, 'panoptic_fusion_head', None)
        if not isinstance(head, MaskClassificationHead) or not isinstance(
            fusion, MaskClassificationFusionHead
        ):
            raise ExportError(
                f'{type(detector).__name__} with {type(head).__name__} has no ONNX export: '
                'panoptic models export with effvision.PanopticMaskClassifier (kMaX-DeepLab, PEM '
                'heads). Evaluate it with --backend pytorch.'
            )
        self.detector = detector

    def forward(self, input: Tensor) -> tuple[Tensor, Tensor]:
        """Class and mask logits of a batch.

        Args:
            input: (N, 3, H, W) normalised, padded images.

        Returns:
            ``(N, Q, K+1)`` class logits and ``(N, Q, h, w)`` mask logits at the head's stride.
        """
        outputs = self.detector.panoptic_head(self.detector.extract_feat(input))
        return outputs['pred_logits'], outputs['pred_masks']


def panoptic_postprocess_meta(detector: nn.Module) -> dict:
    """The ``postprocess`` section of ``deploy.json``: what the host does after the graph."""
    head, fusion = detector.panoptic_head, detector.panoptic_fusion_head
    return {
        'type': 'mask_classification',
        'mask_upsample': 'bilinear to the padded input size',
        'align_corners': head.mask_align_corners,
        'mask_activation': head.mask_activation,
        'fusion': {
            'rule': fusion.rule,
            'num_things_classes': int(fusion.num_things_classes),
            'num_stuff_classes': int(fusion.num_stuff_classes),
            'test_cfg': dict(fusion.test_cfg),
        },
    }


def upsample_masks(mask_logits: Tensor, size: Sequence[int], rule: str) -> Tensor:
    """Mask logits at the head's stride -> at the padded input size, as the PyTorch head does.

    Args:
        mask_logits: ``(N, Q, h, w)``.
        size: ``(H, W)`` of the network input.
        rule: ``deploy.json`` ``postprocess.align_corners`` (``'never'`` / ``'odd_width'``).

    Returns:
        ``(N, Q, H, W)``.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(mask_logits.shape[-2:]) == size:
        return mask_logits
    align = mask_upsample_align_corners(rule, size)
    return F.interpolate(mask_logits, size=size, mode='bilinear', align_corners=align)


def runner_mask_logits(runner: SegmentorRunner, inputs: np.ndarray) -> tuple[Tensor, Tensor]:
    """Runs a panoptic export: ``(N, Q, K+1)`` class and ``(N, Q, H, W)`` mask logits (CPU).

    Args:
        runner: The exported model (onnxruntime or TensorRT runner).
        inputs: ``(N, 3, H, W)`` normalised, padded float32.
    """
    out = runner.run(np.ascontiguousarray(inputs, dtype=np.float32))
    masks = upsample_masks(
        torch.from_numpy(out['mask_logits']),
        inputs.shape[2:],
        runner.meta['postprocess']['align_corners'],
    )
    return torch.from_numpy(out['cls_logits']), masks


def check_panoptic_parity(detector, runner: SegmentorRunner, img: np.ndarray, sizes) -> list:
    """Compares a panoptic export with the PyTorch detector at each size.

    The reference is the detector's own ``extract_feat`` and
    ``panoptic_head.predict_mask_classification`` (not the export wrapper). Compared: the class
    and mask logits (max absolute difference over both), the semantic class map
    (``agreement``) and the panoptic map of the fusion head (``panoptic_agreement``). For every
    size after the first, the image and its mirror form a batch of two.

    Returns:
        list[ParityResult]: One per size.
    """
    results = []
    for i, size in enumerate(sizes):
        x = runner.preprocess(img, size)
        if i > 0:
            x = np.concatenate([x, np.ascontiguousarray(x[..., ::-1])], axis=0)
        results.append(compare_panoptic(detector, runner, x)[0])
    return results


def compare_panoptic(detector, runner: SegmentorRunner, x: np.ndarray) -> tuple:
    """One batch through PyTorch and the export (see :func:`check_panoptic_parity`).

    Args:
        detector: The PyTorch ``PanopticMaskClassifier`` (eval mode, CPU).
        runner: The exported model.
        x: ``(N, 3, H, W)`` normalised, padded float32.

    Returns:
        ``(ParityResult, semantic labels of the export, semantic labels of PyTorch)``; the labels
        are ``(N, H, W)`` numpy arrays, ``None`` when the export failed to run.
    """
    from .onnx import ParityResult

    n, _, h, w = x.shape
    metas = [dict(batch_input_shape=(h, w), img_shape=(h, w), ori_shape=(h, w))] * n
    with torch.no_grad():
        feats = detector.extract_feat(torch.from_numpy(x))
        ref = detector.panoptic_head.predict_mask_classification(feats, metas)
    try:
        out = runner_mask_logits(runner, x)
    except Exception as err:  # onnxruntime / TensorRT raise their own types
        return ParityResult(tuple(x.shape), float('inf'), 0.0, 0.0, n * h * w, str(err)), None, None
    if [t.shape for t in out] != [t.shape for t in ref]:
        shapes = [tuple(t.shape) for t in out], [tuple(t.shape) for t in ref]
        error = f'the export returned class/mask logits of shapes {shapes[0]}, PyTorch {shapes[1]}'
        return ParityResult(tuple(x.shape), float('inf'), 0.0, 0.0, n * h * w, error), None, None
    fusion = detector.panoptic_fusion_head
    activation = detector.panoptic_head.mask_activation
    semantic = [semantic_inference(*logits, activation).argmax(1) for logits in (out, ref)]
    with torch.no_grad():
        panoptic = [
            torch.stack([fusion.panoptic(c, m) for c, m in zip(*logits)]) for logits in (out, ref)
        ]
    result = ParityResult(
        shape=tuple(x.shape),
        max_abs_diff=max(float((a - b).abs().max()) for a, b in zip(out, ref)),
        max_abs_logit=max(float(t.abs().max()) for t in ref),
        agreement=float((semantic[0] == semantic[1]).float().mean()),
        pixels=n * h * w,
        panoptic_agreement=float((panoptic[0] == panoptic[1]).float().mean()),
    )
    return result, semantic[0].numpy(), semantic[1].numpy()
