# kMaX-DeepLab R50, ADE20K panoptic (bytedance/kmax-deeplab configs/ade20k/panoptic_segmentation/
# kmax_r50.yaml): batch 64 (8 GPUs x 8), 100k iterations, scale jitter 0.5-2.0 with 1281x1281
# crops, no drop path, thresholds thing 0.4 / stuff 0.4 / overlap 0.8. Published (PyTorch
# re-implementation): 42.2 PQ; deeplab2 (TF, 1281): 42.3 PQ, 45.3 mIoU.
_base_ = [
    '../_base_/models/kmax-deeplab_r50_panoptic.py',
    '../_base_/datasets/ade20k_panoptic.py',
    '../_base_/schedules/kmax_150k.py',
]
num_things_classes = 100
num_stuff_classes = 50
canvas = (1281, 1281)
max_iters = 100000
model = dict(
    panoptic_head=dict(
        num_classes=num_things_classes + num_stuff_classes,
        num_things_classes=num_things_classes,
        num_stuff_classes=num_stuff_classes,
        transformer_decoder=dict(drop_path_rate=0.0),
    ),
    panoptic_fusion_head=dict(
        num_things_classes=num_things_classes, num_stuff_classes=num_stuff_classes
    ),
    test_cfg=dict(thing_thr=0.4, stuff_thr=0.4, overlap_thr=0.8),
)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='effvision.LoadCocoPanopticAnnotations'),
    dict(type='RandomResize', scale=canvas, ratio_range=(0.5, 2.0), keep_ratio=True),
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
train_dataloader = dict(batch_size=8, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
param_scheduler = [
    dict(type='effvision.DeepLabPolyLR', max_iters=max_iters, warmup_iters=5000, power=0.9),
]
train_cfg = dict(max_iters=max_iters)
