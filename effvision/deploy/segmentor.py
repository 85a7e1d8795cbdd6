"""An exported model as an mmseg (or mmdet) model, so mmengine's test loop can evaluate it.

``tools/test.py CONFIG DEPLOY_DIR --backend onnxruntime`` replaces the config's model with a
:class:`DeployedSegmentor`: the config's data preprocessor normalises and pads the batch exactly
as for the PyTorch model, the exported graph computes the logits, and mmseg's own
``EncoderDecoder`` inference (whole or slide) and ``postprocess_result`` (padding crop, flip,
resize to the original shape, argmax) run unchanged, so the dataset's metric compares the two
backends on equal terms. A panoptic config (mmdet, kMaX-DeepLab / PEM) gets a
:class:`DeployedPanopticSegmentor` the same way: mmdet's preprocessing, the graph's class and mask
logits, and the config's own fusion head for the panoptic and semantic maps.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from mmdet.models.detectors.base import BaseDetector
from mmengine.config import ConfigDict
from mmseg.models.segmentors import BaseSegmentor, EncoderDecoder
from torch import Tensor

from effvision.registry import MODELS

from .onnx import META_FILE, ONNX_FILE, ORTSegmentor
from .runner import InputShapeError, SegmentorRunner

BACKENDS = ('onnxruntime', 'tensorrt')


class DeployedModelError(ValueError):
    """The exported model does not fit the config or the data it is asked to run on."""


@MODELS.register_module()
class DeployedSegmentor(BaseSegmentor):
    """Runs an exported ``end2end.onnx`` (with its ``deploy.json``) inside mmseg's test loop.

    Args:
        deploy_dir: Folder written by ``tools/deploy.py`` (``end2end.onnx``, ``deploy.json``).
        data_preprocessor: The PyTorch model's ``SegDataPreProcessor`` config; its mean, std and
            channel order must be the ones the model was exported with.
        test_cfg: The PyTorch model's ``test_cfg`` (``mode='whole'`` or ``'slide'`` with
            ``crop_size`` and ``stride``).
        backend: ``'onnxruntime'`` or ``'tensorrt'`` (the folder's ``end2end.engine``).
        providers: onnxruntime execution providers (default: CPU).
        num_classes: Classes the config's decode head predicts; checked against the export.
    """

    def __init__(
        self,
        deploy_dir: str | os.PathLike,
        data_preprocessor: dict,
        test_cfg: dict | None = None,
        backend: str = 'onnxruntime',
        providers: list[str] | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(data_preprocessor=data_preprocessor)
        self.runner = open_export(self, deploy_dir, backend, providers, 'semantic', num_classes)
        meta = self.runner.meta
        self.test_cfg = ConfigDict({'mode': 'whole', **(test_cfg or {})})
        self.out_channels = int(meta['num_classes'])
        self.align_corners = bool(meta['postprocess']['align_corners'])
        # postprocess_result reads decode_head.threshold for one-channel (sigmoid) models
        self.decode_head = SimpleNamespace(
            threshold=meta['postprocess'].get('threshold'), num_classes=self.out_channels
        )

    # mmseg's whole/slide inference and prediction, driven by encode_decode below
    predict = EncoderDecoder.predict
    inference = EncoderDecoder.inference
    whole_inference = EncoderDecoder.whole_inference
    slide_inference = EncoderDecoder.slide_inference

    def encode_decode(self, inputs: Tensor, batch_img_metas: list[dict]) -> Tensor:
        """Runs the exported graph.

        Args:
            inputs: Normalised images (N, 3, H, W).
            batch_img_metas: Image meta information (unused; the graph needs none).

        Returns:
            Logits (N, num_classes, H, W) at the input size.
        """
        check_input_size(self.runner, inputs)
        array = inputs.detach().to('cpu', torch.float32).numpy()
        logits = self.runner.logits(np.ascontiguousarray(array))
        return torch.from_numpy(logits).to(inputs.device)

    def extract_feat(self, inputs: Tensor):
        """Not available: the exported graph gives logits only."""
        raise NotImplementedError('an exported model has no features; only predict() runs')

    def loss(self, inputs: Tensor, data_samples):
        """Not available: an exported model is not trained."""
        raise NotImplementedError('an exported model cannot be trained; use the PyTorch model')

    def _forward(self, inputs: Tensor, data_samples=None) -> Tensor:
        """Logits (N, num_classes, H, W), as ``mode='tensor'``."""
        return self.encode_decode(inputs, [])


@MODELS.register_module()
class DeployedPanopticSegmentor(BaseDetector):
    """Runs a panoptic export (kMaX-DeepLab, PEM) inside mmdet's test loop.

    The graph gives class and mask logits; the masks are upsampled to the padded input size with
    the head's rule recorded in ``deploy.json``, and the config's fusion head (rule and
    thresholds of its ``test_cfg``) merges them exactly as ``PanopticMaskClassifier.predict``
    does. Predictions carry ``pred_panoptic_seg`` and ``pred_sem_seg``.

    Args:
        deploy_dir: Folder written by ``tools/deploy.py`` from a panoptic config.
        data_preprocessor: The PyTorch model's ``DetDataPreprocessor`` (or
            ``CanvasDetDataPreprocessor``) config; its normalisation must match the export's.
        panoptic_fusion_head: The PyTorch model's ``MaskClassificationFusionHead`` config.
        test_cfg: The PyTorch model's ``test_cfg`` (the fusion thresholds).
        backend: ``'onnxruntime'`` or ``'tensorrt'``.
        providers: onnxruntime execution providers (default: CPU).
        num_classes: Classes of the config's panoptic head; checked against the export.
    """

    def __init__(
        self,
        deploy_dir: str | os.PathLike,
        data_preprocessor: dict,
        panoptic_fusion_head: dict,
        test_cfg: dict | None = None,
        backend: str = 'onnxruntime',
        providers: list[str] | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(data_preprocessor=data_preprocessor)
        self.runner = open_export(self, deploy_dir, backend, providers, 'panoptic', num_classes)
        meta = self.runner.meta
        fusion_cfg = dict(panoptic_fusion_head, test_cfg=test_cfg)
        self.panoptic_fusion_head = MODELS.build(fusion_cfg)
        config = {
            'rule': self.panoptic_fusion_head.rule,
            'num_things_classes': self.panoptic_fusion_head.num_things_classes,
            'num_stuff_classes': self.panoptic_fusion_head.num_stuff_classes,
        }
        exported = {key: meta['postprocess']['fusion'][key] for key in config}
        if exported != config:
            raise DeployedModelError(
                f'the config merges with {config} but {deploy_dir} was exported from a model '
                f'with {exported}; use the config the model was exported from'
            )
        # read by effvision.apis.num_model_classes (demo palettes)
        self.panoptic_head = SimpleNamespace(num_classes=int(meta['num_classes']))

    def predict(self, batch_inputs: Tensor, batch_data_samples: list, rescale: bool = True):
        """Panoptic and semantic predictions of a batch.

        Args:
            batch_inputs: ``(B, 3, H, W)`` normalised, padded images.
            batch_data_samples: mmdet data samples with their metainfo.
            rescale: Return maps at ``ori_shape``.

        Returns:
            The data samples with ``pred_panoptic_seg`` and ``pred_sem_seg`` set.
        """
        from effvision.models.segmentors.mask_classifier import attach_predictions

        cls_logits, mask_logits = self._forward(batch_inputs)
        return attach_predictions(
            self.panoptic_fusion_head, cls_logits, mask_logits, batch_data_samples, rescale
        )

    def _forward(self, batch_inputs: Tensor, batch_data_samples=None) -> tuple[Tensor, Tensor]:
        """``(B, Q, K+1)`` class and ``(B, Q, H, W)`` mask logits at the padded input size."""
        from .panoptic import runner_mask_logits

        check_input_size(self.runner, batch_inputs)
        array = batch_inputs.detach().to('cpu', torch.float32).numpy()
        cls_logits, mask_logits = runner_mask_logits(self.runner, array)
        return cls_logits.to(batch_inputs.device), mask_logits.to(batch_inputs.device)

    def extract_feat(self, batch_inputs: Tensor):
        """Not available: the exported graph gives logits only."""
        raise NotImplementedError('an exported model has no features; only predict() runs')

    def loss(self, batch_inputs: Tensor, batch_data_samples):
        """Not available: an exported model is not trained."""
        raise NotImplementedError('an exported model cannot be trained; use the PyTorch model')


def open_export(
    model,
    deploy_dir: str | os.PathLike,
    backend: str,
    providers: list[str] | None,
    task: str,
    num_classes: int | None,
) -> SegmentorRunner:
    """The backend runner of an export folder, checked against the config's model.

    Args:
        model: The deployed model being built (its ``data_preprocessor`` is checked).
        deploy_dir: Folder written by ``tools/deploy.py``.
        backend: ``'onnxruntime'`` or ``'tensorrt'``.
        providers: onnxruntime execution providers.
        task: ``'semantic'`` or ``'panoptic'``: what the config's model is.
        num_classes: Classes of the config's head, or None.

    Raises:
        DeployedModelError: Another backend, task, normalisation or number of classes.
    """
    runner = load_runner(deploy_dir, backend, providers, task)
    check_preprocessing(model.data_preprocessor, runner.meta['preprocess'], deploy_dir)
    check_num_classes(runner.meta, num_classes, deploy_dir)
    return runner


def load_runner(
    deploy_dir: str | os.PathLike,
    backend: str,
    providers: list[str] | None = None,
    task: str | None = None,
) -> SegmentorRunner:
    """The backend runner of an export folder, checked to hold a model of ``task``."""
    if backend not in BACKENDS:
        raise DeployedModelError(
            f'backend {backend!r} is not available; implemented: {", ".join(BACKENDS)}'
        )
    if backend == 'tensorrt':
        from .tensorrt import TRTSegmentor

        runner = TRTSegmentor.from_dir(deploy_dir)
    else:
        runner = ORTSegmentor.from_dir(deploy_dir, providers)
    if task is not None and runner.task != task:
        raise DeployedModelError(
            f'{deploy_dir} holds a {runner.task} export but the config is a {task} model; use '
            'the config the model was exported from'
        )
    return runner


def check_preprocessing(dp, exported: dict[str, Any], deploy_dir) -> None:
    """The config's normalisation (mmseg's or mmdet's preprocessor) must be the export's."""
    mean = dp.mean.flatten().tolist() if dp._enable_normalize else [0.0, 0.0, 0.0]
    std = dp.std.flatten().tolist() if dp._enable_normalize else [1.0, 1.0, 1.0]
    bgr_to_rgb = bool(getattr(dp, 'channel_conversion', getattr(dp, '_channel_conversion', False)))
    same = (
        np.allclose(mean, exported['mean'], rtol=1e-6, atol=1e-4)
        and np.allclose(std, exported['std'], rtol=1e-6, atol=1e-4)
        and bgr_to_rgb == bool(exported['bgr_to_rgb'])
    )
    if not same:
        raise DeployedModelError(
            f'the config normalises with mean {mean}, std {std}, bgr_to_rgb {bgr_to_rgb} but '
            f'{deploy_dir} was exported with {exported}; use the config the model was exported '
            'from'
        )


def check_num_classes(meta: dict[str, Any], num_classes: int | None, deploy_dir) -> int:
    """The export's number of classes, refused when the config's differs."""
    exported = int(meta['num_classes'])
    if num_classes is not None and num_classes != exported:
        raise DeployedModelError(
            f'the model in {deploy_dir} predicts {exported} classes but the config has '
            f'{num_classes}; use the config the model was exported from'
        )
    return exported


def check_input_size(runner: SegmentorRunner, inputs: Tensor) -> None:
    """Refuses a batch the export cannot take, naming what decides its size."""
    size = tuple(inputs.shape[2:])
    if not runner.dynamic and size != runner.input_size:
        h, w = runner.input_size
        raise DeployedModelError(
            f'the exported model is static at {h}x{w} but the test pipeline gives '
            f'{size[0]}x{size[1]} inputs; re-export with --dynamic, or make the test '
            f'pipeline produce {h}x{w} images (or slide inference with {h}x{w} crops)'
        )
    try:
        runner.check_input(inputs.shape)
    except InputShapeError as err:
        raise DeployedModelError(
            f'{err} (the test pipeline or slide crops decide the size the model gets)'
        ) from None


def deployed_model_cfg(
    model_cfg: dict, deploy_dir: str | os.PathLike, backend: str = 'onnxruntime'
) -> dict:
    """The model config that runs ``deploy_dir`` in place of the PyTorch model ``model_cfg``.

    Keeps the PyTorch model's data preprocessor and ``test_cfg`` (and a panoptic model's fusion
    head); refuses detection configs (Mask R-CNN has no exported form yet).
    """
    from .tensorrt import ENGINE_FILE

    model_file = ENGINE_FILE if backend == 'tensorrt' else ONNX_FILE
    for name in (model_file, META_FILE):
        if not (Path(deploy_dir) / name).is_file():
            raise DeployedModelError(
                f'{Path(deploy_dir) / name} not found: --backend {backend} takes the folder '
                f'written by tools/deploy.py (`python tools/deploy.py CONFIG CHECKPOINT '
                f'--out-dir {deploy_dir} --backend {backend}`)'
            )
    if 'data_preprocessor' in model_cfg and 'panoptic_head' in model_cfg:
        return dict(
            type='effvision.DeployedPanopticSegmentor',
            deploy_dir=os.path.abspath(deploy_dir),
            data_preprocessor=model_cfg['data_preprocessor'],
            panoptic_fusion_head=model_cfg['panoptic_fusion_head'],
            test_cfg=model_cfg.get('test_cfg'),
            backend=backend,
            num_classes=model_cfg['panoptic_head'].get('num_classes'),
        )
    # a UDA model (DACS) keeps its segmentor under 'model'; the export is that student
    head = model_cfg.get('decode_head') or (model_cfg.get('model') or {}).get('decode_head')
    if 'data_preprocessor' not in model_cfg or not head:
        raise DeployedModelError(
            f'--backend {backend} runs exported semantic-segmentation models (mmseg configs '
            f'with a decode_head) and panoptic mask-classification models (kMaX-DeepLab, '
            f'PEM); {model_cfg.get("type")} is neither: evaluate it with --backend pytorch'
        )
    return dict(
        type='effvision.DeployedSegmentor',
        deploy_dir=os.path.abspath(deploy_dir),
        data_preprocessor=model_cfg['data_preprocessor'],
        test_cfg=model_cfg.get('test_cfg'),
        backend=backend,
        num_classes=head.get('num_classes') if isinstance(head, dict) else None,
    )


def init_deployed_model(
    config, deploy_dir: str | os.PathLike, backend: str = 'onnxruntime'
) -> DeployedSegmentor | DeployedPanopticSegmentor:
    """An exported model with the config's pipeline, for :func:`effvision.apis.inference_model`.

    Args:
        config: The config file (or ``Config``) the model was exported from.
        deploy_dir: Folder written by ``tools/deploy.py``.
        backend: ``'onnxruntime'`` or ``'tensorrt'``.

    Returns:
        The :class:`DeployedSegmentor` (:class:`DeployedPanopticSegmentor` for a panoptic
        config) in eval mode, with ``cfg`` and ``dataset_meta`` (classes
        and palette of the export) attached, as :func:`effvision.apis.init_model` returns.
    """
    import copy

    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from effvision.utils import register_all_modules

    cfg = Config.fromfile(os.fspath(config)) if not isinstance(config, Config) else config
    cfg = copy.deepcopy(cfg)
    register_all_modules(init_default_scope=False)
    init_default_scope(cfg.get('default_scope', 'effvision'))
    model = MODELS.build(deployed_model_cfg(cfg.model, deploy_dir, backend))
    meta = model.runner.meta
    model.dataset_meta = dict(classes=list(meta['classes']), palette=list(meta['palette']))
    model.cfg = cfg
    model.eval()
    return model
