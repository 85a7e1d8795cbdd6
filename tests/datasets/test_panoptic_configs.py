"""The panoptic dataset configs (configs/_base_/datasets/*_panoptic.py).

Each builds its datasets on a tiny folder in its layout (COCO, ADE20K: a few fake files;
Cityscapes: fake instanceIds maps through our converter; shapes: the generated set), runs its
train and test pipelines, and its evaluator gives 100 to a prediction copied from the ground
truth. Labels are checked by class name, so a wrong class order fails.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.evaluator import Evaluator
from mmengine.registry import DefaultScope
from mmengine.structures import PixelData
from PIL import Image

from effvision.datasets.transforms import rgb2id
from effvision.evaluation.panoptic_metric import INSTANCE_OFFSET
from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / 'configs' / '_base_' / 'datasets'


def write_ids_png(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    assert cv2.imwrite(str(path), rgb[..., ::-1])


def write_image(path: Path, shape: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), pixels)


def fake_coco_panoptic(
    root: Path, ann_file: str, img_dir: str, seg_dir: str, metainfo: dict, names, image_ids
) -> None:
    """A COCO panoptic JSON, images and PNGs: per image a stuff background ``names[0]`` and one
    instance of each thing class in ``names[1:]``. Categories list every class of ``metainfo``
    in its order (things first, as the real JSONs), ids ``10 + index``."""
    classes = list(metainfo['classes'])
    categories = [
        {'id': 10 + i, 'name': name, 'isthing': int(name in metainfo['thing_classes'])}
        for i, name in enumerate(classes)
    ]
    images, annotations = [], []
    for n, image_id in enumerate(image_ids):
        stem = str(image_id).zfill(12) if isinstance(image_id, int) else image_id
        height, width = 40, 48  # at least mmdet's min_size=32 train filter
        ids = np.full((height, width), 10 + classes.index(names[0]))
        segments = [(int(ids[0, 0]), names[0], (0, 0, width, height))]
        for k, name in enumerate(names[1:]):
            x, y = 4 + 9 * k, 6 + n
            ids[y : y + 8, x : x + 6] = (10 + classes.index(name)) * 1000 + k + 1
            segments.append((int(ids[y, x]), name, (x, y, 6, 8)))
        write_image(root / img_dir / f'{stem}.jpg', (height, width), n)
        write_ids_png(root / seg_dir / f'{stem}.png', ids)
        images.append(
            {'id': image_id, 'file_name': f'{stem}.jpg', 'height': height, 'width': width}
        )
        info = [
            {
                'id': seg_id,
                'category_id': 10 + classes.index(name),
                'area': int((ids == seg_id).sum()),
                'bbox': list(bbox),
                'iscrowd': 0,
            }
            for seg_id, name, bbox in segments
        ]
        annotations.append(
            {'image_id': image_id, 'file_name': f'{stem}.png', 'segments_info': info}
        )
    content = {'images': images, 'annotations': annotations, 'categories': categories}
    (root / ann_file).parent.mkdir(parents=True, exist_ok=True)
    (root / ann_file).write_text(json.dumps(content))


def load_config(name: str, data_root: Path) -> Config:
    """A dataset config with every data root (and the evaluators' files) moved to ``data_root``."""
    cfg = Config.fromfile(CONFIGS / f'{name}.py')
    old_root = cfg.data_root
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = str(data_root)
    evaluators = cfg.val_evaluator if isinstance(cfg.val_evaluator, list) else [cfg.val_evaluator]
    for evaluator in evaluators:
        for key in ('ann_file', 'seg_prefix'):
            if key in evaluator:
                evaluator[key] = evaluator[key].replace(old_root, f'{data_root}/')
    return cfg


def build_dataset(cfg: Config, loader: str):
    from mmdet.registry import DATASETS

    with DefaultScope.overwrite_default_scope('mmdet'):
        return DATASETS.build(cfg[loader].dataset)


def perfect_prediction(data_info: dict, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The panoptic (mmdet encoding, VOID = ``num_classes``) and semantic maps (255 VOID) of an
    image's own ground truth (``data_info`` of the dataset)."""
    ids = rgb2id(cv2.imread(data_info['seg_map_path'])[..., ::-1].copy())
    panoptic = np.full(ids.shape, num_classes, np.int64)
    for k, seg in enumerate(data_info['segments_info'], start=1):
        instance = k * INSTANCE_OFFSET if seg['is_thing'] else 0
        panoptic[ids == seg['id']] = seg['category'] + instance
    labels = panoptic % INSTANCE_OFFSET
    semantic = np.where(labels == num_classes, 255, labels)
    return torch.from_numpy(panoptic)[None], torch.from_numpy(semantic)[None]


def evaluate_perfect(cfg: Config, dataset) -> dict:
    with DefaultScope.overwrite_default_scope('mmdet'):
        evaluator = Evaluator(cfg.val_evaluator)
    evaluator.dataset_meta = dataset.metainfo
    for index in range(len(dataset)):
        sample = dataset[index]['data_samples']
        panoptic, semantic = perfect_prediction(
            dataset.get_data_info(index), len(dataset.metainfo['classes'])
        )
        sample.pred_panoptic_seg = PixelData(sem_seg=panoptic)
        sample.pred_sem_seg = PixelData(sem_seg=semantic)
        evaluator.process([sample])
    return evaluator.evaluate(len(dataset))


def check_train_sample(packed: dict, num_things: int) -> set[int]:
    """Thing masks sit on their label in the semantic map after the augmentations, and their
    labels are things; returns the labels (a random crop may hold none)."""
    sample = packed['data_samples']
    semantic = sample.gt_sem_seg.sem_seg[0]
    assert semantic.shape == packed['inputs'].shape[-2:]
    assert set(semantic.unique().tolist()) - {255}
    instances = sample.gt_instances
    assert (instances.labels < num_things).all()
    masks = instances.masks.to_tensor(torch.bool, 'cpu')
    for label, mask in zip(instances.labels, masks):
        assert mask.any() and (semantic[mask] == label).all()
    return set(instances.labels.tolist())


def test_coco_panoptic(tmp_path):
    from mmdet.datasets import CocoPanopticDataset

    meta = CocoPanopticDataset.METAINFO
    for split, ids in (('train2017', [1, 2]), ('val2017', [3])):
        fake_coco_panoptic(
            tmp_path, f'annotations/panoptic_{split}.json', split,
            f'annotations/panoptic_{split}', meta, ['road', 'person', 'car'], ids,
        )  # fmt: skip
    cfg = load_config('coco_panoptic', tmp_path)
    train = build_dataset(cfg, 'train_dataloader')
    val = build_dataset(cfg, 'val_dataloader')
    assert (len(train), len(val)) == (2, 1)
    classes = list(meta['classes'])
    packed = train[0]
    assert packed['inputs'].shape[-2:] == (800, 960)  # Resize (1333, 800), keep ratio
    labels = packed['data_samples'].gt_instances.labels.tolist()
    assert labels == [classes.index('person'), classes.index('car')]
    assert check_train_sample(packed, len(meta['thing_classes'])) == set(labels)
    sem = packed['data_samples'].gt_sem_seg.sem_seg
    assert classes.index('road') in sem.unique().tolist()

    test = val[0]['data_samples']
    assert test.gt_sem_seg.sem_seg.shape[-2:] == (40, 48)  # annotations loaded after Resize
    assert evaluate_perfect(cfg, val)['coco_panoptic/PQ'] == 100.0


def test_ade20k_panoptic(tmp_path):
    from mmdet.datasets import ADE20KPanopticDataset

    meta = ADE20KPanopticDataset.METAINFO
    splits = (
        ('train', 'training', ['ADE_train_00000001']),
        ('val', 'validation', ['ADE_val_00000001', 'ADE_val_00000002']),
    )
    for split, folder, ids in splits:
        fake_coco_panoptic(
            tmp_path, f'ade20k_panoptic_{split}.json', f'images/{folder}',
            f'ade20k_panoptic_{split}', meta, ['sky', 'person', 'car'], ids,
        )  # fmt: skip
    cfg = load_config('ade20k_panoptic', tmp_path)
    train = build_dataset(cfg, 'train_dataloader')
    val = build_dataset(cfg, 'val_dataloader')
    assert (len(train), len(val)) == (1, 2)
    classes = list(meta['classes'])
    things = {classes.index('person'), classes.index('car')}
    np.random.seed(0)  # mmcv's random transforms draw from numpy's global generator
    seen = set()
    for _ in range(4):  # a 640 crop of the upscaled 40x48 image may miss the things
        packed = train[0]
        assert max(packed['inputs'].shape[-2:]) <= 640
        seen |= check_train_sample(packed, len(meta['thing_classes']))
    assert seen == things
    labels = val[0]['data_samples'].gt_instances.labels.tolist()
    assert labels == [classes.index('person'), classes.index('car')]
    metrics = evaluate_perfect(cfg, val)
    assert metrics['coco_panoptic/PQ'] == metrics['coco_panoptic/PQ_st'] == 100.0


def test_cityscapes_panoptic(tmp_path):
    spec = importlib.util.spec_from_file_location(
        'cityscapes_panoptic_tool', REPO_ROOT / 'tools/dataset_converters/cityscapes_panoptic.py'
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    root = tmp_path / 'cityscapes'
    for split, names in (('train', ['aachen_000000_000019']), ('val', ['bonn_000000_000019'])):
        for n, name in enumerate(names):
            city = name.split('_')[0]
            ids = np.full((32, 64), 7, np.uint16)  # road
            ids[:10] = 23  # sky
            ids[12:24, 4:10] = 24001  # person
            ids[14:26, 30:50] = 26002  # car
            ids[28:, :] = 1  # ego vehicle (VOID)
            (root / 'gtFine' / split / city).mkdir(parents=True)
            Image.fromarray(ids).save(
                root / 'gtFine' / split / city / f'{name}_gtFine_instanceIds.png'
            )
            write_image(
                root / 'leftImg8bit' / split / city / f'{name}_leftImg8bit.png', (32, 64), n
            )
    tool.main([str(root), '--nproc', '1'])

    cfg = load_config('cityscapes_panoptic', root)
    classes = list(cfg.metainfo['classes'])
    assert classes == [c['name'] for c in tool.categories()]  # the converter's order
    train = build_dataset(cfg, 'train_dataloader')
    val = build_dataset(cfg, 'val_dataloader')
    assert (len(train), len(val)) == (1, 1)
    assert val.get_data_info(0)['img_id'] == 'bonn_000000_000019'
    np.random.seed(0)
    seen = set()
    for _ in range(4):
        packed = train[0]
        assert packed['inputs'].shape[-2] <= 512 and packed['inputs'].shape[-1] <= 1024
        seen |= check_train_sample(packed, len(cfg.metainfo['thing_classes']))
    assert seen == {classes.index('person'), classes.index('car')}
    test = val[0]['data_samples']
    semantic = test.gt_sem_seg.sem_seg[0]
    assert semantic.shape == (32, 64)
    assert semantic[0, 0] == classes.index('sky') and semantic[20, 5] == classes.index('person')
    assert semantic[20, 40] == classes.index('car') and semantic[30, 0] == 255
    assert evaluate_perfect(cfg, val)['coco_panoptic/PQ'] == 100.0


def test_shapes_panoptic(shapes_root):
    from effvision.datasets.synthetic import CLASSES, PALETTE, STUFF_CLASSES, THING_CLASSES

    # mmdet numbers a JSON's categories in file order, and needs thing labels first.
    content = json.loads((shapes_root / 'annotations' / 'panoptic_validation.json').read_text())
    assert [c['name'] for c in content['categories']] == [*THING_CLASSES, *STUFF_CLASSES], (
        'the shapes generator must list the panoptic categories things first '
        '(effvision/datasets/synthetic.py, _categories)'
    )
    cfg = load_config('shapes_panoptic', shapes_root)
    train = build_dataset(cfg, 'train_dataloader')
    val = build_dataset(cfg, 'val_dataloader')
    meta = train.metainfo
    assert tuple(meta['classes']) == THING_CLASSES + STUFF_CLASSES
    assert tuple(meta['thing_classes']) == THING_CLASSES
    assert [tuple(c) for c in meta['palette']] == [
        PALETTE[CLASSES.index(c)] for c in meta['classes']
    ]
    assert (len(train), len(val)) == (8, 4)
    num_things = len(THING_CLASSES)
    np.random.seed(0)
    seen = set()
    for index in range(len(train)):
        packed = train[index]
        assert packed['inputs'].shape[0] == 3 and max(packed['inputs'].shape[-2:]) <= 128
        seen |= check_train_sample(packed, num_things)
    assert len(seen) >= 3

    # The test pipeline's labels against the generator's semantic maps (classes in CLASSES
    # order), class by class name.
    to_config_label = np.array([list(meta['classes']).index(name) for name in CLASSES])
    for index in range(len(val)):
        sample = val[index]['data_samples']
        name = Path(sample.img_path).name
        semantic = np.asarray(Image.open(shapes_root / 'annotations' / 'validation' / name))
        expected = torch.from_numpy(to_config_label[semantic])
        assert torch.equal(sample.gt_sem_seg.sem_seg[0].long(), expected)
        masks = sample.gt_instances.masks.to_tensor(torch.bool, 'cpu')
        assert len(masks) > 0
        for label, mask in zip(sample.gt_instances.labels, masks):
            assert label < num_things and (expected[mask] == label).all()
    metrics = evaluate_perfect(cfg, val)
    assert metrics['coco_panoptic/PQ'] == 100.0 and metrics['mIoU'] == 100.0


def test_shapes_panoptic_refuses_a_stuff_first_set(shapes_root, tmp_path):
    """A set written by generator 1.0 (stuff-first JSON) would train with wrong labels."""
    import shutil

    old = tmp_path / 'shapes'
    shutil.copytree(shapes_root, old)
    meta = json.loads((old / 'meta.json').read_text())
    (old / 'meta.json').write_text(json.dumps({**meta, 'generator_version': '1.0'}))
    cfg = load_config('shapes_panoptic', old)
    with pytest.raises(ValueError, match='make_shapes.py --out .* --force'):
        build_dataset(cfg, 'train_dataloader')
