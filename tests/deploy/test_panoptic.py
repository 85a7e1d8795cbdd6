"""Panoptic exports (kMaX-DeepLab, PEM): class and mask logits in the graph, merging on the host.

The synthetic panoptic configs (random weights and BatchNorm statistics) are exported with
tools/deploy.py (PEM with dynamic sizes, checked at a size that is not a multiple of 32; kMaX
static at its canvas, as its preprocessor pads every image to it), then evaluated by
tools/test.py with both backends, and predicted image by image through the runner the demo uses.
The configs' thresholds are lowered so that random weights paste segments (with the published
thresholds such a model pastes none and every map is void, which would agree trivially).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT, data_options

CONFIGS = {
    'pem': REPO_ROOT / 'configs/pem/pem_swin-nano_1xb8-2k_shapes-panoptic-128x128.py',
    'kmax': REPO_ROOT
    / 'configs/kmax_deeplab/kmax-deeplab_swin-nano_1xb8-2k_shapes-panoptic-128x128.py',
}
EXPORT_FLAGS = {
    'pem': ['--shape', '64', '64', '--dynamic', '--check-sizes', '100x70'],
    'kmax': [],  # static at the 128x128 canvas
}
LOW_THRESHOLDS = {
    'pem': {'model.test_cfg.object_mask_thr': 0.0, 'model.test_cfg.iou_thr': 0.0},
    'kmax': {'model.test_cfg.thing_thr': 0.0, 'model.test_cfg.stuff_thr': 0.0},
}
# A freshly initialised head scores every class alike (class predictors at std 0.01) and gives
# nearly the same pixel features everywhere, so one query wins every pixel and a panoptic map has
# one segment. These weights are redrawn larger (and kMaX's mask-logit norm scaled up) so that
# queries disagree and the maps have several segments to compare.
SPREAD = {'pem': r'class_embed|mask_embed|pixel_decoder', 'kmax': r'predictor\.|pixel_decoder'}
FAST = ['test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False']


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=900, check=False,
    )  # fmt: skip


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def exported(request, shapes_root, tmp_path_factory) -> dict:
    """A random-weight panoptic model: its config, checkpoint and export folder."""
    from effvision.deploy.parity import build_model

    name = request.param
    root = tmp_path_factory.mktemp(f'panoptic_{name}')
    model = build_model(CONFIGS[name])  # random weights and BatchNorm statistics
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if 'pixel_space_mask_batch_norm.weight' in key:
                param.fill_(30.0)
            elif (
                re.search(SPREAD[name], key)
                and key.endswith('weight')
                and param.dim() > 1
                and 'dcn_offset' not in key  # zero, as initialised: no deformation
            ):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    checkpoint = root / 'model.pth'
    torch.save(
        {'state_dict': model.state_dict(), 'meta': {'dataset_meta': model.dataset_meta}},
        checkpoint,
    )
    image = sorted((shapes_root / 'images' / 'validation').iterdir())[0]
    proc = _run(
        'tools/deploy.py', CONFIGS[name], checkpoint, '--out-dir', root / 'deploy', '--image',
        image, *EXPORT_FLAGS[name],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'panoptic agreement=' in proc.stdout, proc.stdout
    return dict(name=name, config=CONFIGS[name], checkpoint=checkpoint, deploy=root / 'deploy')


def test_export_records_the_host_side_post_processing(exported):
    meta = json.loads((exported['deploy'] / 'deploy.json').read_text())
    parity = json.loads((exported['deploy'] / 'parity.json').read_text())
    assert meta['task'] == 'panoptic'
    assert [o['name'] for o in meta['outputs']] == ['cls_logits', 'mask_logits']
    post = meta['postprocess']
    kmax = exported['name'] == 'kmax'
    assert post['align_corners'] == ('odd_width' if kmax else 'never')
    assert post['mask_activation'] == ('softmax' if kmax else 'sigmoid')
    assert post['fusion']['rule'] == ('kmax' if kmax else 'maskformer')
    assert (post['fusion']['num_things_classes'], post['fusion']['num_stuff_classes']) == (5, 4)
    if kmax:
        assert meta['preprocess']['canvas'] == [128, 128] and not meta['dynamic']
    else:  # the masks stay at stride 4 in the graph: H and W are free
        assert meta['dynamic'] and meta['outputs'][1]['shape'][:2] == ['batch', 24]
        sizes = [r['shape'] for r in parity['results']]
        assert [2, 3, 100, 70] in sizes  # not a multiple of 32: the pixel decoder crops
    assert parity['passed'] and parity['min_panoptic_agreement_measured'] >= 0.999
    for result in parity['results']:
        assert result['agreement'] >= 0.999 and result['panoptic_agreement'] >= 0.999


def test_panoptic_export_matches_pytorch_in_the_test_loop(exported, shapes_root, tmp_path):
    """tools/test.py: PQ and mIoU of the exported model next to PyTorch's, on the synthetic set."""
    metrics = {}
    models = {'pytorch': exported['checkpoint'], 'onnxruntime': exported['deploy']}
    for backend, model in models.items():
        work_dir = tmp_path / backend
        proc = _run(
            'tools/test.py', exported['config'], model, '--work-dir', work_dir, '--backend',
            backend, '--cfg-options', *FAST, *data_options(shapes_root),
            *(f'{key}={value}' for key, value in LOW_THRESHOLDS[exported['name']].items()),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        (result,) = work_dir.glob('*/*.json')
        metrics[backend] = json.loads(result.read_text())
    for key in ('coco_panoptic/PQ', 'coco_panoptic/SQ', 'coco_panoptic/RQ', 'mIoU'):
        assert abs(metrics['pytorch'][key] - metrics['onnxruntime'][key]) <= 0.1, (key, metrics)


def test_deployed_panoptic_model_predicts_like_pytorch(exported, shapes_root):
    """The runner the demo uses: the same panoptic and semantic maps, image by image."""
    from mmengine.config import Config

    from effvision.apis import inference_model, init_model
    from effvision.deploy import DeployedPanopticSegmentor, init_deployed_model

    cfg = Config.fromfile(exported['config'])
    cfg.merge_from_dict(LOW_THRESHOLDS[exported['name']])
    images = sorted((shapes_root / 'images' / 'validation').iterdir())
    torch_model = init_model(cfg, str(exported['checkpoint']), device='cpu')
    deployed = init_deployed_model(cfg, exported['deploy'])
    assert isinstance(deployed, DeployedPanopticSegmentor)
    segments = set()
    for image in images:
        ref, out = inference_model(torch_model, str(image)), inference_model(deployed, str(image))
        for field in ('pred_panoptic_seg', 'pred_sem_seg'):
            a, b = getattr(ref, field).sem_seg, getattr(out, field).sem_seg
            assert a.shape == b.shape == (1, 64, 64)  # at the image's own size
            assert (a == b).float().mean() >= 0.999, field
        segments |= set(np.unique(ref.pred_panoptic_seg.sem_seg.numpy()).tolist())
    assert len(segments) > 4, segments  # several segments per image, things and stuff


def test_deployed_models_refuse_the_wrong_config(exported):
    from mmengine.config import Config

    from effvision.deploy import DeployedModelError, DeployedSegmentor, deployed_model_cfg
    from effvision.deploy.segmentor import DeployedPanopticSegmentor

    cfg = Config.fromfile(exported['config'])
    # a semantic segmentor given the panoptic folder
    preprocessor = dict(
        type='mmseg.SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375], bgr_to_rgb=True,
    )  # fmt: skip
    with pytest.raises(DeployedModelError, match='holds a panoptic export but the config is a '):
        DeployedSegmentor(exported['deploy'], preprocessor)
    # the other head's merging rule
    other = 'maskformer' if exported['name'] == 'kmax' else 'kmax'
    fusion = dict(cfg.model.panoptic_fusion_head, rule=other)
    with pytest.raises(DeployedModelError, match='use the config the model was exported from'):
        DeployedPanopticSegmentor(
            exported['deploy'], cfg.model.data_preprocessor, fusion, test_cfg=None
        )
    # the standalone runner has no per-pixel logits to give
    from effvision.deploy import ORTSegmentor

    runner = ORTSegmentor.from_dir(exported['deploy'])
    with pytest.raises(ValueError, match='init_deployed_model'):
        runner.logits(np.zeros((1, 3, 128, 128), np.float32))
    # another number of classes
    model_cfg = deployed_model_cfg(cfg.model, exported['deploy'])
    assert model_cfg.pop('type') == 'effvision.DeployedPanopticSegmentor'
    with pytest.raises(DeployedModelError, match='predicts 9 classes but the config has 12'):
        DeployedPanopticSegmentor(**{**model_cfg, 'num_classes': 12})


def test_detection_configs_have_no_deployed_model(tmp_path):
    from mmengine.config import Config

    from effvision.deploy import DeployedModelError, deployed_model_cfg

    cfg = Config.fromfile(REPO_ROOT / 'configs/swin/mask-rcnn_swin-t_fpn_ms-crop-1x_coco.py')
    (tmp_path / 'end2end.onnx').write_bytes(b'')
    (tmp_path / 'deploy.json').write_text('{}')
    with pytest.raises(DeployedModelError, match='--backend pytorch'):
        deployed_model_cfg(cfg.model, tmp_path)


@pytest.mark.slow
def test_kmax_refuses_dynamic_sizes_before_writing(tmp_path):
    from effvision.deploy.onnx import ExportError, export_onnx
    from effvision.deploy.parity import build_model

    model = build_model(CONFIGS['kmax'])
    img = np.zeros((128, 128, 3), np.uint8)
    with pytest.raises(ExportError, match='Export without --dynamic'):
        export_onnx(model, tmp_path / 'out', img, shape=(128, 128), dynamic=True)
    assert not (tmp_path / 'out').exists()
