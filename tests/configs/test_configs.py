"""Every config in configs/ builds, trains one iteration and predicts on the synthetic set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mmdet.registry import MODELS as DET_MODELS
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.model.utils import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope
from mmengine.utils import import_modules_from_strings

from effvision.registry import DATASETS, MODELS
from effvision.utils import register_all_modules
from tests.conftest import CONFIGS, REPO_ROOT, config_param

SIZE = (64, 64)


def test_configs_are_collected():
    assert len(CONFIGS) >= 4


THING_CLASSES = ('car', 'person', 'traffic sign', 'ball', 'cone')
STUFF_CLASSES = ('sky', 'building', 'vegetation', 'road')
# Published baselines use ResNet-50 from mmseg/mmdet; everything else is an effvision backbone.
UPSTREAM_BACKBONES = ('ResNet',)


def is_detection(cfg: Config) -> bool:
    """mmdet configs (built in mmdet's scope) versus mmseg ones (effvision's scope)."""
    return cfg.default_scope == 'mmdet'


def _shapes_batch(root: Path, split: str) -> dict:
    """The first two images of a split of the synthetic set, packed and collated."""
    register_all_modules()
    dataset = DATASETS.build(
        dict(
            type='ShapesDataset',
            data_root=str(root),
            data_prefix=dict(img_path=f'images/{split}', seg_map_path=f'annotations/{split}'),
            pipeline=[
                dict(type='LoadImageFromFile'),
                dict(type='LoadAnnotations'),
                dict(type='Resize', scale=SIZE, keep_ratio=False),
                dict(type='PackSegInputs'),
            ],
        )
    )
    return pseudo_collate([dataset[0], dataset[1]])


@pytest.fixture(scope='module')
def seg_batch(shapes_root):
    return _shapes_batch(shapes_root, 'training')


@pytest.fixture(scope='module')
def det_batch(shapes_root):
    """Two synthetic images with COCO instance annotations, packed by mmdet's pipeline."""
    from mmdet.registry import DATASETS as MMDET_DATASETS

    register_all_modules()
    with DefaultScope.overwrite_default_scope('mmdet'):
        dataset = MMDET_DATASETS.build(
            dict(
                type='CocoDataset',
                data_root=str(shapes_root),
                ann_file='annotations/instances_training.json',
                data_prefix=dict(img='images/training/'),
                metainfo=dict(classes=THING_CLASSES),
                filter_cfg=dict(filter_empty_gt=True),
                pipeline=[
                    dict(type='LoadImageFromFile'),
                    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
                    dict(type='Resize', scale=SIZE, keep_ratio=False),
                    dict(type='PackDetInputs'),
                ],
            )
        )
        return pseudo_collate([dataset[0], dataset[1]])


@pytest.fixture(scope='module')
def pan_batch(shapes_root):
    """Two synthetic images with COCO panoptic annotations (things first), packed by mmdet."""
    from mmdet.registry import DATASETS as MMDET_DATASETS

    register_all_modules()
    with DefaultScope.overwrite_default_scope('mmdet'):
        dataset = MMDET_DATASETS.build(
            dict(
                type='CocoPanopticDataset',
                data_root=str(shapes_root),
                ann_file='annotations/panoptic_training.json',
                data_prefix=dict(img='images/training/', seg='annotations/panoptic_training/'),
                metainfo=dict(classes=THING_CLASSES + STUFF_CLASSES),
                pipeline=[
                    dict(type='LoadImageFromFile'),
                    dict(type='effvision.LoadCocoPanopticAnnotations'),
                    dict(type='Resize', scale=SIZE, keep_ratio=False),
                    dict(type='PackDetInputs'),
                ],
            )
        )
        return pseudo_collate([dataset[0], dataset[1]])


def is_panoptic(cfg: Config) -> bool:
    """A mask-classification model trained on panoptic data (mmdet)."""
    return cfg.model.type == 'effvision.PanopticMaskClassifier'


def _shrink_fixed_padding(cfg: Config) -> None:
    """Fixed-size padding of published canvases (640, 1281, ...) shrinks to the test size."""
    preprocessor = cfg.model.data_preprocessor
    for augment in preprocessor.get('batch_augments') or []:
        if 'size' in augment:
            augment.size = SIZE
    if 'canvas' in preprocessor:  # kMaX-DeepLab pads every batch to its canvas
        preprocessor.canvas = SIZE


@pytest.fixture(scope='module')
def uda_batch(seg_batch, shapes_root):
    """Labelled source images paired with two other images as the unlabelled target."""
    target = _shapes_batch(shapes_root, 'validation')
    return dict(
        seg_batch, target_inputs=target['inputs'], target_data_samples=target['data_samples']
    )


def is_uda(cfg: Config) -> bool:
    """Domain-adaptive training: the segmentor to adapt is nested in the UDA model."""
    return cfg.model.type == 'DACS'


