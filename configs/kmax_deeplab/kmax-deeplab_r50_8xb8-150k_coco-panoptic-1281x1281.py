# kMaX-DeepLab R50, COCO panoptic (bytedance/kmax-deeplab configs/coco/panoptic_segmentation/
# kmax_r50.yaml): batch 64 (8 GPUs x 8), 150k iterations, large-scale jitter 0.2-2.0 with
# 1281x1281 crops, test images resized to a 1281 long side and padded to the 1281x1281 canvas;
# thresholds thing 0.7 / stuff 0.5 / overlap 0.8. Published (PyTorch re-implementation):
# 53.3 PQ; deeplab2 (TF): 53.0.
_base_ = [
    '../_base_/models/kmax-deeplab_r50_panoptic.py',
    '../_base_/datasets/coco_panoptic.py',
    '../_base_/schedules/kmax_150k.py',
]
num_things_classes = 80
num_stuff_classes = 53
canvas = (1281, 1281)
model = dict(
    panoptic_head=dict(
        num_classes=num_things_classes + num_stuff_classes,
        num_things_classes=num_things_classes,
        num_stuff_classes=num_stuff_classes,
    ),
    panoptic_fusion_head=dict(
        num_things_classes=num_things_classes, num_stuff_classes=num_stuff_classes
    ),
)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='effvision.LoadCocoPanopticAnnotations'),
    dict(type='RandomResize', scale=canvas, ratio_range=(0.2, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=canvas, crop_type='absolute', recompute_bbox=True,
         allow_negative_crop=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]  # fmt: skip
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=canvas, keep_ratio=True),
    dict(type='effvision.LoadCocoPanopticAnnotations'),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'),
    ),
]
train_dataloader = dict(
    batch_size=8,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(filter_cfg=dict(filter_empty_gt=True), pipeline=train_pipeline),
)
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
