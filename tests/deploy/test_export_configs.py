"""Every shipped segmentation config exports to ONNX and keeps its numbers.

Each config's model (random weights, random BatchNorm statistics so that folding them into the
convolutions is exercised) is exported at 64x64 in its deploy form and checked against PyTorch:
onnxruntime must agree on >= 99.9 % of the pixels of the first synthetic validation image, and
the mIoU of both backends on the synthetic validation set must be equal to 0.1. CI runs one
config per backbone family and per head (EXPORT_CI); `make test-all` runs the rest.
Panoptic configs (kMaX-DeepLab, PEM as mmdet models) must agree on the semantic and the panoptic
maps of every synthetic validation image; their CI export, with PQ through tools/test.py, is
tests/deploy/test_panoptic.py. Detection configs (Mask R-CNN) have no export yet and must say so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mmengine.config import Config
from mmengine.registry import DefaultScope

from effvision.apis import read_image
from effvision.deploy.onnx import ExportError, ORTSegmentor, check_parity, export_onnx
from effvision.deploy.parity import build_model, segmentation_parity
from effvision.utils import register_all_modules
from tests.conftest import CONFIGS, REPO_ROOT, config_param

SIZE = (64, 64)
# CI: one config per backbone family and per head kind; `make test-all` runs every config.
EXPORT_CI = {
    'quickstart/upernet_swin-nano_1xb8-800_shapes-128x128.py',  # Swin, UPerHead (PPM rewrite)
    'cswin/upernet_cswin-t_8xb2-160k_ade20k-512x512.py',
    'nextvit/fpn_nextvit-s_8xb4-40k_ade20k-512x512.py',  # FPN head, BN merging
    'efficientformer/fpn_efficientformer-l1_8xb4-40k_ade20k-512x512.py',
    'efficientformer/fpn_efficientformerv2-s0_8xb4-40k_ade20k-512x512.py',
    'biformer/fpn_biformer-s_8xb4-80k_ade20k-512x512.py',
    'moat/upernet_moat-0_8xb2-160k_ade20k-512x512.py',
    'daformer/daformer_swin-nano_1xb4-800_shapes2target-128x128.py',  # DACS, DAFormerHead
    'kmax_deeplab/kmax-deeplab_swin-nano_1xb8-2k_shapes-128x128.py',  # kMaX head (semantic)
    'pem/pem_swin-nano_1xb8-2k_shapes-128x128.py',  # PEM head, deformable conv as plain ops
}
_CFGS = {p: Config.fromfile(p) for p in CONFIGS}
SEMANTIC = [p for p, cfg in _CFGS.items() if cfg.default_scope != 'mmdet']
PANOPTIC = [p for p, cfg in _CFGS.items() if 'panoptic_head' in cfg.model]
# Dynamic H/W in CI for one model with each kind of size handling the export rewrites: integer
# upsampling (FPN head) and EfficientFormerV2's strided attention; the rest in `make test-all`.
DYNAMIC_CI = {
    'fpn_nextvit-s_8xb4-40k_ade20k-512x512.py',
    'fpn_efficientformerv2-s0_8xb4-40k_ade20k-512x512.py',
}


def _ids(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT / 'configs'))


def _check_config(path: Path, shapes_root: Path, out: Path, dynamic: bool) -> None:
    import cv2

    model = build_model(path)  # random weights and BatchNorm statistics
    val = sorted((shapes_root / 'images' / 'validation').iterdir())
    labels = shapes_root / 'annotations' / 'validation'
    gts = [cv2.imread(str(labels / f'{p.stem}.png'), cv2.IMREAD_UNCHANGED) for p in val]
    images = [read_image(p) for p in val]
    passed, results, _ = export_onnx(model, out, images[0], shape=SIZE, dynamic=dynamic)
    assert passed and all(r.agreement >= 0.999 for r in results), results
    res = segmentation_parity(model, ORTSegmentor.from_dir(out), images, gts)
    assert res['images'] == len(val) == 4
    assert res['agreement'] >= 0.999, res
    assert abs(res['miou_backend'] - res['miou_pytorch']) <= 0.1, res


@pytest.mark.parametrize(
    'path', [config_param(p, ci=_ids(p) in EXPORT_CI) for p in SEMANTIC], ids=_ids
)
def test_config_exports_static_with_parity_on_the_synthetic_set(path, shapes_root, tmp_path):
    _check_config(path, shapes_root, tmp_path, dynamic=False)


@pytest.mark.parametrize(
    'path', [config_param(p, ci=p.name in DYNAMIC_CI) for p in SEMANTIC], ids=_ids
)
def test_config_exports_dynamic_with_parity_at_two_sizes(path, shapes_root, tmp_path):
    _check_config(path, shapes_root, tmp_path, dynamic=True)


def _check_panoptic_config(path: Path, shapes_root: Path, out: Path, dynamic: bool) -> None:
    model = build_model(path)  # random weights and BatchNorm statistics
    images = [read_image(p) for p in sorted((shapes_root / 'images' / 'validation').iterdir())]
    passed, results, _ = export_onnx(model, out, images[0], shape=SIZE, dynamic=dynamic)
    assert passed, results
    runner = ORTSegmentor.from_dir(out)
    for img in images[1:]:
        (result,) = check_parity(model, runner, img, [SIZE])
        assert result.agreement >= 0.999 and result.panoptic_agreement >= 0.999, result


@pytest.mark.slow
@pytest.mark.parametrize('path', PANOPTIC, ids=_ids)
def test_panoptic_config_exports_static_with_parity_on_the_synthetic_set(
    path, shapes_root, tmp_path
):
    _check_panoptic_config(path, shapes_root, tmp_path, dynamic=False)


# kMaX-DeepLab pads every image to one canvas and exports static (its dynamic refusal is tested
# in test_panoptic.py)
@pytest.mark.slow
@pytest.mark.parametrize('path', [p for p in PANOPTIC if 'kmax' not in p.name], ids=_ids)
def test_panoptic_config_exports_dynamic_with_parity(path, shapes_root, tmp_path):
    _check_panoptic_config(path, shapes_root, tmp_path, dynamic=True)


def test_detection_configs_say_they_have_no_export(tmp_path):
    name = 'swin/mask-rcnn_swin-t_fpn_ms-crop-1x_coco.py'
    from mmdet.registry import MODELS as DET_MODELS
    from mmengine.utils import import_modules_from_strings

    cfg = Config.fromfile(REPO_ROOT / 'configs' / name)
    cfg.model.backbone.init_cfg = None
    register_all_modules()
    import_modules_from_strings(**cfg.custom_imports)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = DET_MODELS.build(cfg.model).eval()
    img = np.zeros((*SIZE, 3), np.uint8)
    with pytest.raises(ExportError, match='no ONNX export yet.*--backend pytorch'):
        export_onnx(model, tmp_path / 'out', img, shape=SIZE)
    assert not (tmp_path / 'out').exists()
