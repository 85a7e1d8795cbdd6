"""effvision.deploy.onnx and tools/deploy.py: export, onnxruntime parity, dynamic-shape traps."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch

from effvision.deploy.onnx import (
    ExportError,
    InputShapeError,
    ORTSegmentor,
    SegLogitsWrapper,
    check_parity,
    export_onnx,
    format_parity,
    second_shape,
)
from tests.conftest import QUICKSTART, TINY_CONFIG, data_options
from tests.conftest import REPO_ROOT as REPO


# The quickstart runs are `slow` here (minutes of subprocesses); `make test-all` runs them.
# Configs under test: a tiny ResNet + FCN (tests/data), and the quickstart config.
@pytest.fixture(scope='module', params=['tiny', pytest.param('quickstart', marks=pytest.mark.slow)])
def config(request) -> Path:
    """A config file path: the tiny fixture or the quickstart config."""
    return QUICKSTART if request.param == 'quickstart' else TINY_CONFIG


PARITY = re.compile(
    r'^ONNX parity: max\|Δlogit\|=(?P<diff>\S+) argmax agreement=(?P<agree>[\d.]+)% '
    r'\((?P<pixels>\d+) pixels; NxHxW (?P<sizes>[^)]*)\)$',
    re.M,
)


def deploy(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / 'tools/deploy.py'), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)


def crop_size(config: Path) -> tuple[int, int]:
    from mmengine.config import Config

    return tuple(Config.fromfile(config).crop_size)


def test_static_export_and_parity_on_the_first_val_image(config, checkpoint, shapes_root, tmp_path):
    from effvision.apis import inference_model, init_model, read_image

    out = tmp_path / 'static'
    # No --image: the first validation image of the config's val dataset is used.
    proc = deploy(config, checkpoint, '--out-dir', out, '--cfg-options', *data_options(shapes_root))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    match = PARITY.search(proc.stdout)
    assert match, proc.stdout
    h, w = crop_size(config)
    assert float(match['agree']) >= 99.9 and int(match['pixels']) == h * w
    assert float(match['diff']) < 1e-3
    assert sorted(p.name for p in out.iterdir()) == ['deploy.json', 'end2end.onnx', 'parity.json']

    meta = json.loads((out / 'deploy.json').read_text())
    assert meta['input']['shape'] == [1, 3, h, w] and not meta['dynamic']
    assert meta['input']['range'] == {'batch': [1, 1], 'height': [h, h], 'width': [w, w]}
    assert meta['output']['shape'] == [1, 9, h, w] and meta['num_classes'] == 9
    assert meta['preprocess'] == {
        'mean': [123.675, 116.28, 103.53], 'std': [58.395, 57.12, 57.375], 'bgr_to_rgb': True
    }  # fmt: skip
    assert len(meta['classes']) == len(meta['palette']) == 9
    assert meta['opset'] == 18 and {'torch', 'onnx', 'onnxruntime'} <= set(meta['versions'])
    first_val = sorted((shapes_root / 'images' / 'validation').iterdir())[0]
    assert meta['parity_image'] == str(first_val)
    assert meta['parity'] == {'passed': True, 'file': 'parity.json'}
    parity = json.loads((out / 'parity.json').read_text())
    assert parity['passed'] and parity['image'] == str(first_val)
    assert parity['min_agreement_measured'] >= 0.999 and parity['max_abs_diff'] < 1e-3
    assert [r['shape'] for r in parity['results']] == [[1, 3, h, w]]
    graph = onnx.load(out / 'end2end.onnx').graph
    assert [i.name for i in graph.input] == ['input'] and [o.name for o in graph.output] == [
        'logits'
    ]

    # The runner reproduces mmseg's own prediction. The image is twice the export size: the test
    # pipeline's keep-ratio Resize and the runner's resize then feed the model the same pixels.
    img = cv2.resize(read_image(first_val), (2 * w, 2 * h), interpolation=cv2.INTER_LINEAR)
    labels = ORTSegmentor.from_dir(out).predict(img)
    expected = inference_model(init_model(config, checkpoint), img).pred_sem_seg.data[0].numpy()
    assert labels.shape == img.shape[:2] and (labels == expected).mean() > 0.99


def test_dynamic_export_checks_a_second_size_and_runs_at_others(
    config, checkpoint, shapes_root, tmp_path
):
    out = tmp_path / 'dynamic'
    image = sorted((shapes_root / 'images' / 'validation').iterdir())[1]
    proc = deploy(
        config, checkpoint, '--out-dir', out, '--dynamic', '32', '160', '--image', image,
        '--check-sizes', '72x100',
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    match = PARITY.search(proc.stdout)
    assert match, proc.stdout
    h, w = crop_size(config)
    h2, w2 = second_shape(h, w, (32, 160), (32, 160))
    assert match['sizes'] == f'1x{h}x{w}, 2x{h2}x{w2}, 2x72x100'
    pixels = h * w + 2 * h2 * w2 + 2 * 72 * 100
    assert float(match['agree']) >= 99.9 and int(match['pixels']) == pixels

    graph = onnx.load(out / 'end2end.onnx').graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ['batch', 3, 'height', 'width']
    # A third size, neither checked by the tool nor a multiple of 32, still matches PyTorch.
    from effvision.apis import init_model, read_image

    model = init_model(config, checkpoint)
    runner = ORTSegmentor.from_dir(out)
    (result,) = check_parity(model, runner, read_image(image), [(h - 24, w + 40)])
    assert result.error is None and result.agreement >= 0.999, result
    # The range passed on the command line is recorded and enforced, naming the fix.
    meta = json.loads((out / 'deploy.json').read_text())
    assert meta['input']['range']['height'] == meta['input']['range']['width'] == [32, 160]
    with pytest.raises(InputShapeError, match=r'height 176 \(accepted: 32..160\).*--dynamic'):
        runner.logits(runner.preprocess(read_image(image), (176, 64)))
    with pytest.raises(InputShapeError, match=r'width 24 \(accepted: 32..160\)'):
        runner.predict(image, size=(64, 24))


# --- the dynamic-shape trap, on a real mmseg head ------------------------------------------------

PINNING_HEAD = dict(
    _delete_=True, type='PSPHead', in_channels=64, in_index=1, channels=8, pool_scales=(1, 2),
    num_classes=9, norm_cfg=dict(type='BN'), align_corners=True,
    loss_decode=dict(type='CrossEntropyLoss'),
)  # fmt: skip


@pytest.fixture(scope='module')
def pinning_model(tmp_path_factory):
    """Tiny ResNet + mmseg PSPHead(align_corners=True): mmseg's `resize` calls int() on sizes."""
    from effvision.apis import init_model

    path = tmp_path_factory.mktemp('pin') / 'tiny_psp.py'
    path.write_text(TINY_CONFIG.read_text())
    return init_model(path, cfg_options={'model.decode_head': PINNING_HEAD})


