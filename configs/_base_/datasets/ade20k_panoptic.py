# ADE20K panoptic (150 classes: 100 things, 50 stuff) in the layout of mmdet's
# ADE20KPanopticDataset (mmdet 3.x configs/_base_/datasets/ade20k_panoptic.py), for mmdet
# panoptic models (default_scope='mmdet', set by the model config):
#   data/ADEChallengeData2016/images/{training,validation}/*.jpg
#   data/ADEChallengeData2016/ade20k_panoptic_{train,val}.json
#   data/ADEChallengeData2016/ade20k_panoptic_{train,val}/*.png
# The JSON and PNGs are written by mmdet's converter (which lists the things first, as mmdet
# needs), from the scene-parsing release plus its instance annotations (annotations_instance/):
#   python tools/dataset_converters/ade20k2coco.py data/ADEChallengeData2016 --task panoptic
# (from the mmdet source tree; it imports panopticapi, needed for this conversion only). See
# docs/datasets/panoptic.md, also for a defect of that converter's thing boxes.
dataset_type = 'ADE20KPanopticDataset'
data_root = 'data/ADEChallengeData2016/'
backend_args = None
crop_size = (640, 640)

# Mask2Former's ADE20K recipe: short side 640 x [0.5, 2.0] (long side at most 4 x 640), 640 crop.
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='effvision.LoadCocoPanopticAnnotations', backend_args=backend_args),
    dict(type='RandomResize', scale=(2560, 640), ratio_range=(0.5, 2.0), keep_ratio=True),
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
    dict(type='Resize', scale=(2560, 640), keep_ratio=True),
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
        ann_file='ade20k_panoptic_train.json',
        data_prefix=dict(img='images/training/', seg='ade20k_panoptic_train/'),
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
        ann_file='ade20k_panoptic_val.json',
        data_prefix=dict(img='images/validation/', seg='ade20k_panoptic_val/'),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args,
    ),
)
test_dataloader = val_dataloader

val_evaluator = dict(
    type='effvision.PanopticQualityMetric',
    ann_file=data_root + 'ade20k_panoptic_val.json',
    seg_prefix=data_root + 'ade20k_panoptic_val/',
    backend_args=backend_args,
)
test_evaluator = val_evaluator
