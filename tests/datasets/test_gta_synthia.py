"""GTA5 and SYNTHIA: label tables, readers, converters, datasets and the UDA base configs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import mmseg.registry
import numpy as np
import pytest
from mmengine.config import Config
from mmengine.registry import init_default_scope
from PIL import Image

from effvision.datasets import GTA5Dataset, SynthiaDataset, UDADataset
from effvision.datasets.class_stats import map_ids
from effvision.datasets.gta import GTA5_ID_TO_TRAIN_ID, convert_gta5, read_gta5_label
from effvision.datasets.synthia import (
    SYNTHIA_CLASS_SUBSETS,
    SYNTHIA_ID_TO_TRAIN_ID,
    convert_synthia,
    read_synthia_label,
)
from effvision.registry import DATASETS

CONFIGS = Path(__file__).resolve().parents[2] / 'configs' / '_base_' / 'datasets'
CITYSCAPES_CLASSES = mmseg.registry.DATASETS.get('CityscapesDataset').METAINFO['classes']

# Cityscapes label id -> train id, written out independently of the module's table
# (cityscapesScripts' labels.py: the ids whose trainId is not 255).
CITYSCAPES_TRAIN_IDS = {
    'road': 7, 'sidewalk': 8, 'building': 11, 'wall': 12, 'fence': 13, 'pole': 17,
    'traffic light': 19, 'traffic sign': 20, 'vegetation': 21, 'terrain': 22, 'sky': 23,
    'person': 24, 'rider': 25, 'car': 26, 'truck': 27, 'bus': 28, 'train': 31,
    'motorcycle': 32, 'bicycle': 33,
}  # fmt: skip


@pytest.fixture(autouse=True)
def _effvision_scope():
    init_default_scope('effvision')  # pipelines name mmseg's transforms by their plain names


def write_palette_png(path: Path, ids: np.ndarray) -> None:
    image = Image.fromarray(ids.astype(np.uint8)).convert('P')
    image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_synthia_png(path: Path, ids: np.ndarray, seed: int = 0) -> None:
    """A 16-bit, 3-channel SYNTHIA-style map: class ids in the file's first channel (R)."""
    noise = np.random.default_rng(seed).integers(0, 65535, size=(*ids.shape, 2), dtype=np.uint16)
    bgr = np.dstack([noise[..., 0], noise[..., 1], ids.astype(np.uint16)])
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), bgr)


def write_rgb(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), 90, np.uint8)).save(path)


def test_registered_and_not_upstream():
    for cls in (GTA5Dataset, SynthiaDataset, UDADataset):
        assert DATASETS.get(cls.__name__) is cls
        assert cls.__name__ not in mmseg.registry.DATASETS.module_dict
    for cls in (GTA5Dataset, SynthiaDataset):
        assert cls.METAINFO['classes'] == CITYSCAPES_CLASSES
        assert len(cls.METAINFO['palette']) == 19


def test_gta5_table_is_cityscapes_train_ids():
    expected = {CITYSCAPES_TRAIN_IDS[name]: i for i, name in enumerate(CITYSCAPES_CLASSES)}
    assert expected == GTA5_ID_TO_TRAIN_ID


def test_synthia_table_and_subsets():
    assert sorted(SYNTHIA_ID_TO_TRAIN_ID.values()) == list(range(19))
    assert SYNTHIA_ID_TO_TRAIN_ID[3] == 0 and SYNTHIA_ID_TO_TRAIN_ID[21] == 3  # road, wall
    sixteen = [
        i for i, c in enumerate(CITYSCAPES_CLASSES) if c not in ('terrain', 'truck', 'train')
    ]
    thirteen = [i for i in sixteen if CITYSCAPES_CLASSES[i] not in ('wall', 'fence', 'pole')]
    assert list(SYNTHIA_CLASS_SUBSETS['mIoU16']) == sixteen
    assert list(SYNTHIA_CLASS_SUBSETS['mIoU13']) == thirteen


def test_gta5_conversion_exact_on_every_id(tmp_path):
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    write_palette_png(tmp_path / 'gta/labels/00001.png', ids)
    convert_gta5(tmp_path / 'gta')
    assert np.array_equal(read_gta5_label(str(tmp_path / 'gta/labels/00001.png')), ids)
    out = np.asarray(Image.open(tmp_path / 'gta/labels/00001_labelTrainIds.png'))
    expected = np.array([GTA5_ID_TO_TRAIN_ID.get(int(i), 255) for i in ids.ravel()], np.uint8)
    assert out.dtype == np.uint8 and np.array_equal(out.ravel(), expected)


def test_gta5_reader_rejects_colour_labels(tmp_path):
    write_rgb(tmp_path / 'x.png', (4, 4))
    with pytest.raises(ValueError, match='palette PNGs'):
        read_gta5_label(str(tmp_path / 'x.png'))