@pytest.mark.parametrize(
    'path',
    [config_param(p) for p in CONFIGS],
    ids=lambda p: str(p.relative_to(REPO_ROOT / 'configs')),
)
def test_config_trains_and_predicts(path: Path, request):
    cfg = Config.fromfile(path)
    assert cfg.default_scope in ('effvision', 'mmdet')
    segmentor = cfg.model.model if is_uda(cfg) else cfg.model
    segmentor.backbone.init_cfg = None  # published weights cannot be downloaded in tests
    register_all_modules()
    detection = is_detection(cfg)
    backbone = segmentor.backbone.type
    assert backbone.startswith('effvision.') or backbone in UPSTREAM_BACKBONES or not detection
    if detection:
        import_modules_from_strings(**cfg.custom_imports)
        _shrink_fixed_padding(cfg)
        batch = request.getfixturevalue('pan_batch' if is_panoptic(cfg) else 'det_batch')
    else:
        cfg.model.data_preprocessor.size = SIZE
        batch = request.getfixturevalue('uda_batch' if is_uda(cfg) else 'seg_batch')
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        registry = DET_MODELS if detection else MODELS
        model = revert_sync_batchnorm(registry.build(cfg.model))
        model.init_weights()
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
        model.train()
        losses = model.train_step(batch, optim_wrapper)
        assert losses and all(torch.isfinite(v).all() for v in losses.values())
        model.eval()
        if is_uda(cfg):  # validation batches are plain (target-domain) images
            batch = request.getfixturevalue('seg_batch')
        with torch.no_grad():
            predictions = model.val_step(batch)
    assert len(predictions) == 2
    if detection and is_panoptic(cfg):
        assert predictions[0].pred_panoptic_seg.sem_seg.shape[-2:] == SIZE
        assert predictions[0].pred_sem_seg.sem_seg.shape[-2:] == SIZE
    elif detection:
        assert {'bboxes', 'scores', 'labels', 'masks'} <= set(predictions[0].pred_instances.keys())
    else:
        assert predictions[0].pred_sem_seg.data.shape[-2:] == SIZE


SWIN_ADE = sorted(
    (REPO_ROOT / 'configs' / 'swin').glob('upernet_swin-*_8xb2-160k_ade20k-512x512.py')
)


@pytest.mark.parametrize('path', SWIN_ADE, ids=lambda p: p.stem)
def test_swin_ade20k_configs_follow_the_official_recipe(path: Path):
    cfg = Config.fromfile(path)
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, tuple(optimizer.betas), optimizer.weight_decay) == (
        'AdamW', 6e-5, (0.9, 0.999), 0.01,
    )  # fmt: skip
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.end, poly.type, poly.begin, poly.end, poly.power) == (
        'LinearLR', 1500, 'PolyLR', 1500, 160000, 1.0,
    )  # fmt: skip
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.train_dataloader.batch_size * 8 == 16
    assert cfg.model.decode_head.type == 'UPerHead' and cfg.model.auxiliary_head.type == 'FCNHead'
    assert cfg.model.backbone.init_cfg.type == 'Pretrained'
    # no decay on norms and position-bias tables
    with torch.device('meta'):
        register_all_modules()
        cfg.model.backbone.init_cfg = None
        model = MODELS.build(cfg.model)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    table = model.backbone.stages[0].blocks[0].attn.relative_position_bias_table
    norm = model.backbone.stages[0].blocks[0].norm1.weight
    qkv = model.backbone.stages[0].blocks[0].attn.qkv.weight
    for group in wrapper.optimizer.param_groups:
        if any(p is table or p is norm for p in group['params']):
            assert group['weight_decay'] == 0.0
        if any(p is qkv for p in group['params']):
            assert group['weight_decay'] == 0.01


DAFORMER = sorted((REPO_ROOT / 'configs' / 'daformer').glob('daformer_*_1xb2-40k_*-512x512.py'))


