"""What every backend runner of an exported segmentor shares: pre- and post-processing, shapes.

A runner is driven by the ``deploy.json`` written next to the model file: normalisation, channel
order, the input shape (static) or the range of shapes (dynamic) the model accepts, classes,
palette and the resize the logits need. Subclasses only run the graph (:meth:`logits`).
Everything here is numpy/OpenCV: no mmseg model or config is needed to deploy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    'META_FILE',
    'InputShapeError',
    'SegmentorRunner',
    'logits_to_labels',
    'normalize_image',
    'resize_bilinear',
]

META_FILE = 'deploy.json'


class InputShapeError(ValueError):
    """An input the exported model was not built for (size outside its range, wrong batch)."""


def normalize_image(
    img: np.ndarray, mean: Sequence[float], std: Sequence[float], bgr_to_rgb: bool
) -> np.ndarray:
    """Turns a BGR uint8 image into the graph input, as SegDataPreProcessor does.

    Args:
        img: (H, W, 3) uint8 BGR image.
        mean: Per-channel mean, in the channel order after the optional flip.
        std: Per-channel std, same order.
        bgr_to_rgb: Flip BGR to RGB before normalising.

    Returns:
        np.ndarray: (1, 3, H, W) float32.
    """
    if bgr_to_rgb:
        img = img[..., ::-1]
    x = (img.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def resize_bilinear(x: np.ndarray, size: tuple[int, int], align_corners: bool) -> np.ndarray:
    """Bilinear resize of (N, C, h, w) to (N, C, H, W), matching ``F.interpolate`` (no antialias).

    cv2.resize would do for ``align_corners=False`` but is capped at 512 channels; this is
    exact for both conventions and any number of classes.
    """
    out_h, out_w = size
    in_h, in_w = x.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return x

    def coords(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if align_corners:
            src = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / max(n_out - 1, 1))
        else:
            src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
            src = np.clip(src, 0, None)
        lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (src - lo).astype(np.float32)

    y0, y1, wy = coords(out_h, in_h)
    x0, x1, wx = coords(out_w, in_w)
    rows = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


def logits_to_labels(logits: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Class ids from (N, C, H, W) logits: argmax, or ``sigmoid > threshold`` when C == 1."""
    if logits.shape[1] == 1:
        thr = 0.3 if threshold is None else threshold
        return (1.0 / (1.0 + np.exp(-logits[:, 0])) > thr).astype(np.int64)
    return logits.argmax(axis=1)


