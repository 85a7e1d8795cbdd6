"""effvision.apis: init_model / inference_model on torch >= 2.6, and image reading."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from effvision.apis import ImageReadError, inference_model, init_model, read_image
from tests.conftest import QUICKSTART, TINY_CONFIG


# Configs under test: a tiny ResNet + FCN (tests/data), and the quickstart config.
@pytest.fixture(scope='module', params=['tiny', 'quickstart'])
def config(request) -> Path:
    """A config file path: the tiny fixture or the quickstart config."""
    return QUICKSTART if request.param == 'quickstart' else TINY_CONFIG


@pytest.fixture(scope='module')
def model(config):
    return init_model(config, device='cpu')


def test_init_model_reverts_syncbn_and_takes_classes_from_the_config(model):
    from effvision.datasets import ShapesDataset

    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    assert not model.training
    assert model.dataset_meta['classes'] == ShapesDataset.METAINFO['classes']
    assert len(model.dataset_meta['palette']) == len(model.dataset_meta['classes'])


def test_init_model_loads_an_mmengine_checkpoint_with_weights_only(model, config, tmp_path):
    from mmengine.logging import HistoryBuffer

    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    buffer = HistoryBuffer()
    buffer.update(np.float64(0.5))
    meta = {
        'dataset_meta': {'classes': tuple(f'c{i}' for i in range(9)), 'palette': [[1, 2, 3]] * 9}
    }
    checkpoint = {
        'meta': {**meta, 'iter': 4, 'seed': np.int64(0)},
        'state_dict': {f'module.{k}': v for k, v in state.items()},  # DataParallel prefix
        'message_hub': {'log_scalars': {'train/loss': buffer}},
    }
    path = tmp_path / 'iter_4.pth'
    torch.save(checkpoint, path)
    loaded = init_model(config, path, device='cpu')
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state[key])
    assert loaded.dataset_meta['classes'][0] == 'c0'


def test_init_model_missing_checkpoint_names_the_file(config, tmp_path):
    from effvision.utils import CheckpointError

    with pytest.raises(CheckpointError, match='nope.pth'):
        init_model(config, tmp_path / 'nope.pth')


def test_init_model_rejects_a_checkpoint_that_does_not_fit(model, config, tmp_path):
    from effvision.utils import CheckpointError

    state = dict(model.state_dict())
    name, weight = next((k, v) for k, v in state.items() if k.startswith('decode_head.conv_seg.w'))
    state[name] = torch.zeros(19, *weight.shape[1:])  # trained with another number of classes
    state.pop(next(k for k in state if k.startswith('backbone.')))
    state['head.fc.weight'] = torch.zeros(2, 2)
    path = tmp_path / 'other.pth'
    torch.save({'state_dict': state}, path)
    with pytest.raises(CheckpointError) as info:
        init_model(config, path)
    message = str(info.value)
    assert '1 missing: backbone.' in message and '1 unexpected: head.fc.weight' in message
    assert f'1 shape mismatch: {name} (19,' in message and 'Pass the config' in message


def _scene(h: int = 50, w: int = 70) -> np.ndarray:
    """An odd-sized BGR image with some structure (the model is untrained: any input will do)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    cv2.circle(img, (w // 2, h // 2), h // 3, (30, 200, 90), -1)
    return img


def test_grayscale_and_rgba_files_are_converted_not_rejected(model, tmp_path):
    bgr = _scene()
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    bgra = np.concatenate([bgr, np.full(bgr.shape[:2] + (1,), 128, np.uint8)], axis=2)
    for name, img in (('gray.png', gray), ('rgba.png', bgra), ('bgr.png', bgr)):
        cv2.imwrite(str(tmp_path / name), img)

    assert read_image(tmp_path / 'gray.png').shape == (50, 70, 3)
    np.testing.assert_array_equal(read_image(tmp_path / 'rgba.png'), bgr)  # alpha dropped
    results = inference_model(model, [tmp_path / 'gray.png', tmp_path / 'rgba.png', bgr])
    assert isinstance(results, list) and len(results) == 3
    for result in results:
        assert result.pred_sem_seg.data.shape == (1, 50, 70)
        assert result.seg_logits.data.shape == (9, 50, 70)
    # RGBA = its colour channels; a grayscale file = the same gray on 3 channels
    torch.testing.assert_close(results[1].seg_logits.data, results[2].seg_logits.data)
    gray3 = inference_model(model, np.repeat(gray[..., None], 3, axis=2))
    # (batch of 3 vs batch of 1: float summation order may differ slightly)
    torch.testing.assert_close(
        results[0].seg_logits.data, gray3.seg_logits.data, rtol=1e-4, atol=1e-4
    )
    assert results[0].img_path == str(tmp_path / 'gray.png')


def test_image_smaller_than_one_window(model):
    """12x9 px is below one 7/8-token window even at stride 4: padded inside, cropped back."""
    result = inference_model(model, _scene(12, 9))
    assert result.pred_sem_seg.data.shape == (1, 12, 9)
    assert torch.isfinite(result.seg_logits.data).all()


@pytest.mark.parametrize('layout', ['HW', 'HW1', 'HW4', 'uint16', 'float01'])
def test_arrays_of_any_layout_become_bgr(layout):
    bgr = _scene(20, 30)
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    img = {
        'HW': gray,
        'HW1': gray[..., None],
        'HW4': np.concatenate([bgr, np.zeros((20, 30, 1), np.uint8)], axis=2),
        'uint16': bgr.astype(np.uint16) * 257,
        'float01': bgr.astype(np.float32) / 255,
    }[layout]
    out = read_image(img)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    if layout in ('HW4', 'uint16', 'float01'):
        np.testing.assert_array_equal(out, bgr)


def test_sixteen_bit_png_is_read_as_eight_bit(tmp_path):
    img = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16)
    cv2.imwrite(str(tmp_path / 'deep.png'), img)
    out = read_image(tmp_path / 'deep.png')
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8 and out.max() > 200


def test_unreadable_images_raise_errors_naming_file_and_problem(model, tmp_path):
    with pytest.raises(FileNotFoundError, match=r'image not found: .*missing\.jpg'):
        inference_model(model, tmp_path / 'missing.jpg')
    with pytest.raises(ImageReadError, match='directory'):
        read_image(tmp_path)
    (tmp_path / 'empty.png').write_bytes(b'')
    with pytest.raises(ImageReadError, match=r'empty\.png: the file is empty'):
        read_image(tmp_path / 'empty.png')
    (tmp_path / 'notes.png').write_text('not an image')
    with pytest.raises(ImageReadError, match=r'notes\.png: OpenCV could not decode'):
        read_image(tmp_path / 'notes.png')
    ok, png = cv2.imencode('.png', _scene())
    (tmp_path / 'cut.png').write_bytes(png.tobytes()[:60])
    with pytest.raises(ImageReadError, match=r'cut\.png'):
        read_image(tmp_path / 'cut.png')
    with pytest.raises(ImageReadError, match=r'shape \(5, 5, 2\)'):
        read_image(np.zeros((5, 5, 2), np.uint8))
