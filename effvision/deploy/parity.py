"""Export parity on a dataset: labels and mIoU of an exported model next to PyTorch's.

Used by ``tests/deploy/test_export_configs.py`` and ``tools/analysis/export_parity.py``: a
config's model (random weights when no checkpoint is given) is exported, and the exported model
and PyTorch predict the same images; the report gives the worst logit difference, the pixel
agreement and the mIoU of both against the ground truth.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .onnx import _exported_segmentor
from .runner import SegmentorRunner

__all__ = ['build_model', 'miou', 'segmentation_parity']


def build_model(
    config: str | os.PathLike, checkpoint: str | None = None, random_bn_stats: bool = True
) -> nn.Module:
    """A config's model in eval mode on CPU, without downloading pretrained weights.

    Semantic segmentors (mmseg) and panoptic detectors (mmdet configs) alike.

    Args:
        config: Config file.
        checkpoint: Weights to load; default: random initialisation.
        random_bn_stats: Without a checkpoint, give every BatchNorm random running statistics
            (mean ~ N(0, 0.2), var ~ U(0.5, 1.5), seed 0) so that folding them into the
            convolutions for deployment is exercised (the defaults 0 / 1 fold to nothing).

    Returns:
        The model (a DACS model as built; exports use its student).
    """
    from mmengine.config import Config
    from mmengine.model.utils import revert_sync_batchnorm
    from mmengine.registry import DefaultScope

    from effvision.apis.inference import num_model_classes
    from effvision.registry import MODELS
    from effvision.utils import register_all_modules

    cfg = Config.fromfile(os.fspath(config))
    segmentor_cfg = cfg.model.model if cfg.model.type == 'DACS' else cfg.model
    segmentor_cfg.backbone.init_cfg = None  # published weights are not downloaded here
    if checkpoint is not None:
        from effvision.apis import init_model

        return init_model(cfg, checkpoint, device='cpu').eval()
    register_all_modules()
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = revert_sync_batchnorm(MODELS.build(cfg.model))
    model.init_weights()
    if random_bn_stats:
        generator = torch.Generator().manual_seed(0)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                n = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    num_classes = num_model_classes(_exported_segmentor(model))
    model.dataset_meta = dict(
        classes=[f'class_{i}' for i in range(num_classes)],
        palette=[[(37 * i) % 256, (91 * i) % 256, (173 * i) % 256] for i in range(num_classes)],
    )
    return model.eval()


def miou(labels: Sequence[np.ndarray], gts: Sequence[np.ndarray], num_classes: int) -> float:
    """mmseg's mIoU (in %) of label maps against ground truth (255 ignored)."""
    from mmseg.evaluation.metrics import IoUMetric

    areas = [
        IoUMetric.intersect_and_union(
            torch.from_numpy(np.asarray(pred, np.int64)),
            torch.from_numpy(np.asarray(gt, np.int64)),
            num_classes,
            255,
        )
        for pred, gt in zip(labels, gts)
    ]
    totals = [sum(area[i] for area in areas) for i in range(4)]
    metrics = IoUMetric.total_area_to_metrics(*totals, metrics=['mIoU'])
    return float(np.nanmean(np.asarray(metrics['IoU'])) * 100)


def segmentation_parity(
    model: nn.Module,
    runner: SegmentorRunner,
    images: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
) -> dict[str, Any]:
    """Runs PyTorch and an exported model on the same images at the export's input size.

    Both get the same normalised input (``runner.preprocess``, resized to the export size for a
    static export); labels are compared at that size.

    Args:
        model: The PyTorch model the export came from (a DACS model: its student is used).
        runner: The exported model (onnxruntime or TensorRT runner).
        images: BGR uint8 images.
        gts: Their label maps, at the size the model runs at.

    Returns:
        dict: ``max_abs_diff``, ``agreement`` (fraction of pixels with the same class, all
        images), ``panoptic_agreement`` (a panoptic export: the worst image's fraction of pixels
        with the same panoptic id; else None), ``miou_pytorch`` and ``miou_backend`` (in %, of
        the semantic maps), ``images``.
    """
    segmentor = _exported_segmentor(model).eval()
    num_classes = int(runner.meta['num_classes'])
    backend_labels, torch_labels, max_diff, agree, pixels = [], [], 0.0, 0, 0
    panoptic_agree = []
    for img in images:
        x = runner.preprocess(img)
        h, w = x.shape[2:]
        if runner.task == 'panoptic':
            from .panoptic import compare_panoptic

            result, out_labels, ref_labels = compare_panoptic(segmentor, runner, x)
            if out_labels is None:
                raise RuntimeError(f'the export failed to run: {result.error}')
            max_diff = max(max_diff, result.max_abs_diff)
            panoptic_agree.append(result.panoptic_agreement)
        else:
            metas = [dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w))]
            with torch.no_grad():
                ref = segmentor.encode_decode(torch.from_numpy(x), metas).numpy()
            out = runner.logits(x)
            max_diff = max(max_diff, float(np.abs(out - ref).max()))
            out_labels, ref_labels = out.argmax(1), ref.argmax(1)
        torch_labels.append(ref_labels[0])
        backend_labels.append(out_labels[0])
        agree += int((torch_labels[-1] == backend_labels[-1]).sum())
        pixels += h * w
    return dict(
        max_abs_diff=max_diff,
        agreement=agree / pixels,
        panoptic_agreement=min(panoptic_agree) if panoptic_agree else None,
        miou_pytorch=miou(torch_labels, gts, num_classes),
        miou_backend=miou(backend_labels, gts, num_classes),
        images=len(images),
    )
