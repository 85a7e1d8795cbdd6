"""demo/image_demo.py with a panoptic model: panoptic overlay and id map besides the class maps."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import REPO_ROOT as REPO

PANOPTIC = REPO / 'configs/pem/pem_swin-nano_1xb8-2k_shapes-panoptic-128x128.py'


@pytest.fixture(scope='module')
def config() -> Path:
    return PANOPTIC


@pytest.fixture(scope='module')
def demo():
    spec = importlib.util.spec_from_file_location('image_demo', REPO / 'demo/image_demo.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_panoptic_overlay_colours_instances_and_draws_borders(demo):
    palette = np.array([[200, 0, 0], [0, 200, 0]])  # RGB: class 0 red (thing), 1 green (stuff)
    panoptic = np.full((4, 6), 1)  # stuff everywhere
    panoptic[:2, :2] = 0 + 1 * 1000  # car #1
    panoptic[2:, :2] = 0 + 2 * 1000  # car #2, touching #1
    panoptic[:, 5] = 2  # void (= number of classes)
    img = np.zeros((4, 6, 3), np.uint8)
    colours = demo.panoptic_colors(panoptic, palette, 2)
    assert (colours[:, 5] == 0).all()  # void stays black
    assert tuple(colours[0, 3]) == (0, 200, 0)  # stuff: the class colour, BGR
    first, second = colours[0, 0], colours[3, 0]
    assert first[2] > 0 and second[2] > 0 and first[2] != second[2]  # two shades of red
    assert first[0] == first[1] == 0
    out = demo.panoptic_overlay(img, panoptic, palette, 2, opacity=1.0)
    assert (out[1, 0] == 255).all()  # border between the two cars
    assert (out[0, 3] == (0, 200, 0)).all()  # inside the stuff segment: the colour


def test_ids_png_round_trips_the_segment_ids(demo, tmp_path):
    ids = np.array([[0, 5, 1000 + 3], [70000 + 4, 255 * 256 + 7, 2]])
    cv2.imwrite(str(tmp_path / 'ids.png'), demo.ids_to_rgb(ids))
    rgb = cv2.imread(str(tmp_path / 'ids.png'))[..., ::-1].astype(np.int64)
    assert (rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2] == ids).all()


def test_panoptic_model_writes_four_files(config, checkpoint, tmp_path):
    image = tmp_path / 'street.png'
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8))
    out = tmp_path / 'out'
    proc = subprocess.run(
        [sys.executable, 'demo/image_demo.py', str(image), str(config), str(checkpoint),
         '--out-dir', str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        'street_label.png',
        'street_overlay.png',
        'street_panoptic.png',
        'street_panoptic_ids.png',
    ]
    assert 'instances)' in proc.stdout
    ids = cv2.imread(str(out / 'street_panoptic_ids.png'))[..., ::-1].astype(np.int64)
    ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
    assert ids.shape == (50, 70)
    labels = ids % 1000
    assert (labels <= 9).all()  # 9 classes; 9 = void
    label_map = cv2.imread(str(out / 'street_label.png'), cv2.IMREAD_UNCHANGED)
    assert label_map.shape == (50, 70) and label_map.max() < 9
