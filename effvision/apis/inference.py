"""Single-image inference: build a segmentor from a config, load weights, predict.

The same calls as ``mmseg.apis`` (``init_model``, ``inference_model``), with what effvision users
need on top: checkpoints load on torch >= 2.6 with ``weights_only`` kept on, SyncBN is reverted on
CPU, class names and palette come from the checkpoint or else from the config's dataset (mmseg
guesses a dataset from the number of classes), and every image reaches the model as 3-channel BGR:
grayscale and RGBA files are converted, never rejected, and an unreadable file raises an error that
names the file and what is wrong with it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

# mmengine / mmseg / torch are imported where used: `read_image` must stay usable on a deploy
# machine that has only numpy, OpenCV and onnxruntime (effvision.deploy.onnx.ORTSegmentor).
if TYPE_CHECKING:
    from mmengine.config import Config
    from mmengine.dataset import Compose
    from mmseg.structures import SegDataSample
    from torch import nn

ImageLike = str | os.PathLike | np.ndarray

__all__ = ['ImageReadError', 'inference_model', 'init_model', 'read_image']


class ImageReadError(OSError):
    """An image file exists but cannot be read or decoded."""


def read_image(img: ImageLike) -> np.ndarray:
    """Reads an image as 3-channel uint8 BGR, whatever its channel layout.

    Grayscale (HxW or HxWx1) becomes 3 equal channels, BGRA drops its alpha channel (as mmcv's
    ``LoadImageFromFile`` does), 16-bit images are scaled to 8 bits. EXIF orientation is applied to
    files, as in mmcv.

    Args:
        img: A file path, or an array already in memory (HxW, HxWx1, HxWx3 BGR or HxWx4 BGRA).

    Returns:
        np.ndarray: (H, W, 3) uint8 BGR image.

    Raises:
        FileNotFoundError: ``img`` is a path that does not exist.
        ImageReadError: The path is a directory, an empty file or a file OpenCV cannot decode, or
            the array has an unsupported shape.
    """
    if isinstance(img, np.ndarray):
        return _to_bgr(img, source='array')
    path = Path(os.fspath(img)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f'image not found: {path} (resolved from {Path.cwd()})')
    if path.is_dir():
        raise ImageReadError(f'cannot read image {path}: it is a directory, not an image file')
    if path.stat().st_size == 0:
        raise ImageReadError(f'cannot read image {path}: the file is empty (0 bytes)')
    # np.fromfile + imdecode instead of imread: imread fails silently on non-ASCII paths on Windows.
    # IMREAD_COLOR is mmcv's 'color' flag: gray -> BGR, alpha dropped, 16 -> 8 bit, EXIF rotation.
    decoded = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_COLOR)
    if decoded is None:
        raise ImageReadError(
            f'cannot read image {path}: OpenCV could not decode it (not an image format it '
            'supports, or the file is truncated or corrupt)'
        )
    return _to_bgr(decoded, source=str(path))


def _to_bgr(img: np.ndarray, source: str) -> np.ndarray:
    """Converts a decoded image of any supported layout to (H, W, 3) uint8 BGR."""
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (3, 4)) or img.size == 0:
        raise ImageReadError(
            f'cannot use image from {source}: expected HxW, HxWx1, HxWx3 or HxWx4, got shape '
            f'{img.shape}'
        )
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif img.dtype == bool:
        img = img.astype(np.uint8) * 255
    elif img.dtype != np.uint8:
        # Floats are taken as [0, 1] when they fit there (the usual convention), else as 0..255.
        img = img.astype(np.float32)
        if img.size and float(np.nanmax(img)) <= 1.0:
            img = img * 255.0
        img = np.clip(np.nan_to_num(img), 0, 255).round().astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    return np.ascontiguousarray(img)


def _dataset_meta_from_config(cfg: Config, num_classes: int) -> dict[str, Any]:
    """Class names and palette of the config's test (else val) dataset, or generated ones."""
    from effvision.registry import DATASETS

    classes, palette = None, None
    for loader_key in ('test_dataloader', 'val_dataloader', 'train_dataloader'):
        dataset = (cfg.get(loader_key) or {}).get('dataset')
        if not isinstance(dataset, dict):
            continue
        meta = dict(dataset.get('metainfo') or {})
        try:
            dataset_cls = DATASETS.get(dataset.get('type', ''))
        except Exception:  # an unknown or scoped type name: fall back to the explicit metainfo
            dataset_cls = None
        base = dict(getattr(dataset_cls, 'METAINFO', None) or {})
        classes = meta.get('classes', base.get('classes'))
        palette = meta.get('palette', base.get('palette'))
        if classes is not None:
            break
    if classes is None or len(classes) != num_classes:
        classes = tuple(f'class_{i}' for i in range(num_classes))
        palette = None
    if palette is None or len(palette) < len(classes):
        # Same seed as mmseg's BaseSegDataset uses for datasets without a palette.
        rng = np.random.RandomState(42)
        palette = rng.randint(0, 255, size=(len(classes), 3)).tolist()
    return dict(classes=tuple(classes), palette=[list(map(int, c)) for c in palette])


