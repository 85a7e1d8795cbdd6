# COCO panoptic 2017 in mmdet's layout (mmdet 3.x configs/_base_/datasets/coco_panoptic.py), for
# mmdet panoptic models (default_scope='mmdet', set by the model config):
#   data/coco/train2017/*.jpg, data/coco/val2017/*.jpg
#   data/coco/annotations/panoptic_{train,val}2017.json
#   data/coco/annotations/panoptic_{train,val}2017/*.png
# (panoptic_annotations_trainval2017.zip from cocodataset.org; unzip the two PNG archives inside
# it into annotations/). See docs/datasets/panoptic.md. mmdet's LoadPanopticAnnotations and
# CocoPanopticMetric need panopticapi; effvision's loader and PQ metric do not.
dataset_type = 'CocoPanopticDataset'
data_root = 'data/coco/'
backend_args = None

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='effvision.LoadCocoPanopticAnnotations', backend_args=backend_args),
    dict(type='Resize', scale=(1333, 800), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(1333, 800), keep_ratio=True),
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
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/panoptic_train2017.json',
        data_prefix=dict(img='train2017/', seg='annotations/panoptic_train2017/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=32),
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
        ann_file='annotations/panoptic_val2017.json',
        data_prefix=dict(img='val2017/', seg='annotations/panoptic_val2017/'),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args,
    ),
)
test_dataloader = val_dataloader

# The ground truth comes from the JSON and its PNGs, as in the official evaluation.
val_evaluator = dict(
    type='effvision.PanopticQualityMetric',
    ann_file=data_root + 'annotations/panoptic_val2017.json',
    seg_prefix=data_root + 'annotations/panoptic_val2017/',
    backend_args=backend_args,
)
test_evaluator = val_evaluator
