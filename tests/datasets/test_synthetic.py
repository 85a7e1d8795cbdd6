"""Tests of the synthetic shapes generator and its command-line wrapper."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from effvision.datasets import synthetic
from effvision.datasets.synthetic import (
    CLASSES,
    PALETTE,
    STUFF_IDS,
    THING_IDS,
    generate_shapes,
    make_scene,
    render_scene,
)

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / 'tools' / 'dataset_converters' / 'make_shapes.py'
# Non-square, so that a swapped H and W shows up.
SMALL = dict(num_train=5, num_val=3, size=(64, 80), seed=3)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('shapes') / 'data'
    generate_shapes(root, **SMALL)
    return root


@pytest.fixture(scope='module')
def target_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('shapes_target') / 'data'
    generate_shapes(root, **SMALL, domain='target')
    return root


def _files(root: Path, under: str = '') -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted((root / under).rglob('*'))
        if p.is_file()
    }


def _read(path: Path) -> np.ndarray:
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert array is not None, path
    return array if array.ndim == 2 else cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def _split_files(root: Path, split: str) -> list[str]:
    return sorted(p.name for p in (root / 'images' / split).iterdir())


def test_layout(dataset):
    for split, count in (('training', 5), ('validation', 3)):
        names = _split_files(dataset, split)
        assert len(names) == count
        for sub in (split, f'panoptic_{split}'):
            assert sorted(p.name for p in (dataset / 'annotations' / sub).iterdir()) == names
        for kind in ('instances', 'panoptic'):
            assert (dataset / 'annotations' / f'{kind}_{split}.json').is_file()
    meta = json.loads((dataset / 'meta.json').read_text())
    assert meta['classes'] == list(CLASSES)
    assert meta['palette'] == [list(c) for c in PALETTE]
    assert meta['thing_ids'] == list(THING_IDS) and meta['stuff_ids'] == list(STUFF_IDS)
    assert meta['arguments']['size'] == [64, 80]
    assert meta['arguments']['min_instance_area'] == 10
    assert meta['counts']['training']['images'] == 5
    assert meta['domain'] == meta['arguments']['domain'] == 'source'
    assert 8 <= len(CLASSES) <= 10 and len(PALETTE) == len(CLASSES)


def test_deterministic(dataset, tmp_path):
    again = tmp_path / 'again'
    generate_shapes(again, **SMALL)
    assert _files(again) == _files(dataset)


def test_image_independent_of_count(dataset, tmp_path):
    fewer = tmp_path / 'fewer'
    generate_shapes(fewer, **{**SMALL, 'num_train': 2, 'num_val': 0})
    for name in _split_files(fewer, 'training'):
        for sub in ('images/training', 'annotations/training', 'annotations/panoptic_training'):
            assert (fewer / sub / name).read_bytes() == (dataset / sub / name).read_bytes()
    # The in-memory renderer is the same scene the files hold.
    scene = make_scene('training', 1, size=(64, 80), seed=3)
    name = _split_files(dataset, 'training')[1]
    np.testing.assert_array_equal(scene.image, _read(dataset / 'images/training' / name))
    np.testing.assert_array_equal(scene.semantic, _read(dataset / 'annotations/training' / name))
    other_seed = make_scene('training', 1, size=(64, 80), seed=4)
    assert not np.array_equal(other_seed.image, scene.image)


def test_source_output_unchanged():
    # The source look is pinned: these digests were taken before the target domain existed
    # (numpy 2.4, OpenCV 5.0). Another numpy or OpenCV may legitimately change them; a code
    # change must not.
    scene = make_scene('training', 0, size=(64, 80), seed=3)
    digests = [hashlib.sha256(a.tobytes()).hexdigest()[:16] for a in (scene.image, scene.semantic)]
    assert digests == ['c28c35f5fb7b0333', 'fd05ab6fd9bf0164'], (
        f'{np.__version__=} {cv2.__version__=}'
    )


def test_target_domain_shares_labels(dataset, target_dataset):
    # Only the images differ: every label file (semantic, panoptic PNGs, COCO JSON) is identical.
    assert _files(target_dataset, 'annotations') == _files(dataset, 'annotations')
    for split in ('training', 'validation'):
        for name in _split_files(dataset, split):
            source = _read(dataset / 'images' / split / name).astype(np.float32)
            target = _read(target_dataset / 'images' / split / name).astype(np.float32)
            assert source.shape == target.shape
            assert np.abs(source - target).mean() > 15  # a visibly different look
    meta = json.loads((target_dataset / 'meta.json').read_text())
    assert meta['domain'] == meta['arguments']['domain'] == 'target'
    source_meta = json.loads((dataset / 'meta.json').read_text())
    for key in ('domain', 'arguments'):
        meta.pop(key), source_meta.pop(key)
    assert meta == source_meta


def test_target_domain_deterministic(target_dataset, tmp_path):
    again = tmp_path / 'again'
    generate_shapes(again, **{**SMALL, 'num_train': 2, 'num_val': 0}, domain='target')
    for name in _split_files(again, 'training'):
        path = Path('images/training') / name
        assert (again / path).read_bytes() == (target_dataset / path).read_bytes()
    scene = make_scene('training', 1, size=(64, 80), seed=3, domain='target')
    name = _split_files(target_dataset, 'training')[1]
    np.testing.assert_array_equal(scene.image, _read(target_dataset / 'images/training' / name))


@pytest.mark.parametrize('seed', range(4))
def test_render_scene_domains_same_geometry(seed):
    # The target look draws from its own generator: the scene's generator ends in the same state.
    scenes, after = {}, {}
    for domain in ('source', 'target'):
        rng = np.random.default_rng(seed)
        scenes[domain] = render_scene(rng, (48, 64), things_per_image=(4, 7), domain=domain)
        after[domain] = rng.random()
    source, target = scenes['source'], scenes['target']
    assert after['source'] == after['target']
    np.testing.assert_array_equal(source.semantic, target.semantic)
    assert [i.class_id for i in source.instances] == [i.class_id for i in target.instances]
    for a, b in zip(source.instances, target.instances, strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
    assert target.image.dtype == np.uint8 and target.image.shape == (48, 64, 3)
    assert not np.array_equal(source.image, target.image)


def test_target_look_shifts_colours():
    # Stuff classes are restyled (overcast sky, olive grass, worn asphalt, plain facades) and the
    # whole image is flatter and muted: per-class mean colours move and saturation drops.
    shift, saturation = {c: [] for c in STUFF_IDS}, {'source': [], 'target': []}
    for index in range(6):
        scenes = {d: make_scene('validation', index, size=(64, 64), domain=d) for d in saturation}
        for domain, scene in scenes.items():
            hsv = cv2.cvtColor(scene.image, cv2.COLOR_RGB2HSV)
            saturation[domain].append(hsv[..., 1].mean())
        semantic = scenes['source'].semantic
        for class_id in STUFF_IDS:
            region = semantic == class_id
            if region.sum() > 20:
                means = [scenes[d].image[region].mean(0) for d in saturation]
                shift[class_id].append(np.linalg.norm(means[0] - means[1]))
    assert np.mean(saturation['target']) < 0.7 * np.mean(saturation['source'])
    for class_id, distances in shift.items():
        assert np.mean(distances) > 20, CLASSES[class_id]


def test_semantic_maps(dataset):
    seen = set()
    for split in ('training', 'validation'):
        for name in _split_files(dataset, split):
            image = _read(dataset / 'images' / split / name)
            labels = _read(dataset / 'annotations' / split / name)
            assert image.shape == (64, 80, 3) and image.dtype == np.uint8
            assert labels.shape == (64, 80) and labels.dtype == np.uint8
            # Every pixel is a real class: no ignore (255) and nothing out of range.
            assert labels.max() < len(CLASSES)
            seen.update(np.unique(labels).tolist())
    assert set(STUFF_IDS) <= seen and seen & set(THING_IDS)


@pytest.mark.parametrize('split', ['training', 'validation'])
def test_coco_instances_match_semantic(dataset, split):
    coco = COCO(str(dataset / 'annotations' / f'instances_{split}.json'))
    assert sorted(coco.getCatIds()) == [i + 1 for i in THING_IDS]
    assert len(coco.getImgIds()) == len(_split_files(dataset, split))
    for img_id in coco.getImgIds():
        info = coco.loadImgs(img_id)[0]
        labels = _read(dataset / 'annotations' / split / info['file_name'])
        union = np.zeros(labels.shape, np.int32)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
            mask = coco.annToMask(ann).astype(bool)
            assert ann['iscrowd'] == 0 and ann['area'] == mask.sum() > 0
            # The instance's visible pixels carry its class in the semantic map.
            assert (labels[mask] == ann['category_id'] - 1).all()
            ys, xs = np.nonzero(mask)
            assert ann['bbox'] == [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1]
            union += mask
        # Visible masks do not overlap, and every thing pixel belongs to an instance.
        assert union.max() <= 1
        np.testing.assert_array_equal(union.astype(bool), np.isin(labels, THING_IDS))


@pytest.mark.parametrize('split', ['training', 'validation'])
def test_panoptic_matches_segments(dataset, split):
    content = json.loads((dataset / 'annotations' / f'panoptic_{split}.json').read_text())
    categories = {c['id']: c for c in content['categories']}
    assert sorted(categories) == [i + 1 for i in range(len(CLASSES))]
    assert {c['id'] for c in categories.values() if c['isthing']} == {i + 1 for i in THING_IDS}
    names = {img['id']: img['file_name'] for img in content['images']}
    assert len(content['annotations']) == len(names)
    for ann in content['annotations']:
        rgb = _read(dataset / 'annotations' / f'panoptic_{split}' / ann['file_name'])
        rgb = rgb.astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
        labels = _read(dataset / 'annotations' / split / names[ann['image_id']])
        segments = {s['id']: s for s in ann['segments_info']}
        # Segments cover the image: no VOID (0) pixel, no pixel without a segment.
        assert set(np.unique(ids).tolist()) == set(segments)
        assert 0 not in segments
        stuff = [s['category_id'] for s in segments.values() if s['category_id'] - 1 in STUFF_IDS]
        assert len(stuff) == len(set(stuff))  # one segment per stuff class
        for seg_id, seg in segments.items():
            mask = ids == seg_id
            assert seg['area'] == mask.sum()
            assert (labels[mask] == seg['category_id'] - 1).all()


def test_render_scene_instances():
    scene = make_scene('validation', 0, size=(96, 128), things_per_image=(6, 6))
    assert scene.image.shape == (96, 128, 3)
    assert 1 <= len(scene.instances) <= 6
    for inst in scene.instances:
        assert inst.class_id in THING_IDS and inst.mask.sum() >= 25  # 0.2% of the image
        assert (scene.semantic[inst.mask] == inst.class_id).all()


def test_refuses_to_overwrite(dataset, tmp_path):
    with pytest.raises(FileExistsError, match='force'):
        generate_shapes(dataset, **SMALL)
    out = tmp_path / 'out'
    out.mkdir()  # an existing empty folder is fine
    generate_shapes(out, num_train=1, num_val=1, size=(32, 32))
    (out / 'stale.txt').write_text('from an earlier run')
    generate_shapes(out, num_train=2, num_val=0, size=(32, 32), force=True)
    assert not (out / 'stale.txt').exists()
    assert len(_split_files(out, 'training')) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']  # no tmp or old copies left


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    write_split = synthetic._write_split

    def fail_on_validation(root, split, *args):
        if split == 'validation':
            raise KeyboardInterrupt
        return write_split(root, split, *args)

    monkeypatch.setattr(synthetic, '_write_split', fail_on_validation)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(tmp_path / 'out', num_train=2, num_val=1, size=(32, 32))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    'kwargs',
    [
        dict(size=(16, 64)),
        dict(num_train=-1),
        dict(things_per_image=(3, 2)),
        dict(domain='real'),
    ],
)
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_shapes(tmp_path / 'out', **kwargs)
    assert not (tmp_path / 'out').exists()


def test_bad_domain_names_choices():
    with pytest.raises(ValueError, match="'source', 'target'"):
        make_scene('training', 0, domain='Target')


def test_cli(tmp_path):
    out = tmp_path / 'shapes'
    args = ['--out', str(out), '--num-train', '3', '--num-val', '2', '--size', '48', '64']
    result = subprocess.run(
        [sys.executable, str(CLI), *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert 'training: 3 images' in result.stdout and 'validation: 2 images' in result.stdout
    assert 'traffic sign' in result.stdout
    assert _read(out / 'annotations/training/train_000000.png').shape == (48, 64)

    # The refusal, in-process (a second interpreter start costs seconds).
    spec = importlib.util.spec_from_file_location('make_shapes', CLI)
    make_shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_shapes)
    with pytest.raises(SystemExit, match='--force'):
        make_shapes.main(args)
    make_shapes.main([*args, '--force'])

    target = tmp_path / 'target'
    make_shapes.main([*args[2:], '--out', str(target), '--domain', 'target'])
    assert json.loads((target / 'meta.json').read_text())['domain'] == 'target'
    for path in ('annotations/training/train_000000.png', 'annotations/instances_training.json'):
        assert (target / path).read_bytes() == (out / path).read_bytes()
    image = 'images/training/train_000000.png'
    assert (target / image).read_bytes() != (out / image).read_bytes()
    with pytest.raises(SystemExit):
        make_shapes.parse_args(['--domain', 'real'])
