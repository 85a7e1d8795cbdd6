"""UDADataset: pairing, collation, rare class sampling and its errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.dataset import pseudo_collate
from mmengine.registry import init_default_scope
from mmseg.structures import SegDataSample
from PIL import Image

from effvision.datasets import GTA5Dataset, ShapesDataset, UDADataset
from effvision.datasets.class_stats import collect_class_stats, write_class_stats
from effvision.datasets.uda import RCS_MAX_RECROPS, rcs_class_probabilities

PIPELINE = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
CROP_PIPELINE = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomCrop', crop_size=(24, 24)),
    dict(type='PackSegInputs'),
]
RARE = 1  # sidewalk: the rare class of the small source set


@pytest.fixture(autouse=True)
def _effvision_scope():
    init_default_scope('effvision')


def _write(root: Path, name: str, train_ids: np.ndarray, shade: int) -> None:
    (root / 'images').mkdir(parents=True, exist_ok=True)
    (root / 'labels').mkdir(parents=True, exist_ok=True)
    image = np.full((*train_ids.shape, 3), shade, np.uint8)
    Image.fromarray(image).save(root / 'images' / f'{name}.png')
    Image.fromarray(train_ids.astype(np.uint8)).save(root / 'labels' / f'{name}_labelTrainIds.png')


@pytest.fixture(scope='module')
def source_root(tmp_path_factory) -> Path:
    """Three 32x32 GTA5-layout images (train ids already written), with their statistics.

    ``a``: a 12x12 block of the rare class in the top-left corner, road elsewhere; ``b``: road
    only; ``c``: a 4x4 block of the rare class (too few pixels for min_pixels=50).
    """
    root = tmp_path_factory.mktemp('gta')
    a = np.zeros((32, 32), np.uint8)
    a[:12, :12] = RARE
    c = np.zeros((32, 32), np.uint8)
    c[20:24, 20:24] = RARE
    for shade, (name, ids) in enumerate([('a', a), ('b', np.zeros((32, 32))), ('c', c)]):
        _write(root, name, ids, 10 * shade)
    write_class_stats(collect_class_stats(root / 'labels', '_labelTrainIds.png'), root)
    return root


@pytest.fixture(scope='module')
def target_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('target')
    for i in range(2):
        _write(root, f't{i}', np.full((32, 32), 255), 200 + i)
    return root


def source_cfg(root: Path, pipeline=PIPELINE) -> dict:
    prefix = dict(img_path='images', seg_map_path='labels')
    # serialize_data=False: serialising runs gc.collect(), a quarter second per dataset here.
    return dict(
        type='GTA5Dataset',
        data_root=str(root),
        data_prefix=prefix,
        pipeline=pipeline,
        serialize_data=False,
    )


def uda(source_root, target_root, pipeline=PIPELINE, **kwargs) -> UDADataset:
    return UDADataset(source_cfg(source_root, pipeline), source_cfg(target_root), **kwargs)


def name(sample: SegDataSample) -> str:
    return Path(sample.img_path).stem


def test_item_structure_and_collation(source_root, target_root):
    dataset = uda(source_root, target_root)
    assert isinstance(dataset.source, GTA5Dataset) and isinstance(dataset.target, GTA5Dataset)
    assert dataset.metainfo == dataset.target.metainfo
    item = dataset[0]
    assert set(item) == {'inputs', 'data_samples', 'target_inputs', 'target_data_samples'}
    assert item['inputs'].shape == item['target_inputs'].shape == (3, 32, 32)
    assert isinstance(item['data_samples'], SegDataSample)
    assert isinstance(item['target_data_samples'], SegDataSample)
    batch = pseudo_collate([dataset[0], dataset[5]])
    assert set(batch) == set(item)
    assert all(isinstance(v, list) and len(v) == 2 for v in batch.values())
    assert torch.equal(batch['inputs'][0], item['inputs'])
    assert [name(s) for s in batch['target_data_samples']] == ['t0', 't1']


def test_pairs_without_rcs(source_root, target_root):
    dataset = uda(source_root, target_root)
    assert len(dataset) == 3 * 2
    pairs = [
        (name(i['data_samples']), name(i['target_data_samples'])) for i in dataset_items(dataset)
    ]
    assert pairs == [(s, t) for s in 'abc' for t in ('t0', 't1')]
    with pytest.raises(IndexError, match='out of range'):
        dataset[6]


def dataset_items(dataset):
    return [dataset[i] for i in range(len(dataset))]


def test_lazy_init(source_root, target_root):
    dataset = uda(source_root, target_root, lazy_init=True, rare_class_sampling=dict(min_pixels=50))
    assert dataset.rcs_classes == []
    assert name(dataset[0]['data_samples']) == 'a'
    assert dataset.rcs_classes == [RARE, 0]


def test_rcs_probabilities_are_the_softmax(tmp_path):
    stats = [{'0': 400, '1': 100, 'file': 'x.png'}, {'0': 200, '2': 300, 'file': 'y.png'}]
    classes, probs = rcs_class_probabilities(stats, class_temp=0.1)
    # Totals 0: 600, 1: 100, 2: 300 of 1000, ordered by count: 1, 2, 0.
    assert classes == [1, 2, 0]
    logits = [(1 - 0.1) / 0.1, (1 - 0.3) / 0.1, (1 - 0.6) / 0.1]
    expected = [math.exp(x) / sum(math.exp(y) for y in logits) for x in logits]
    assert np.allclose(probs, expected, rtol=1e-12, atol=0)
    # Ties keep the order of first appearance, as the official (stable) sort does.
    assert rcs_class_probabilities([{'5': 1, '3': 1, 'file': 'z'}], 0.01)[0] == [5, 3]


def test_rcs_probabilities_from_the_stats_files(source_root, target_root):
    dataset = uda(source_root, target_root, rare_class_sampling=dict(min_pixels=50))
    rare, road = 144 + 16, 3 * 1024 - 160
    logits = np.array([1 - rare / 3072, 1 - road / 3072]) / 0.01
    assert dataset.rcs_classes == [RARE, 0]
    assert np.allclose(dataset.rcs_class_probs, np.exp(logits) / np.exp(logits).sum())


class CountingSource:
    """Wraps a dataset and records the rare-class pixels of every sample it returns."""

    def __init__(self, dataset):
        self.dataset, self.calls = dataset, []

    def __getitem__(self, index):
        sample = self.dataset[index]
        self.calls.append(int((sample['data_samples'].gt_sem_seg.data == RARE).sum()))
        return sample

    def __len__(self):
        return len(self.dataset)


def test_rcs_picks_images_with_the_class_and_recrops(source_root, target_root):
    rcs = dict(class_temp=0.01, min_pixels=50, min_crop_ratio=1.6)  # wants > 80 rare pixels
    dataset = uda(source_root, target_root, CROP_PIPELINE, rare_class_sampling=rcs)
    assert dataset.rcs_class_probs[1] < 1e-30  # road is all but never drawn
    spy = dataset.source = CountingSource(dataset.source)
    np.random.seed(0)
    retried = succeeded_after_retry = 0
    for _ in range(30):
        spy.calls.clear()
        item = dataset[0]
        # Only 'a' holds more than 50 rare pixels ('c' has 16).
        assert name(item['data_samples']) == 'a'
        assert item['inputs'].shape == (3, 24, 24)
        counts = spy.calls
        assert 1 <= len(counts) <= 1 + RCS_MAX_RECROPS
        assert all(n <= 80 for n in counts[:-1])  # re-cropped only after a failing crop
        assert counts[-1] > 80 or len(counts) == 1 + RCS_MAX_RECROPS
        assert counts[-1] == int((item['data_samples'].gt_sem_seg.data == RARE).sum())
        retried += len(counts) > 1
        succeeded_after_retry += len(counts) > 1 and counts[-1] > 80
    assert retried > 0 and succeeded_after_retry > 0


def test_rcs_without_crop_ratio_does_not_recrop(source_root, target_root):
    rcs = dict(min_pixels=50, min_crop_ratio=0)
    dataset = uda(source_root, target_root, CROP_PIPELINE, rare_class_sampling=rcs)
    spy = dataset.source = CountingSource(dataset.source)
    np.random.seed(0)
    for _ in range(5):
        dataset[0]
    assert len(spy.calls) == 5


def test_rcs_is_deterministic_under_np_random_seed(source_root, target_root):
    rcs = dict(min_pixels=50, class_temp=1.0)  # both classes drawn
    dataset = uda(source_root, target_root, CROP_PIPELINE, rare_class_sampling=rcs)

    def draw(seed):
        np.random.seed(seed)
        items = [dataset[0] for _ in range(30)]
        names = [(name(i['data_samples']), name(i['target_data_samples'])) for i in items]
        return names, torch.stack([i['data_samples'].gt_sem_seg.data for i in items])

    names, crops = draw(1)
    again_names, again_crops = draw(1)
    assert names == again_names and torch.equal(crops, again_crops)
    assert 'a' in {s for s, _ in names} and len({s for s, _ in names}) > 1  # rare and road
    assert {t for _, t in names} == {'t0', 't1'}
    assert draw(2)[0] != names or not torch.equal(draw(2)[1], crops)


def test_stats_dir(source_root, target_root, tmp_path):
    stats = tmp_path / 'stats'
    write_class_stats(collect_class_stats(source_root / 'labels', '_labelTrainIds.png'), stats)
    rcs = dict(min_pixels=50)
    dataset = uda(source_root, target_root, rare_class_sampling=rcs, stats_dir=stats)
    assert dataset.rcs_cfg == dict(class_temp=0.01, min_pixels=50, min_crop_ratio=0.5)
    assert dataset.rcs_classes == [RARE, 0]
    assert len(dataset) == 3  # with RCS the index is unused: one draw per source image


# Errors ---------------------------------------------------------------------------------------


def test_missing_stats_name_the_converter(source_root, target_root, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        uda(source_root, target_root, rare_class_sampling={}, stats_dir=tmp_path)
    message = str(info.value)
    assert 'sample_class_stats.json and samples_with_class.json' in message
    assert f'python tools/dataset_converters/gta.py {source_root}' in message


def test_missing_stats_of_another_dataset_name_the_stats_tool(shapes_root, tmp_path):
    prefix = dict(img_path='images/training', seg_map_path='annotations/training')
    shapes = ShapesDataset(data_root=str(shapes_root), data_prefix=prefix, serialize_data=False)
    with pytest.raises(FileNotFoundError) as info:
        UDADataset(shapes, shapes, rare_class_sampling={}, stats_dir=tmp_path)
    assert (
        f'python tools/dataset_converters/class_stats.py {shapes_root} '
        '--ann-dir annotations/training --suffix .png'
    ) in str(info.value)


def _stats(folder: Path, files: dict[str, dict[int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_class_stats([{**counts, 'file': f} for f, counts in files.items()], folder)
    return folder


def test_stats_of_other_files(source_root, target_root, tmp_path):
    stats = _stats(tmp_path, {'labels/zz_labelTrainIds.png': {0: 5000}})
    with pytest.raises(ValueError, match='not in the source dataset GTA5Dataset.*zz_label'):
        uda(source_root, target_root, rare_class_sampling={}, stats_dir=stats)


def test_stats_with_ids_beyond_the_classes(source_root, target_root, tmp_path):
    stats = _stats(tmp_path, {'a_labelTrainIds.png': {0: 5000, 40: 5000}})
    with pytest.raises(ValueError, match='class id 40, but the source has 19 classes'):
        uda(source_root, target_root, rare_class_sampling={}, stats_dir=stats)


def test_class_without_large_enough_image(source_root, target_root):
    with pytest.raises(ValueError) as info:
        uda(source_root, target_root, rare_class_sampling=dict(min_pixels=1000))
    message = str(info.value)
    assert 'class 1 (sidewalk)' in message and 'the most in one image is 144' in message
    assert 'Lower rare_class_sampling.min_pixels' in message


def test_stats_files_that_disagree(source_root, target_root, tmp_path):
    stats = _stats(tmp_path, {'a_labelTrainIds.png': {0: 5000}})
    (stats / 'samples_with_class.json').write_text(json.dumps({'3': []}))
    with pytest.raises(ValueError, match='do not belong together'):
        uda(source_root, target_root, rare_class_sampling={}, stats_dir=stats)


def test_different_classes_name_both_datasets(source_root, shapes_root):
    prefix = dict(img_path='images/training', seg_map_path='annotations/training')
    target = dict(
        type='ShapesDataset', data_root=str(shapes_root), data_prefix=prefix, serialize_data=False
    )
    with pytest.raises(ValueError) as info:
        UDADataset(source_cfg(source_root), target)
    message = str(info.value)
    assert 'different classes' in message and 'wrong domain' in message
    assert 'GTA5Dataset' in message and 'ShapesDataset' in message
    assert "'sidewalk'" in message and "'cone'" in message


def test_nested_uda_is_refused(source_root, target_root):
    inner = dict(type='UDADataset', source=source_cfg(source_root), target=source_cfg(target_root))
    with pytest.raises(TypeError, match='target of a UDADataset is itself a UDADataset'):
        UDADataset(source_cfg(source_root), inner)
    with pytest.raises(TypeError, match='source of a UDADataset is itself a UDADataset'):
        UDADataset(uda(source_root, target_root), source_cfg(target_root))


def test_unknown_rcs_keys(source_root, target_root):
    with pytest.raises(ValueError) as info:
        uda(source_root, target_root, rare_class_sampling=dict(class_temp=0.01, min_pixel=3000))
    message = str(info.value)
    assert "unknown keys ['min_pixel']" in message
    assert "['class_temp', 'min_crop_ratio', 'min_pixels']" in message


@pytest.mark.parametrize('key, value', [('class_temp', 0), ('min_pixels', -1)])
def test_bad_rcs_values(source_root, target_root, key, value):
    with pytest.raises(ValueError, match=f'rare_class_sampling.{key} must be'):
        uda(source_root, target_root, rare_class_sampling={key: value})


def test_rcs_needs_packed_labels(source_root, target_root):
    pipeline = [dict(type='LoadImageFromFile'), dict(type='PackSegInputs')]
    dataset = uda(source_root, target_root, pipeline, rare_class_sampling=dict(min_pixels=50))
    with pytest.raises(ValueError, match='must LoadAnnotations'):
        dataset[0]