def init_model(
    config: str | os.PathLike | Config,
    checkpoint: str | os.PathLike | None = None,
    device: str = 'cpu',
    cfg_options: dict | None = None,
) -> nn.Module:
    """Builds a segmentor from a config file and optionally loads a checkpoint.

    Args:
        config: Config file path or a loaded ``Config``.
        checkpoint: Checkpoint path (``.pth`` written by tools/train.py, or any file holding a
            state dict). ``None`` leaves the weights randomly initialised.
        device: Device to put the model on, e.g. ``'cpu'`` or ``'cuda:0'``.
        cfg_options: Options merged into the config, as with ``--cfg-options``.

    Returns:
        nn.Module: The segmentor in eval mode, with ``cfg`` (the config used) and ``dataset_meta``
        (``classes`` and ``palette``) attached.

    Raises:
        FileNotFoundError: The config file does not exist.
        CheckpointError: The checkpoint is missing, corrupt or does not hold weights.
    """
    import torch
    from mmengine.config import Config
    from mmengine.model.utils import revert_sync_batchnorm
    from mmengine.registry import init_default_scope

    from effvision.utils import (
        CheckpointError,
        allow_mmengine_checkpoints,
        extract_state_dict,
        load_checkpoint_file,
        register_all_modules,
    )

    if isinstance(config, (str, os.PathLike)):
        if not Path(config).is_file():
            raise FileNotFoundError(f'config file not found: {os.fspath(config)}')
        config = Config.fromfile(os.fspath(config))
    elif not isinstance(config, Config):
        raise TypeError(f'config must be a file path or a Config, got {type(config).__name__}')
    config = copy.deepcopy(config)
    if cfg_options is not None:
        config.merge_from_dict(cfg_options)

    # No pretrained-backbone download at inference: the checkpoint (or nothing) provides weights.
    if 'pretrained' in config.model:  # mmseg segmentors; mmdet detectors have no such argument
        config.model.pretrained = None
    config.model.train_cfg = None
    if isinstance(config.model.get('backbone'), dict):
        config.model.backbone.init_cfg = None

    register_all_modules(init_default_scope=False)
    allow_mmengine_checkpoints()
    init_default_scope(config.get('default_scope', 'effvision'))
    from effvision.registry import MODELS

    model = MODELS.build(config.model)

    dataset_meta = None
    if checkpoint is not None:
        ckpt = load_checkpoint_file(checkpoint, map_location='cpu')
        if not isinstance(ckpt, dict):
            raise CheckpointError(
                f'checkpoint {os.fspath(checkpoint)} does not hold a dict of weights '
                f'(got {type(ckpt).__name__})'
            )
        _load_exactly(model, extract_state_dict(ckpt), os.fspath(checkpoint))
        dataset_meta = (ckpt.get('meta') or {}).get('dataset_meta')
    num_classes = num_model_classes(model)
    if not dataset_meta or 'classes' not in dataset_meta:
        dataset_meta = _dataset_meta_from_config(config, num_classes)
    elif not dataset_meta.get('palette'):
        dataset_meta = {**dataset_meta, **_dataset_meta_from_config(config, num_classes)}
    model.dataset_meta = dataset_meta
    model.cfg = config

    if torch.device(device).type == 'cpu':
        # SyncBN needs a process group and CUDA; BN computes the same thing in eval mode.
        model = revert_sync_batchnorm(model)
    model.to(device)
    model.eval()
    return model


