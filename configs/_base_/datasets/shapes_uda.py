# The synthetic shapes set in two domains, for unsupervised domain adaptation:
#   python tools/dataset_converters/make_shapes.py --out data/shapes                # source
#   python tools/dataset_converters/make_shapes.py --out data/shapes_target --domain target --seed 1
# Same kind of scenes and labels, another look (docs/datasets/shapes.md). Training on the source
# (train_dataloader, source-only; UDA configs pair it with target_train), evaluation on the target.
crop_size = (128, 128)
source_root = 'data/shapes'
target_root = 'data/shapes_target'
# DAFormer's source pipeline: no photometric augmentation (the UDA model applies its own)
source_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
target_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),  # packed like the source sample; a UDA model never reads it
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
source_train = dict(
    type='ShapesDataset',
    data_root=source_root,
    data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
    pipeline=source_pipeline,
)
target_train = dict(
    type='ShapesDataset',
    data_root=target_root,
    data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
    pipeline=target_pipeline,
)
train_dataloader = dict(
    batch_size=4,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=source_train,
)
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type='ShapesDataset',
        data_root=target_root,
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
