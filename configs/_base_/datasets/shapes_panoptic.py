# The synthetic shapes set (effvision/datasets/synthetic.py) as COCO panoptic data, for mmdet
# panoptic models (default_scope='mmdet', set by the model config). Written by
#   python tools/dataset_converters/make_shapes.py --out data/shapes
# 400 training / 60 validation PNGs of 128x128; annotations/panoptic_{training,validation}.json
# and their PNGs. mmdet numbers the classes in the JSON's category order and wants thing labels
# below stuff labels, so `classes` lists the five things first (labels 0-4), then the four stuff
# classes (5-8): this is not the order of the semantic label maps (stuff first).
# effvision.ShapesPanopticDataset is mmdet's CocoPanopticDataset with this class order as its
# METAINFO, and it refuses a set written by an older generator (stuff-first JSON).
dataset_type = 'effvision.ShapesPanopticDataset'
data_root = 'data/shapes/'
crop_size = (128, 128)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='effvision.LoadCocoPanopticAnnotations'),
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.75, 1.5), keep_ratio=True),
    # Boxes from the cropped masks; a crop without things is a valid panoptic sample (stuff only).
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
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    # Annotations after Resize: PQ and mIoU compare predictions with the original-size maps.
    dict(type='effvision.LoadCocoPanopticAnnotations'),
    # seg_map_path and segments_info: the PQ metric reads the ground truth from the samples.
    dict(
        type='PackDetInputs',
        meta_keys=(
            'img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor', 'seg_map_path',
            'segments_info',
        ),
    ),
]  # fmt: skip
train_dataloader = dict(
    batch_size=8,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/panoptic_training.json',
        data_prefix=dict(img='images/training/', seg='annotations/panoptic_training/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=32),
        pipeline=train_pipeline,
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
        ann_file='annotations/panoptic_validation.json',
        data_prefix=dict(img='images/validation/', seg='annotations/panoptic_validation/'),
        test_mode=True,
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader

# PQ from pred_panoptic_seg, mIoU from pred_sem_seg (mmseg's IoUMetric reads the `data` field of
# mmseg samples; DetSemSegIoUMetric reads mmdet's `sem_seg` field too).
val_evaluator = [
    dict(type='effvision.PanopticQualityMetric'),
    dict(type='effvision.DetSemSegIoUMetric', iou_metrics=['mIoU']),
]
test_evaluator = val_evaluator