def test_synthia_conversion_exact_on_every_id(tmp_path):
    ids = np.arange(64, dtype=np.uint16).reshape(8, 8)
    ids[0, :4] = (256, 1000, 3 + 256, 65535)  # 16-bit ids map to nothing, not to id % 256
    write_synthia_png(tmp_path / 'syn/GT/LABELS/0000000.png', ids)
    assert np.array_equal(read_synthia_label(str(tmp_path / 'syn/GT/LABELS/0000000.png')), ids)
    convert_synthia(tmp_path / 'syn')
    out = np.asarray(Image.open(tmp_path / 'syn/GT/LABELS/0000000_labelTrainIds.png'))
    expected = np.array([SYNTHIA_ID_TO_TRAIN_ID.get(int(i), 255) for i in ids.ravel()], np.uint8)
    assert np.array_equal(out.ravel(), expected)


def test_synthia_reader_single_channel_and_unreadable(tmp_path):
    ids = np.array([[3, 21], [300, 0]], np.uint16)
    assert cv2.imwrite(str(tmp_path / 'gray.png'), ids)
    assert np.array_equal(read_synthia_label(str(tmp_path / 'gray.png')), ids)
    (tmp_path / 'bad.png').write_bytes(b'not a png')
    with pytest.raises(ValueError, match='not a readable image'):
        read_synthia_label(str(tmp_path / 'bad.png'))


def test_map_ids_rejects_non_integer_and_negative():
    with pytest.raises(ValueError, match='integer'):
        map_ids(np.zeros((2, 2), np.float32), {0: 1})
    with pytest.raises(ValueError, match='non-negative'):
        map_ids(np.array([[-1]]), {0: 1})


def test_conversion_writes_stats_and_reruns(tmp_path):
    root = tmp_path / 'gta'
    write_palette_png(root / 'labels/00001.png', np.array([[7, 7, 26], [0, 26, 26]]))
    write_palette_png(root / 'labels/00002.png', np.array([[33, 1], [1, 1]]))
    first = convert_gta5(root)
    second = convert_gta5(root)  # the written *_labelTrainIds.png are not converted again
    assert first == second and len(second) == 2
    label_1 = str(root / 'labels/00001_labelTrainIds.png')
    label_2 = str(root / 'labels/00002_labelTrainIds.png')
    stats = json.loads((root / 'sample_class_stats.json').read_text())
    assert stats == [{'0': 2, '13': 3, 'file': label_1}, {'18': 1, 'file': label_2}]
    with_class = json.loads((root / 'samples_with_class.json').read_text())
    assert with_class == {'0': [[label_1, 2]], '13': [[label_1, 3]], '18': [[label_2, 1]]}
    assert sorted(p.name for p in root.iterdir()) == [
        'labels', 'sample_class_stats.json', 'samples_with_class.json'
    ]  # fmt: skip


