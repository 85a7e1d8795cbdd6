# Cityscapes panoptic (19 classes: 8 things, 11 stuff) as COCO panoptic data, for mmdet panoptic
# models (default_scope='mmdet', set by the model config). mmdet has no Cityscapes panoptic
# dataset; convert the fine annotations once:
#   python tools/dataset_converters/cityscapes_panoptic.py data/cityscapes --nproc 8
# which writes, next to leftImg8bit/<split>/<city>/*_leftImg8bit.png:
#   data/cityscapes/gtFine/cityscapes_panoptic_{train,val}.json
#   data/cityscapes/gtFine/cityscapes_panoptic_{train,val}/<city>/*_leftImg8bit.png
# See docs/datasets/panoptic.md. Labels follow the JSON's category order, things first.
dataset_type = 'CocoPanopticDataset'
data_root = 'data/cityscapes/'
backend_args = None
crop_size = (1024, 512)  # mmdet's RandomCrop takes (width, height), mmseg's (height, width)
metainfo = dict(
    classes=(
        'person', 'rider', 'car', 'truck', 'bus', 'train', 'motorcycle', 'bicycle',
        'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light',
        'traffic sign', 'vegetation', 'terrain', 'sky',
    ),
    thing_classes=('person', 'rider', 'car', 'truck', 'bus', 'train', 'motorcycle', 'bicycle'),
    stuff_classes=(
        'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light',
        'traffic sign', 'vegetation', 'terrain', 'sky',
    ),
    palette=[
        (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100),
        (0, 0, 230), (119, 11, 32), (128, 64, 128), (244, 35, 232), (70, 70, 70),
        (102, 102, 156), (190, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0),
        (107, 142, 35), (152, 251, 152), (70, 130, 180),
    ],
)  # fmt: skip

# Mask2Former's Cityscapes recipe: 1024x2048 x [0.5, 2.0], 512x1024 crop.
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='effvision.LoadCocoPanopticAnnotations', backend_args=backend_args),
    dict(type='RandomResize', scale=(2048, 1024), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(
        type='RandomCrop',
        crop_size=crop_size,
        crop_type='absolute',
        recompute_bbox=True,
        allow_negative_crop=True,
    ),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(2048, 1024), keep_ratio=True),
    dict(type='effvision.LoadCocoPanopticAnnotations', backend_args=backend_args),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'),
    ),
]

train_dataloader = dict(
    batch_size=2,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file='gtFine/cityscapes_panoptic_train.json',
        data_prefix=dict(img='leftImg8bit/train/', seg='gtFine/cityscapes_panoptic_train/'),
        pipeline=train_pipeline,
        backend_args=backend_args,
    ),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file='gtFine/cityscapes_panoptic_val.json',
        data_prefix=dict(img='leftImg8bit/val/', seg='gtFine/cityscapes_panoptic_val/'),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args,
    ),
)
test_dataloader = val_dataloader

# The ground truth comes from the JSON and its PNGs, as in the official evaluation.
val_evaluator = dict(
    type='effvision.PanopticQualityMetric',
    ann_file=data_root + 'gtFine/cityscapes_panoptic_val.json',
    seg_prefix=data_root + 'gtFine/cityscapes_panoptic_val/',
    backend_args=backend_args,
)
test_evaluator = val_evaluator
