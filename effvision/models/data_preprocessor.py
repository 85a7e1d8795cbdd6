"""Data preprocessors that mmseg and mmdet lack."""

from __future__ import annotations

from typing import Any

import torch
from mmdet.models.data_preprocessors import BatchFixedSizePad, DetDataPreprocessor
from mmseg.models.data_preprocessor import SegDataPreProcessor

from effvision.registry import MODELS


@MODELS.register_module()
class UDADataPreProcessor(SegDataPreProcessor):
    """mmseg's preprocessing, applied to the source and to the target half of a UDA batch.

    A training batch from :class:`effvision.datasets.UDADataset` holds ``inputs`` and
    ``data_samples`` (labelled source) and ``target_inputs`` and ``target_data_samples``
    (target); both halves are converted, normalised and padded the same way and come back under
    the same keys. A batch without the target keys (validation, testing, inference) is processed
    exactly as :class:`mmseg.models.SegDataPreProcessor` does.
    """

    def forward(self, data: dict, training: bool = False) -> dict[str, Any]:
        if 'target_inputs' not in data:
            return super().forward(data, training)
        missing = {'inputs', 'data_samples', 'target_data_samples'} - set(data)
        if missing:
            raise KeyError(f'a UDA batch needs {sorted(missing)} as well (see UDADataset)')
        source = super().forward(
            dict(inputs=data['inputs'], data_samples=data['data_samples']), training
        )
        target = super().forward(
            dict(inputs=data['target_inputs'], data_samples=data['target_data_samples']), training
        )
        return dict(
            inputs=source['inputs'],
            data_samples=source['data_samples'],
            target_inputs=target['inputs'],
            target_data_samples=target['data_samples'],
        )


@MODELS.register_module()
class CanvasDetDataPreprocessor(DetDataPreprocessor):
    """mmdet's preprocessing, then zero padding of every batch to one fixed canvas.

    kMaX-DeepLab pads every image, in training and at test time, at the bottom/right to the
    canvas it was trained on (1281 x 1281 for COCO/ADE20K, 1025 x 2049 for Cityscapes; odd on
    purpose). mmdet's ``BatchFixedSizePad`` does this only in training; this preprocessor applies
    it to every batch (images with 0 after normalisation; in training also the masks with 0 and
    the semantic maps with ``seg_pad_value``) and sets ``batch_input_shape``/``pad_shape`` to the
    canvas.

    Args:
        canvas: ``(H, W)`` every batch is padded to; a larger image is an error (resize it in
            the pipeline, e.g. ``Resize(scale=canvas[::-1], keep_ratio=True)``).
        **kwargs: Passed to ``mmdet.DetDataPreprocessor``.
    """

    def __init__(self, canvas: tuple[int, int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.canvas = (int(canvas[0]), int(canvas[1]))
        self.canvas_pad = BatchFixedSizePad(
            size=self.canvas,
            img_pad_value=0,
            pad_mask=True,
            mask_pad_value=0,
            pad_seg=True,
            seg_pad_value=self.seg_pad_value,
        )

    def forward(self, data: dict, training: bool = False) -> dict[str, Any]:
        data = super().forward(data, training)
        height, width = data['inputs'].shape[-2:]
        if height > self.canvas[0] or width > self.canvas[1]:
            raise ValueError(
                f'a batch of {height}x{width} does not fit the {self.canvas[0]}x{self.canvas[1]} '
                'canvas; resize the images to fit it in the pipeline (Resize with keep_ratio)'
            )
        inputs, samples = data['inputs'], data['data_samples']
        if training:  # the targets are padded with the images
            inputs, samples = self.canvas_pad(inputs, samples)
        else:  # test-time ground truth stays at the original size for the metrics
            pad = (0, self.canvas[1] - width, 0, self.canvas[0] - height)
            inputs = torch.nn.functional.pad(inputs, pad, value=0)
        for sample in samples or []:
            sample.set_metainfo(dict(batch_input_shape=self.canvas, pad_shape=self.canvas))
        return dict(inputs=inputs, data_samples=samples)