@pytest.mark.parametrize('path', DAFORMER, ids=lambda p: p.stem)
def test_daformer_configs_follow_the_published_recipe(path: Path):
    """lhoyer/DAFormer gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py."""
    cfg = Config.fromfile(path)
    uda = cfg.model
    assert (uda.type, uda.alpha, uda.pseudo_threshold, uda.mix, uda.blur) == (
        'DACS', 0.999, 0.968, 'class', True,
    )  # fmt: skip
    assert (uda.pseudo_weight_ignore_top, uda.pseudo_weight_ignore_bottom) == (15, 120)
    assert (uda.color_jitter_strength, uda.color_jitter_probability) == (0.2, 0.2)
    assert uda.imnet_feature_dist_lambda == 0.005
    assert uda.imnet_feature_dist_classes == [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]
    assert uda.imnet_feature_dist_scale_min_ratio == 0.75
    assert uda.mask_consistency is None  # MIC is an option, off in DAFormer
    head = uda.model.decode_head
    assert (head.type, head.channels, head.embed_dims, head.num_classes) == (
        'DAFormerHead', 256, 256, 19,
    )  # fmt: skip
    assert head.fusion_cfg == dict(type='aspp', sep=True, dilations=(1, 6, 12, 18), pool=False)
    assert uda.data_preprocessor.size == (512, 512)
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.weight_decay) == ('AdamW', 6e-5, 0.01)
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys.head.lr_mult == 10.0
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.end) == ('LinearLR', 1e-6, 1500)
    assert (poly.type, poly.begin, poly.end, poly.power, poly.eta_min) == (
        'PolyLR', 0, 40000, 1.0, 0.0,
    )  # fmt: skip
    assert (cfg.train_cfg.max_iters, cfg.train_cfg.val_interval) == (40000, 4000)
    assert cfg.train_dataloader.batch_size == 2
    rcs = cfg.train_dataloader.dataset.rare_class_sampling
    assert (rcs.class_temp, rcs.min_pixels, rcs.min_crop_ratio) == (0.01, 3000, 0.5)
    if 'mit-b5' in path.stem:
        backbone = uda.model.backbone
        assert (backbone.embed_dims, backbone.num_layers) == (64, [3, 6, 40, 3])


# bytedance/kmax-deeplab configs/{coco,ade20k,cityscapes}/panoptic_segmentation/kmax_r50.yaml:
# queries, canvas (H, W), batch per GPU (8 GPUs), iterations, lr, (things, stuff), thresholds
# (thing, stuff, overlap, reorder mask weight), drop path, scale jitter
KMAX_PUBLISHED = {
    'kmax-deeplab_r50_8xb8-150k_coco-panoptic-1281x1281': (
        128, (1281, 1281), 8, 150000, 5e-4, (80, 53), (0.7, 0.5, 0.8, 1.0), 0.2, (0.2, 2.0),
    ),
    'kmax-deeplab_r50_8xb8-100k_ade20k-panoptic-1281x1281': (
        128, (1281, 1281), 8, 100000, 5e-4, (100, 50), (0.4, 0.4, 0.8, 1.0), 0.0, (0.5, 2.0),
    ),
    'kmax-deeplab_r50_8xb4-60k_cityscapes-panoptic-1025x2049': (
        256, (1025, 2049), 4, 60000, 3e-4, (8, 11), (0.5, 0.3, 0.9, 0.0), 0.2, (0.5, 2.0),
    ),
}  # fmt: skip


@pytest.mark.parametrize('name', sorted(KMAX_PUBLISHED))
def test_kmax_configs_follow_the_published_recipe(name: str):
    queries, canvas, batch, iters, lr, split, thresholds, drop_path, jitter = KMAX_PUBLISHED[name]
    cfg = Config.fromfile(REPO_ROOT / 'configs' / 'kmax_deeplab' / f'{name}.py')
    head = cfg.model.panoptic_head
    assert head.num_queries == queries
    assert (head.num_things_classes, head.num_stuff_classes) == split
    assert head.num_classes == sum(split)
    assert head.transformer_decoder.drop_path_rate == drop_path
    assert cfg.model.data_preprocessor.canvas == canvas
    test = cfg.model.test_cfg
    assert (test.thing_thr, test.stuff_thr, test.overlap_thr, test.reorder_mask_weight) == (
        thresholds
    )
    assert (test.pixel_confidence_thr, test.reorder_class_weight) == (0.4, 1.0)
    assert cfg.train_dataloader.batch_size == batch
    resize, crop = cfg.train_pipeline[2], cfg.train_pipeline[3]
    assert (resize.ratio_range, tuple(resize.scale)) == (jitter, canvas[::-1])  # mmdet: (w, h)
    assert tuple(crop.crop_size) == canvas[::-1]
    assert tuple(cfg.test_pipeline[1].scale) == canvas[::-1]
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.weight_decay) == ('AdamW', lr, 0.05)
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys.backbone.lr_mult == 0.1
    assert 'clip_grad' not in cfg.optim_wrapper
    (scheduler,) = cfg.param_scheduler
    assert (scheduler.type, scheduler.max_iters, scheduler.warmup_iters, scheduler.power) == (
        'effvision.DeepLabPolyLR', iters, 5000, 0.9,
    )  # fmt: skip
    assert cfg.train_cfg.max_iters == iters
    if 'cityscapes' in name:  # five decoder stages, the stem feature, the light aux head
        assert cfg.model.backbone.type == 'effvision.ResNetWithStem'
        assert head.in_channels == [256, 64, 512, 1024, 2048]
        assert head.pixel_decoder.dec_channels == (512, 256, 128, 64, 32)
        assert head.transformer_decoder.aux_semantic_head == 'light'
        assert (head.loss.insdis_sample_temperature, head.loss.aux_semantic_sample_k) == (0.6, 0)