def num_model_classes(model: nn.Module) -> int:
    """Classes of a segmentor (``decode_head``) or a panoptic detector (``panoptic_head``)."""
    for name in ('decode_head', 'panoptic_head'):
        head = getattr(model, name, None)
        if head is not None:
            return int(head.num_classes)
    return 0


def _load_exactly(model: nn.Module, state: dict, name: str) -> None:
    """Loads a whole-model state dict; any missing, unexpected or mis-shaped key is an error.

    A segmentor checkpoint that does not fit its config (another backbone width, another number
    of classes) would otherwise run with random weights where keys did not match.
    """
    from effvision.utils import CheckpointError, describe_key_mismatch

    own = model.state_dict()
    shapes = [
        f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}'
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if shapes or missing or unexpected:
        raise CheckpointError(
            f'checkpoint {name} does not fit the model built from the config: '
            + describe_key_mismatch(missing, unexpected, shapes)
            + '. Pass the config the checkpoint was trained with.'
        )
    model.load_state_dict(state, strict=True)


def _test_pipeline(cfg: Config) -> Compose:
    """The config's test pipeline, loading from an in-memory array and without annotations."""
    from mmengine.dataset import Compose

    pipeline = [
        copy.deepcopy(t) for t in cfg.test_pipeline if 'Annotations' not in str(t.get('type', ''))
    ]
    if not pipeline or 'LoadImage' not in str(pipeline[0].get('type', '')):
        raise ValueError(
            'the config test_pipeline must start with a LoadImage* transform, got '
            f'{pipeline[0] if pipeline else "an empty pipeline"}'
        )
    # Images are read by `read_image` (which converts every layout to BGR) and passed as arrays.
    pipeline[0] = dict(type='LoadImageFromNDArray')
    return Compose(pipeline)


def inference_model(
    model: nn.Module, img: ImageLike | Sequence[ImageLike]
) -> SegDataSample | list[SegDataSample]:
    """Predicts the segmentation of one image or a list of images.

    Args:
        model: A segmentor from :func:`init_model`.
        img: An image path or BGR array, or a list of them. Grayscale and RGBA images are
            converted to BGR (see :func:`read_image`).

    Returns:
        SegDataSample or list[SegDataSample]: For each image, ``pred_sem_seg`` (1, H, W) class ids
        and ``seg_logits`` (C, H, W), at the original image size. A list iff ``img`` is a list.
        A panoptic model (mmdet config) returns mmdet ``DetDataSample`` s with
        ``pred_panoptic_seg`` (1, H, W) in mmdet's encoding (stuff: label; thing:
        ``label + instance * 1000``; void: ``num_classes``) and ``pred_sem_seg`` (1, H, W) class
        ids, both stored as ``sem_seg``.

    Raises:
        FileNotFoundError, ImageReadError: An image cannot be read.
    """
    import torch
    from mmengine.registry import init_default_scope

    is_batch = isinstance(img, (list, tuple))
    imgs = list(img) if is_batch else [img]
    init_default_scope(model.cfg.get('default_scope', 'effvision'))
    pipeline = _test_pipeline(model.cfg)
    data: dict[str, list] = dict(inputs=[], data_samples=[])
    for item in imgs:
        packed = pipeline(dict(img=read_image(item)))
        if not isinstance(item, np.ndarray):
            packed['data_samples'].set_metainfo(dict(img_path=os.fspath(item)))
        data['inputs'].append(packed['inputs'])
        data['data_samples'].append(packed['data_samples'])
    with torch.no_grad():
        results = model.test_step(data)
    return results if is_batch else results[0]
