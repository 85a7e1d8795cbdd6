"""tools/dataset_converters/cityscapes_panoptic.py on a tiny stand-in of Cityscapes' gtFine."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from effvision.datasets.transforms import rgb2id
from tests.conftest import REPO_ROOT

TOOL = REPO_ROOT / 'tools' / 'dataset_converters' / 'cityscapes_panoptic.py'
THINGS = ['person', 'rider', 'car', 'truck', 'bus', 'train', 'motorcycle', 'bicycle']
STUFF = ['road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light',
         'traffic sign', 'vegetation', 'terrain', 'sky']  # fmt: skip


def load_tool():
    spec = importlib.util.spec_from_file_location('cityscapes_panoptic_tool', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def instance_ids(variant: int) -> np.ndarray:
    """An 8x12 instanceIds map (uint16, as Cityscapes'): road below, sky above, two people,
    a rider, a car group (crowd, id 26), a caravan (ignored in evaluation), ego vehicle and
    unlabelled pixels."""
    ids = np.full((8, 12), 23, np.uint16)  # sky
    ids[4:] = 7  # road
    ids[2:6, 0:2] = 24000 + variant  # person
    ids[2:6, 3:5] = 24001  # person
    ids[3:6, 6:8] = 25000  # rider
    ids[5:7, 8:12] = 26  # car group
    ids[0:2, 8:12] = 29000  # caravan -> VOID
    ids[7, :] = 1  # ego vehicle -> VOID
    ids[0, 0] = 0  # unlabelled -> VOID
    return ids


@pytest.fixture
def cityscapes(tmp_path) -> Path:
    root = tmp_path / 'cityscapes'
    for split, cities in (('train', ('aachen', 'bochum')), ('val', ('frankfurt',))):
        for i, city in enumerate(cities):
            folder = root / 'gtFine' / split / city
            folder.mkdir(parents=True)
            name = f'{city}_000000_{i:06d}'
            Image.fromarray(instance_ids(i)).save(folder / f'{name}_gtFine_instanceIds.png')
            # labelIds and colour maps sit beside them in the real layout; never read
            Image.fromarray(np.zeros((8, 12), np.uint8)).save(
                folder / f'{name}_gtFine_labelIds.png'
            )
    return root


def test_converts_with_cityscapesscripts_ids(cityscapes):
    tool = load_tool()
    tool.main([str(cityscapes), '--nproc', '1'])
    gt_fine = cityscapes / 'gtFine'
    content = json.loads((gt_fine / 'cityscapes_panoptic_train.json').read_text())

    # Categories: the 19 evaluated classes with their label ids, things first.
    cats = content['categories']
    assert [c['name'] for c in cats] == THINGS + STUFF
    assert [c['id'] for c in cats] == [24, 25, 26, 27, 28, 31, 32, 33,
                                       7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23]  # fmt: skip
    assert [c['isthing'] for c in cats] == [1] * 8 + [0] * 11
    assert cats[0]['color'] == [220, 20, 60]

    assert [image['id'] for image in content['images']] == [
        'aachen_000000_000000',
        'bochum_000000_000001',
    ]
    image = content['images'][0]
    assert image == {
        'id': 'aachen_000000_000000',
        'file_name': 'aachen/aachen_000000_000000_leftImg8bit.png',
        'height': 8,
        'width': 12,
    }
    ann = content['annotations'][0]
    assert ann['image_id'] == image['id'] and ann['file_name'] == image['file_name']
    segments = {s['id']: s for s in ann['segments_info']}
    assert sorted(segments) == [7, 23, 26, 24000, 24001, 25000]
    assert segments[24000] == {
        'id': 24000, 'category_id': 24, 'area': 8, 'bbox': [0, 2, 2, 4], 'iscrowd': 0
    }  # fmt: skip
    assert segments[26] == {
        'id': 26, 'category_id': 26, 'area': 8, 'bbox': [8, 5, 4, 2], 'iscrowd': 1
    }  # fmt: skip
    assert segments[7]['category_id'] == 7 and segments[7]['iscrowd'] == 0
    assert segments[23]['area'] == 48 - 4 - 4 - 2 - 8 - 1  # rows 0-3 minus what covers them

    png = np.asarray(Image.open(gt_fine / 'cityscapes_panoptic_train' / image['file_name']))
    ids = instance_ids(0).astype(np.int64)
    expected = np.where(np.isin(ids, [0, 1, 29000]), 0, ids)
    np.testing.assert_array_equal(rgb2id(png), expected)
    for seg in segments.values():
        assert (rgb2id(png) == seg['id']).sum() == seg['area']

    val = json.loads((gt_fine / 'cityscapes_panoptic_val.json').read_text())
    assert [image['id'] for image in val['images']] == ['frankfurt_000000_000000']
    assert not list(gt_fine.glob('.*tmp*'))


def test_train_ids(cityscapes):
    load_tool().main([str(cityscapes), '--splits', 'val', '--use-train-id', '--nproc', '1'])
    content = json.loads(
        (cityscapes / 'gtFine' / 'cityscapes_panoptic_val_trainId.json').read_text()
    )
    assert [c['id'] for c in content['categories']] == [*range(11, 19), *range(11)]
    segments = {s['id']: s['category_id'] for s in content['annotations'][0]['segments_info']}
    # Segment ids stay the instanceIds values; only the category ids change.
    assert segments == {7: 0, 23: 10, 26: 13, 24000: 11, 24001: 11, 25000: 12}


def test_command_line_with_workers(cityscapes, tmp_path):
    out = tmp_path / 'out'
    proc = subprocess.run(
        [sys.executable, str(TOOL), str(cityscapes), '-o', str(out), '--nproc', '2'],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert 'train: 2 images' in proc.stdout
    content = json.loads((out / 'cityscapes_panoptic_train.json').read_text())
    assert len(content['annotations']) == 2
    assert (out / 'cityscapes_panoptic_train' / 'bochum').is_dir()


def test_wrong_layout(tmp_path, cityscapes):
    tool = load_tool()
    with pytest.raises(SystemExit, match=r'expected the Cityscapes layout .*gtFine/train/<city>'):
        tool.main([str(tmp_path / 'nothing_here')])
    with pytest.raises(SystemExit, match='pass its parent'):
        tool.main([str(cityscapes / 'gtFine')])
    empty = tmp_path / 'empty'
    (empty / 'gtFine' / 'train' / 'aachen').mkdir(parents=True)
    with pytest.raises(SystemExit, match='no file matches'):
        tool.main([str(empty)])


def test_not_an_instance_map(cityscapes):
    path = next((cityscapes / 'gtFine' / 'val').rglob('*_instanceIds.png'))
    Image.fromarray(np.full((8, 12), 40, np.uint16)).save(path)
    with pytest.raises(SystemExit, match='no Cityscapes label id'):
        load_tool().main([str(cityscapes), '--splits', 'val', '--nproc', '1'])
    assert not list((cityscapes / 'gtFine').glob('*panoptic*'))
    assert not list((cityscapes / 'gtFine').glob('.*'))


def test_existing_output_and_atomic_replace(cityscapes, monkeypatch):
    tool = load_tool()
    tool.main([str(cityscapes), '--splits', 'val', '--nproc', '1'])
    json_path = cityscapes / 'gtFine' / 'cityscapes_panoptic_val.json'
    before = json_path.read_text()
    with pytest.raises(SystemExit, match='--force'):
        tool.main([str(cityscapes), '--splits', 'val', '--nproc', '1'])

    # A run that fails half-way through leaves the previous output as it was, and no temporaries.
    real = tool.convert_file
    calls = []

    def failing(path, out_dir, use_train_id=False):
        calls.append(path)
        if len(calls) == 1:
            real(path, out_dir, use_train_id)
            raise RuntimeError('disk full')
        return real(path, out_dir, use_train_id)

    monkeypatch.setattr(tool, 'convert_file', failing)
    with pytest.raises(RuntimeError, match='disk full'):
        tool.main([str(cityscapes), '--splits', 'val', '--nproc', '1', '--force'])
    assert json_path.read_text() == before
    assert sorted(p.name for p in (cityscapes / 'gtFine').iterdir()) == [
        'cityscapes_panoptic_val',
        'cityscapes_panoptic_val.json',
        'train',
        'val',
    ]
    monkeypatch.setattr(tool, 'convert_file', real)
    tool.main([str(cityscapes), '--splits', 'val', '--nproc', '1', '--force'])
    assert json_path.read_text() == before
