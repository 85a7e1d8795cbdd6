"""Tests of ShapesDataset and its base config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

from effvision.datasets import ShapesDataset
from effvision.datasets.synthetic import CLASSES, PALETTE, generate_shapes
from effvision.registry import DATASETS

CONFIG = Path(__file__).resolve().parents[2] / 'configs' / '_base_' / 'datasets' / 'shapes.py'


@pytest.fixture(scope='module')
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('shapes') / 'data'
    generate_shapes(root, num_train=4, num_val=2, size=(128, 128))
    return root


def _build(cfg: Config, loader: str, data_root: Path):
    init_default_scope('effvision')
    dataset_cfg = cfg[loader].dataset.copy()
    dataset_cfg.data_root = str(data_root)
    return DATASETS.build(dataset_cfg)


def test_registered():
    assert DATASETS.get('ShapesDataset') is ShapesDataset
    assert ShapesDataset.METAINFO['classes'] == CLASSES
    assert [tuple(c) for c in ShapesDataset.METAINFO['palette']] == list(PALETTE)


def test_config_values():
    cfg = Config.fromfile(CONFIG)
    assert cfg.dataset_type == 'ShapesDataset' and cfg.crop_size == (128, 128)
    assert cfg.train_dataloader.sampler.type == 'InfiniteSampler'
    assert cfg.train_dataloader.batch_size == 8
    assert cfg.val_evaluator == dict(type='IoUMetric', iou_metrics=['mIoU'])
    assert cfg.test_dataloader == cfg.val_dataloader


def test_train_dataset(data_root):
    dataset = _build(Config.fromfile(CONFIG), 'train_dataloader', data_root)
    assert len(dataset) == 4
    assert dataset.metainfo['classes'] == CLASSES and not dataset.reduce_zero_label
    sample = dataset[0]
    image, labels = sample['inputs'], sample['data_samples'].gt_sem_seg.data
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert labels.shape[-2:] == image.shape[-2:] and max(image.shape[-2:]) <= 128
    # Labels pass through unchanged: real classes, or 255 only where augmentation padded.
    assert set(labels.unique().tolist()) <= set(range(len(CLASSES))) | {255}


def test_val_dataset(data_root):
    dataset = _build(Config.fromfile(CONFIG), 'val_dataloader', data_root)
    assert len(dataset) == 2
    sample = dataset[1]
    assert sample['inputs'].shape == (3, 128, 128)
    labels = sample['data_samples'].gt_sem_seg.data
    assert labels.shape == (1, 128, 128) and labels.max() < len(CLASSES)