class SegmentorRunner:
    """Base of the backend runners: ``deploy.json`` handling, pre/post-processing, shape checks.

    Args:
        meta: The ``deploy.json`` contents, or its path.
    """

    def __init__(self, meta: dict[str, Any] | str | os.PathLike) -> None:
        if not isinstance(meta, dict):
            meta = json.loads(Path(meta).read_text())
        self.meta = meta
        self.input_name = meta['input']['name']
        self.output_name = meta['output']['name']
        # a panoptic export has several outputs ('outputs'); 'output' is the first of them
        self.output_names = [o['name'] for o in meta.get('outputs') or [meta['output']]]

    @property
    def task(self) -> str:
        """'semantic' (one logits output) or 'panoptic' (class and mask logits)."""
        return self.meta.get('task', 'semantic')

    @property
    def classes(self) -> list[str]:
        """Class names, index = class id."""
        return list(self.meta['classes'])

    @property
    def palette(self) -> list[list[int]]:
        """RGB colour of each class."""
        return [list(c) for c in self.meta['palette']]

    @property
    def dynamic(self) -> bool:
        """Whether the graph accepts a range of H and W (else only ``input_size``)."""
        return bool(self.meta['dynamic'])

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) the model was exported at; the only size a static model accepts."""
        h, w = self.meta['input']['example_shape'][2:]
        return int(h), int(w)

    @property
    def input_range(self) -> dict[str, tuple[int, int]]:
        """Inclusive ``(min, max)`` of 'batch', 'height' and 'width' the model accepts."""
        declared = self.meta['input'].get('range')
        if declared:
            return {axis: (int(lo), int(hi)) for axis, (lo, hi) in declared.items()}
        # an export without a declared range (older files): static sizes, or no limit
        n, _, h, w = self.meta['input'].get('shape') or (
            ['batch', 3, 'height', 'width'] if self.dynamic else self.meta['input']['example_shape']
        )
        return {
            axis: (v, v) if isinstance(v, int) else (1, 2**31 - 1)
            for axis, v in (('batch', n), ('height', h), ('width', w))
        }

    def check_input(self, shape: Sequence[int]) -> None:
        """Raises :class:`InputShapeError` (naming the fix) for a shape the model cannot take.

        Args:
            shape: (N, 3, H, W) of the graph input.
        """
        n, c, h, w = (int(v) for v in shape)
        bad = [
            f'{axis} {value} (accepted: {lo}..{hi})' if lo != hi else f'{axis} {value} ({lo} only)'
            for axis, value in (('batch', n), ('height', h), ('width', w))
            for lo, hi in [self.input_range[axis]]
            if not lo <= value <= hi
        ]
        if c != 3:
            bad.insert(0, f'{c} channels (3 only)')
        if not bad:
            return
        if self.dynamic:
            fix = (
                'resize the input into the range, or re-export with a wider range '
                '(tools/deploy.py --dynamic MIN MAX)'
            )
        else:
            ih, iw = self.input_size
            fix = (
                f'resize the input to {ih}x{iw} (the runners do when given no size), or '
                're-export with --dynamic MIN MAX for a range of sizes'
            )
        raise InputShapeError(
            f'the exported model cannot take an input of shape {tuple(map(int, shape))}: '
            f'{", ".join(bad)}; {fix}'
        )

    def preprocess(self, img: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """Resizes (when needed) and normalises a BGR image into the graph input.

        Args:
            img: (H, W, 3) uint8 BGR image.
            size: (H, W) to feed the model. Default: the export size for a static model, the
                image's own size for a dynamic one.

        Returns:
            np.ndarray: (1, 3, h, w) float32.
        """
        import cv2

        if size is None:
            size = None if self.dynamic else self.input_size
        if size is not None and tuple(img.shape[:2]) != tuple(size):
            img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        pre = self.meta['preprocess']
        return normalize_image(img, pre['mean'], pre['std'], pre['bgr_to_rgb'])

    def run(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Runs the graph on (N, 3, H, W) normalised float32: every output, by name.

        Raises:
            InputShapeError: The shape is outside what the model was built for.
        """
        raise NotImplementedError

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """Runs the graph: (N, 3, H, W) normalised float32 -> (N, C, H, W) logits.

        Raises:
            ValueError: A panoptic export (class and mask logits, see :meth:`run`).
        """
        if self.task == 'panoptic':
            raise ValueError(
                'a panoptic export has class and mask logits, not per-pixel logits: use run(), '
                'or effvision.deploy.init_deployed_model(CONFIG, DEPLOY_DIR) with '
                'effvision.apis.inference_model for panoptic and semantic maps'
            )
        return self.run(inputs)[self.output_name]

    def predict(
        self, img: np.ndarray | str | os.PathLike, size: tuple[int, int] | None = None
    ) -> np.ndarray:
        """Predicts the label map of one image, at the image's own size.

        Args:
            img: Image path or array (grayscale and RGBA are converted to BGR).
            size: (H, W) to run the model at; see :meth:`preprocess`.

        Returns:
            np.ndarray: (H, W) class ids, uint8 when the classes fit in it, else int32.
        """
        from effvision.apis.inference import read_image

        img = read_image(img)
        logits = self.logits(self.preprocess(img, size))
        logits = resize_bilinear(logits, img.shape[:2], self.meta['postprocess']['align_corners'])
        labels = logits_to_labels(logits, self.meta['postprocess'].get('threshold'))[0]
        return labels.astype(np.uint8 if logits.shape[1] <= 256 else np.int32)