def _image(h: int = 64, w: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_dynamic_export_refuses_a_model_that_pins_its_size(pinning_model, tmp_path):
    with pytest.raises(ExportError, match=r'height|width') as info:
        export_onnx(pinning_model, tmp_path, _image(), shape=(64, 64), dynamic=True)
    assert 'Export without --dynamic' in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temp files left


def test_the_check_catches_torch_onnx_silently_specialising(pinning_model, tmp_path):
    # The trap: plain torch.onnx.export accepts the dynamic spec, "refines" H and W to the example
    # size and reports success. Running the graph at a second size exposes it.
    from torch.export import Dim

    wrapper = SegLogitsWrapper(pinning_model).eval()
    example = torch.randn(1, 3, 64, 64)
    program = torch.onnx.export(
        wrapper,
        (example,),
        dynamo=True,
        input_names=['input'],
        output_names=['logits'],
        dynamic_shapes={'input': {2: Dim('height'), 3: Dim('width')}},
        verbose=False,
    )
    program.save(tmp_path / 'end2end.onnx')
    meta = {
        'input': {'name': 'input', 'example_shape': [1, 3, 64, 64]},
        'output': {'name': 'logits'},
        'dynamic': True,  # what the user asked for
        'preprocess': {'mean': [123.675, 116.28, 103.53], 'std': [58.395, 57.12, 57.375],
                       'bgr_to_rgb': True},
        'postprocess': {'align_corners': True, 'threshold': None},
    }  # fmt: skip
    runner = ORTSegmentor(tmp_path / 'end2end.onnx', meta)
    results = check_parity(pinning_model, runner, _image(), [(64, 64), second_shape(64, 64)])
    assert results[0].error is None and results[0].agreement == 1.0
    assert not results[1].ok_shape or results[1].agreement < 0.999
    assert format_parity(results).startswith('ONNX parity: FAILED')


def test_static_export_of_the_same_model_is_fine_and_failed_parity_is_not_published(
    pinning_model, tmp_path
):
    passed, results, path = export_onnx(pinning_model, tmp_path, _image(), shape=(64, 64))
    assert passed and path == tmp_path / 'end2end.onnx' and results[0].agreement == 1.0
    # An impossible threshold: the new model is rejected, the earlier end2end.onnx stays intact.
    before = path.read_bytes()
    passed, _, rejected = export_onnx(
        pinning_model, tmp_path, _image(), shape=(32, 48), min_agreement=1.01
    )
    assert not passed and rejected.name == 'end2end.rejected.onnx'
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'deploy.json', 'deploy.rejected.json', 'end2end.onnx', 'end2end.rejected.onnx',
        'parity.json', 'parity.rejected.json',
    ]  # fmt: skip
    assert not json.loads((tmp_path / 'parity.rejected.json').read_text())['passed']
    # A static model refuses other sizes in the runner, naming the fix.
    runner = ORTSegmentor.from_dir(tmp_path)
    with pytest.raises(InputShapeError, match=r'height 32 \(64 only\).*resize the input to 64x64'):
        runner.logits(np.zeros((1, 3, 32, 64), np.float32))
    with pytest.raises(ExportError, match='need a dynamic export'):
        export_onnx(pinning_model, tmp_path, _image(), shape=(64, 64), extra_sizes=[(80, 80)])
    with pytest.raises(ExportError, match='needs a dynamic export'):
        export_onnx(pinning_model, tmp_path, _image(), shape=(64, 64), dynamic_range=(32, 128))
    # Sizes outside the range are refused before anything is traced or written.
    with pytest.raises(ExportError, match=r'outside the dynamic range 96..128'):
        export_onnx(
            pinning_model, tmp_path / 'r', _image(), shape=(64, 64), dynamic=True,
            dynamic_range=(96, 128),
        )  # fmt: skip
    assert not (tmp_path / 'r').exists()