def make_gta(root: Path, n: int = 2, size: tuple[int, int] = (32, 32)) -> Path:
    for i in range(n):
        write_rgb(root / f'images/{i:05d}.png', size)
        ids = np.full(size, 7, np.uint8)
        ids[: size[0] // 2] = 26 if i % 2 else 23  # car or sky in the top half
        write_palette_png(root / f'labels/{i:05d}.png', ids)
    convert_gta5(root)
    return root


def make_synthia(root: Path, n: int = 2, size: tuple[int, int] = (32, 32)) -> Path:
    for i in range(n):
        write_rgb(root / f'RGB/{i:07d}.png', size)
        ids = np.full(size, 3, np.uint16)
        ids[: size[0] // 2] = 8 if i % 2 else 1  # car or sky in the top half
        write_synthia_png(root / f'GT/LABELS/{i:07d}.png', ids, seed=i)
    convert_synthia(root)
    return root


def make_cityscapes(root: Path, n: int = 2, size: tuple[int, int] = (32, 64)) -> Path:
    for split in ('train', 'val'):
        for i in range(n):
            name = f'city_{i:06d}_000019'
            write_rgb(root / f'leftImg8bit/{split}/city/{name}_leftImg8bit.png', size)
            ids = np.zeros(size, np.uint8)
            ids[: size[0] // 2] = 10
            path = root / f'gtFine/{split}/city/{name}_gtFine_labelTrainIds.png'
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ids).save(path)
    return root


PIPELINE = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]


@pytest.mark.parametrize(
    'cls, make, prefix',
    [
        (GTA5Dataset, make_gta, dict(img_path='images', seg_map_path='labels')),
        (SynthiaDataset, make_synthia, dict(img_path='RGB', seg_map_path='GT/LABELS')),
    ],
)
def test_dataset_reads_train_ids(tmp_path, cls, make, prefix):
    root = make(tmp_path / 'data')
    dataset = cls(data_root=str(root), data_prefix=prefix, pipeline=PIPELINE)
    assert len(dataset) == 2
    assert dataset.get_data_info(0)['seg_map_path'].endswith('_labelTrainIds.png')
    sample = dataset[1]
    gt = sample['data_samples'].gt_sem_seg.data
    assert gt.shape == (1, 32, 32) and sample['inputs'].shape == (3, 32, 32)
    assert set(gt.unique().tolist()) == {0, 13}  # road, car


@pytest.mark.parametrize('cls, script', [(GTA5Dataset, 'gta.py'), (SynthiaDataset, 'synthia.py')])
def test_dataset_without_converted_labels_names_the_converter(tmp_path, cls, script):
    write_rgb(tmp_path / 'images/00000.png', (4, 4))
    write_palette_png(tmp_path / 'labels/00000.png', np.zeros((4, 4)))
    prefix = dict(img_path='images', seg_map_path='labels')
    with pytest.raises(FileNotFoundError, match=f'tools/dataset_converters/{script} {tmp_path}'):
        cls(data_root=str(tmp_path), data_prefix=prefix)


@pytest.mark.parametrize(
    'name, source_type, scale',
    [('gta', 'GTA5Dataset', (1280, 720)), ('synthia', 'SynthiaDataset', (1280, 760))],
)
def test_uda_config_values(name, source_type, scale):
    cfg = Config.fromfile(CONFIGS / f'uda_{name}_to_cityscapes_512x512.py')
    loader = cfg.train_dataloader
    assert loader.batch_size == 2 and loader.sampler.type == 'InfiniteSampler'
    uda = loader.dataset
    assert uda.type == 'UDADataset' and uda.source.type == source_type
    assert uda.rare_class_sampling == dict(class_temp=0.01, min_pixels=3000, min_crop_ratio=0.5)
    source, target = uda.source.pipeline, uda.target.pipeline
    assert [t['type'] for t in source] == [
        'LoadImageFromFile', 'LoadAnnotations', 'Resize', 'RandomCrop', 'RandomFlip',
        'PackSegInputs',
    ]  # fmt: skip
    assert [t['type'] for t in target] == [t['type'] for t in source]
    assert source[2] == dict(type='Resize', scale=scale, keep_ratio=True)
    assert target[2] == dict(type='Resize', scale=(1024, 512), keep_ratio=True)
    assert source[3] == dict(type='RandomCrop', crop_size=(512, 512), cat_max_ratio=0.75)
    assert target[3] == dict(type='RandomCrop', crop_size=(512, 512))
    assert source[4] == target[4] == dict(type='RandomFlip', prob=0.5)
    test = cfg.test_pipeline
    assert test[1] == dict(type='Resize', scale=(1024, 512), keep_ratio=True)
    assert cfg.val_dataloader.dataset.data_prefix.img_path == 'leftImg8bit/val'
    assert cfg.test_dataloader == cfg.val_dataloader
    if name == 'synthia':
        assert cfg.val_evaluator.type == 'SubsetIoUMetric'
        subsets = {k: tuple(v) for k, v in cfg.val_evaluator.class_subsets.items()}
        assert subsets == SYNTHIA_CLASS_SUBSETS
    else:
        assert cfg.val_evaluator == dict(type='IoUMetric', iou_metrics=['mIoU'])


@pytest.mark.parametrize('name, make', [('gta', make_gta), ('synthia', make_synthia)])
def test_uda_config_builds_on_small_data(tmp_path, name, make):
    cfg = Config.fromfile(CONFIGS / f'uda_{name}_to_cityscapes_512x512.py')
    uda = cfg.train_dataloader.dataset
    uda.source.data_root = str(make(tmp_path / name))
    uda.target.data_root = str(make_cityscapes(tmp_path / 'cityscapes'))
    uda.rare_class_sampling.min_pixels = 100  # GTA5's 3000 are more than a 32x32 map holds
    dataset = DATASETS.build(uda)
    assert len(dataset) == 2 and dataset.metainfo['classes'] == CITYSCAPES_CLASSES  # RCS: sources
    np.random.seed(0)
    item = dataset[0]
    assert item['inputs'].shape == item['target_inputs'].shape == (3, 512, 512)
    val = cfg.val_dataloader.dataset
    val.data_root = uda.target.data_root
    sample = DATASETS.build(val)[0]
    assert sample['inputs'].shape == (3, 512, 1024)  # 1024x512, keep_ratio
    assert sample['data_samples'].gt_sem_seg.data.shape == (1, 32, 64)  # full-size label
