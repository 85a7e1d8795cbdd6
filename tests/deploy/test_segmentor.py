"""DeployedSegmentor and `tools/test.py --backend onnxruntime`: an exported model evaluated by
mmseg's test loop agrees with the PyTorch model, in whole and slide mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import REPO_ROOT as REPO
from tests.conftest import TINY_CONFIG, data_options

FAST = [
    'test_dataloader.num_workers=0',
    'test_dataloader.persistent_workers=False',
]
# 96x96 test images in 64x64 crops (the export's dynamic range starts at 64) with stride 32
SLIDE = [
    'model.test_cfg.mode=slide',
    'model.test_cfg.crop_size=(64,64)',
    'model.test_cfg.stride=(32,32)',
    'test_dataloader.dataset.pipeline.1.scale=(96,96)',
]


@pytest.fixture(scope='module')
def config() -> Path:
    return TINY_CONFIG


def _export(config: Path, checkpoint: Path, shapes_root: Path, out_dir: Path, *flags: str):
    image = sorted((shapes_root / 'images' / 'validation').iterdir())[0]
    proc = subprocess.run(
        [sys.executable, 'tools/deploy.py', str(config), str(checkpoint), '--out-dir',
         str(out_dir), '--image', str(image), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out_dir


@pytest.fixture(scope='module')
def exported(config, checkpoint, shapes_root, tmp_path_factory) -> dict[str, Path]:
    """The random-weight tiny model exported dynamic and static (64x64)."""
    root = tmp_path_factory.mktemp('deployed')
    return {
        'dynamic': _export(config, checkpoint, shapes_root, root / 'dynamic', '--dynamic'),
        'static': _export(config, checkpoint, shapes_root, root / 'static'),
    }


def _test(
    config, model, shapes_root, work_dir, *flags: str, options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, 'tools/test.py', str(config), str(model), '--work-dir', str(work_dir),
         *flags, '--cfg-options', *FAST, *data_options(shapes_root), *options],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def _miou(work_dir: Path) -> float:
    (result,) = work_dir.glob('*/*.json')
    return json.loads(result.read_text())['mIoU']


@pytest.mark.parametrize('mode', ['whole', 'slide'])
def test_onnxruntime_backend_matches_pytorch_in_the_test_loop(
    mode, config, checkpoint, exported, shapes_root, tmp_path
):
    options = tuple(SLIDE) if mode == 'slide' else ()
    labels, miou = {}, {}
    for backend, model in (('pytorch', checkpoint), ('onnxruntime', exported['dynamic'])):
        work_dir = tmp_path / backend
        proc = _test(
            config, model, shapes_root, work_dir, '--backend', backend, '--out',
            str(tmp_path / f'{backend}_out'), options=options,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        miou[backend] = _miou(work_dir)
        labels[backend] = {
            p.name: cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            for p in sorted((tmp_path / f'{backend}_out').glob('*.png'))
        }
    assert labels['pytorch'].keys() == labels['onnxruntime'].keys()
    assert len(labels['pytorch']) == 4  # every validation image
    agree = np.mean(
        [np.mean(labels['pytorch'][k] == labels['onnxruntime'][k]) for k in labels['pytorch']]
    )
    assert agree >= 0.999
    assert abs(miou['pytorch'] - miou['onnxruntime']) <= 0.1


def test_image_demo_runs_the_exported_model_like_pytorch(
    config, checkpoint, exported, shapes_root, tmp_path
):
    images = shapes_root / 'images' / 'validation'
    labels = {}
    for backend, model in (('pytorch', checkpoint), ('onnxruntime', exported['dynamic'])):
        out = tmp_path / backend
        proc = subprocess.run(
            [sys.executable, 'demo/image_demo.py', str(images), str(config), str(model),
             '--out-dir', str(out), '--backend', backend],
            cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        labels[backend] = [
            cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted(out.glob('*_label.png'))
        ]
    assert len(labels['pytorch']) == len(labels['onnxruntime']) == 4
    for torch_labels, ort_labels in zip(labels['pytorch'], labels['onnxruntime'], strict=True):
        assert np.mean(torch_labels == ort_labels) >= 0.999


def test_static_model_refuses_other_input_sizes(config, exported, shapes_root, tmp_path):
    proc = _test(
        config, exported['static'], shapes_root, tmp_path, '--backend', 'onnxruntime',
        options=('test_dataloader.dataset.pipeline.1.scale=(80,80)',),
    )  # fmt: skip
    assert proc.returncode != 0
    assert 'static at 64x64' in proc.stderr and '--dynamic' in proc.stderr


def test_backend_errors_name_the_fix(config, checkpoint, exported, shapes_root, tmp_path):
    # a checkpoint file where the export folder belongs
    proc = _test(config, checkpoint, shapes_root, tmp_path, '--backend', 'onnxruntime')
    assert proc.returncode != 0
    assert 'tools/deploy.py' in proc.stderr and 'end2end.onnx' in proc.stderr
    # the config normalises differently from the export
    proc = _test(
        config, exported['dynamic'], shapes_root, tmp_path, '--backend', 'onnxruntime',
        options=('model.data_preprocessor.mean=[0,0,0]',),
    )  # fmt: skip
    assert proc.returncode != 0 and 'use the config the model was exported from' in proc.stderr
    # the config's head predicts another number of classes
    proc = _test(
        config, exported['dynamic'], shapes_root, tmp_path, '--backend', 'onnxruntime',
        options=('model.decode_head.num_classes=4',),
    )  # fmt: skip
    assert proc.returncode != 0 and 'predicts 9 classes but the config has 4' in proc.stderr


def test_deployed_segmentor_checks_classes_and_backend(exported):
    from effvision.deploy import DeployedSegmentor

    preprocessor = dict(
        type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match='predicts 9 classes but the config has 19'):
        DeployedSegmentor(exported['dynamic'], preprocessor, num_classes=19)
    with pytest.raises(ValueError, match="backend 'tvm' is not available"):
        DeployedSegmentor(exported['dynamic'], preprocessor, backend='tvm')
    # a folder with the ONNX file only: the engine must be built first, with that command
    with pytest.raises(FileNotFoundError, match='end2end.engine not found.*--backend tensorrt'):
        DeployedSegmentor(exported['dynamic'], preprocessor, backend='tensorrt')
    model = DeployedSegmentor(exported['dynamic'], preprocessor)
    with pytest.raises(NotImplementedError, match='cannot be trained'):
        model.loss(None, None)
