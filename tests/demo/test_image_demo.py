"""demo/image_demo.py: overlays and label maps for a file or a folder of images."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import QUICKSTART, TINY_CONFIG
from tests.conftest import REPO_ROOT as REPO


# Configs under test: a tiny ResNet + FCN (tests/data), and the quickstart config.
@pytest.fixture(scope='module', params=['tiny', 'quickstart'])
def config(request) -> Path:
    """A config file path: the tiny fixture or the quickstart config."""
    return QUICKSTART if request.param == 'quickstart' else TINY_CONFIG


@pytest.fixture(scope='module')
def images(tmp_path_factory) -> Path:
    """A folder with a BGR PNG, a grayscale JPEG and an RGBA PNG, of different odd sizes."""
    folder = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 255, (45, 61, 3), dtype=np.uint8)
    cv2.imwrite(str(folder / 'street.png'), bgr)
    cv2.imwrite(str(folder / 'gray.jpg'), rng.integers(0, 255, (40, 40), dtype=np.uint8))
    rgba = rng.integers(0, 255, (33, 70, 4), dtype=np.uint8)
    cv2.imwrite(str(folder / 'alpha.png'), rgba)
    (folder / 'notes.txt').write_text('not an image, not listed')
    (folder / 'zz_broken.png').write_bytes(b'not a png')  # reported and skipped
    return folder


def run_demo(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / 'demo/image_demo.py'), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def test_folder_writes_overlay_and_label_per_image(config, checkpoint, images, tmp_path):
    from effvision.apis import inference_model, init_model, read_image

    out = tmp_path / 'outputs'
    proc = run_demo(images, config, checkpoint, '--out-dir', out, '--opacity', '0.4')
    # 1: one image could not be read; the others are still written.
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'zz_broken.png: skipped' in proc.stdout and 'could not decode' in proc.stdout
    stems = ['alpha', 'gray', 'street']
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f'{s}_{kind}.png' for s in stems for kind in ('overlay', 'label')
    )
    lines = [line for line in proc.stdout.splitlines() if '_overlay.png' in line]
    assert len(lines) == 3

    model = init_model(config, checkpoint)
    palette = np.asarray(model.dataset_meta['palette'], np.float32)[:, ::-1]  # RGB -> BGR
    sources = sorted(p for p in images.iterdir() if p.suffix != '.txt' and p.stem != 'zz_broken')
    for stem, src in zip(stems, sources):
        img = read_image(src)
        label = cv2.imread(str(out / f'{stem}_label.png'), cv2.IMREAD_UNCHANGED)
        expected = inference_model(model, img).pred_sem_seg.data[0].numpy()
        assert label.dtype == np.uint8 and label.shape == img.shape[:2]
        np.testing.assert_array_equal(label, expected)
        overlay = cv2.imread(str(out / f'{stem}_overlay.png'))
        blend = img * 0.6 + palette[label] * 0.4
        assert np.abs(overlay.astype(np.float32) - blend).max() <= 1.0


def test_single_file(config, checkpoint, images, tmp_path):
    out = tmp_path / 'single'
    proc = run_demo(images / 'gray.jpg', config, checkpoint, '--out-dir', out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ['gray_label.png', 'gray_overlay.png']
    assert len(proc.stdout.strip().splitlines()) == 1


def test_missing_input_is_one_line_error(tmp_path):
    # Checked before anything is loaded: the config and checkpoint need not exist.
    proc = run_demo(tmp_path / 'nothing.jpg', tmp_path / 'cfg.py', tmp_path / 'model.pth')
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert 'nothing.jpg' in line and 'not found' in line
