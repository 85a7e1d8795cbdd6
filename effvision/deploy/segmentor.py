"""An exported segmentor as an mmseg model, so mmengine's test loop can evaluate it.

``tools/test.py CONFIG DEPLOY_DIR --backend onnxruntime`` replaces the config's model with a
:class:`DeployedSegmentor`: the config's data preprocessor normalises and pads the batch exactly
as for the PyTorch model, the exported graph computes the logits, and mmseg's own
``EncoderDecoder`` inference (whole or slide) and ``postprocess_result`` (padding crop, flip,
resize to the original shape, argmax) run unchanged, so the dataset's metric compares the two
backends on equal terms.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from mmengine.config import ConfigDict
from mmseg.models.segmentors import BaseSegmentor, EncoderDecoder
from torch import Tensor

from effvision.registry import MODELS

from .onnx import META_FILE, ONNX_FILE, ORTSegmentor
from .runner import InputShapeError

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
        if backend not in BACKENDS:
            raise DeployedModelError(
                f'backend {backend!r} is not available; implemented: {", ".join(BACKENDS)}'
            )
        if backend == 'tensorrt':
            from .tensorrt import TRTSegmentor

            self.runner = TRTSegmentor.from_dir(deploy_dir)
        else:
            self.runner = ORTSegmentor.from_dir(deploy_dir, providers)
        meta = self.runner.meta
        self.test_cfg = ConfigDict({'mode': 'whole', **(test_cfg or {})})
        self._check_preprocessing(meta['preprocess'], deploy_dir)
        self.out_channels = int(meta['num_classes'])
        if num_classes is not None and num_classes != self.out_channels:
            raise DeployedModelError(
                f'the model in {deploy_dir} predicts {self.out_channels} classes but the '
                f'config has {num_classes}; use the config the model was exported from'
            )
        self.align_corners = bool(meta['postprocess']['align_corners'])
        # postprocess_result reads decode_head.threshold for one-channel (sigmoid) models
        self.decode_head = SimpleNamespace(
            threshold=meta['postprocess'].get('threshold'), num_classes=self.out_channels
        )

    def _check_preprocessing(self, exported: dict[str, Any], deploy_dir) -> None:
        """The config's normalisation must be the one baked into the export."""
        dp = self.data_preprocessor
        mean = dp.mean.flatten().tolist() if dp._enable_normalize else [0.0, 0.0, 0.0]
        std = dp.std.flatten().tolist() if dp._enable_normalize else [1.0, 1.0, 1.0]
        same = (
            np.allclose(mean, exported['mean'], rtol=1e-6, atol=1e-4)
            and np.allclose(std, exported['std'], rtol=1e-6, atol=1e-4)
            and bool(dp.channel_conversion) == bool(exported['bgr_to_rgb'])
        )
        if not same:
            raise DeployedModelError(
                f'the config normalises with mean {mean}, std {std}, bgr_to_rgb '
                f'{bool(dp.channel_conversion)} but {deploy_dir} was exported with '
                f'{exported}; use the config the model was exported from'
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
        size = tuple(inputs.shape[2:])
        if not self.runner.dynamic and size != self.runner.input_size:
            h, w = self.runner.input_size
            raise DeployedModelError(
                f'the exported model is static at {h}x{w} but the test pipeline gives '
                f'{size[0]}x{size[1]} inputs; re-export with --dynamic, or make the test '
                f'pipeline produce {h}x{w} images (or slide inference with {h}x{w} crops)'
            )
        try:
            self.runner.check_input(inputs.shape)
        except InputShapeError as err:
            raise DeployedModelError(
                f'{err} (the test pipeline or slide crops decide the size the model gets)'
            ) from None
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


def deployed_model_cfg(
    model_cfg: dict, deploy_dir: str | os.PathLike, backend: str = 'onnxruntime'
) -> dict:
    """The model config that runs ``deploy_dir`` in place of the PyTorch model ``model_cfg``.

    Keeps the PyTorch model's data preprocessor and ``test_cfg``; refuses configs that are not
    mmseg segmentors (panoptic and detection models have no exported form yet).
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
    if 'data_preprocessor' not in model_cfg or 'panoptic_head' in model_cfg:
        raise DeployedModelError(
            f'--backend {backend} runs exported semantic-segmentation models (mmseg configs '
            f'with a data_preprocessor); {model_cfg.get("type")} is not one'
        )
    # a UDA model (DACS) keeps its segmentor under 'model'; the export is that student
    head = model_cfg.get('decode_head') or (model_cfg.get('model') or {}).get('decode_head')
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
) -> DeployedSegmentor:
    """An exported model with the config's pipeline, for :func:`effvision.apis.inference_model`.

    Args:
        config: The config file (or ``Config``) the model was exported from.
        deploy_dir: Folder written by ``tools/deploy.py``.
        backend: ``'onnxruntime'`` or ``'tensorrt'``.

    Returns:
        The :class:`DeployedSegmentor` in eval mode, with ``cfg`` and ``dataset_meta`` (classes
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