def test_cli_errors_are_one_line(tmp_path):
    # Paths are checked before anything is loaded: the files need not be real.
    config, checkpoint = tmp_path / 'cfg.py', tmp_path / 'model.pth'
    config.write_text('')
    proc = deploy(config, tmp_path / 'nope.pth', '--out-dir', tmp_path)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert 'nope.pth' in line and 'not found' in line
    checkpoint.write_bytes(b'')
    proc = deploy(config, checkpoint, '--out-dir', tmp_path, '--image', tmp_path / 'x.jpg')
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert 'x.jpg' in line and 'not found' in line


@pytest.mark.parametrize(
    'flags, message',
    [
        (['--dynamic', '256'], '--dynamic takes no value or MIN MAX'),
        (['--dynamic', '512', '256'], '1 <= MIN <= MAX'),
        (['--check-sizes', '72x100'], '--check-sizes needs --dynamic'),
        (['--fp16'], 'add --backend tensorrt'),
        (['--backend', 'tensorrt', '--int8'], '--int8 needs --calib-dir'),
        (['--backend', 'tensorrt', '--fp16', '--int8'], 'not both'),
        (['--backend', 'tensorrt', '--int8', '--calib-dir', 'nowhere'], 'is not a folder'),
    ],
)
def test_inconsistent_options_are_refused_in_one_line_before_anything_is_written(
    tmp_path, flags, message
):
    config, checkpoint = tmp_path / 'cfg.py', tmp_path / 'model.pth'
    config.write_text('')
    checkpoint.write_bytes(b'')
    out = tmp_path / 'out'
    proc = deploy(config, checkpoint, '--out-dir', out, *flags)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert message in line, line
    assert not out.exists()


def test_tensorrt_backend_without_tensorrt_stops_before_writing(tmp_path):
    from effvision.deploy.tensorrt import unavailable_reason

    reason = unavailable_reason()
    if reason is None:
        pytest.skip('TensorRT and a GPU are present: tests/deploy/test_tensorrt.py builds engines')
    config, checkpoint = tmp_path / 'cfg.py', tmp_path / 'model.pth'
    config.write_text('')
    checkpoint.write_bytes(b'')
    proc = deploy(config, checkpoint, '--out-dir', tmp_path / 'out', '--backend', 'tensorrt')
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert reason in line and 'nothing was written' in line
    assert not (tmp_path / 'out').exists()


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    from effvision.apis import init_model

    model = init_model(TINY_CONFIG)
    checkpoint = tmp_path / 'tiny.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, checkpoint)
    out = tmp_path / 'out'
    proc = deploy(QUICKSTART, checkpoint, '--out-dir', out, '--image', QUICKSTART)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert 'deploy.py: error:' in line and 'checkpoint' in line.lower(), proc.stderr[-2000:]
    assert not out.exists()
