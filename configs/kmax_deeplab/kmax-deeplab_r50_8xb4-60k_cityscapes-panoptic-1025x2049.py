# kMaX-DeepLab R50, Cityscapes panoptic (bytedance/kmax-deeplab configs/cityscapes/
# panoptic_segmentation/kmax_r50.yaml): batch 32 (8 GPUs x 4), 60k iterations, lr 3e-4, scale
# jitter 0.5-2.0 with 1025x2049 crops on the 1025x2049 canvas; 256 queries; a fifth pixel-decoder
# stage fed by the ResNet stem (the official feature order [res2, stem, res3, res4, res5], so
# official checkpoints load); the light aux semantic head (depthwise 5x5 + 1x1 on res5, plain
# cross-entropy on every pixel); instance discrimination sampling temperature 0.6; thresholds
# thing 0.5 / stuff 0.3 / overlap 0.9, ranking by class score only. Published (PyTorch
# re-implementation): 63.5 PQ, 79.5 mIoU; deeplab2 (TF): 64.3 PQ, 79.7 mIoU.
_base_ = [
    '../_base_/models/kmax-deeplab_r50_panoptic.py',
    '../_base_/datasets/cityscapes_panoptic.py',
    '../_base_/schedules/kmax_150k.py',
]
num_things_classes = 8
num_stuff_classes = 11
canvas = (1025, 2049)  # (H, W)
max_iters = 60000
model = dict(
    data_preprocessor=dict(canvas=canvas),
    backbone=dict(type='effvision.ResNetWithStem', stem_out_position=1),
    panoptic_head=dict(
        in_channels=[256, 64, 512, 1024, 2048],
        num_classes=num_things_classes + num_stuff_classes,
        num_things_classes=num_things_classes,
        num_stuff_classes=num_stuff_classes,
        num_queries=256,
        pixel_decoder=dict(
            dec_layers=(1, 5, 1, 1, 1),
            dec_channels=(512, 256, 128, 64, 32),
            layer_types=('axial', 'axial', 'bottleneck', 'bottleneck', 'bottleneck'),
        ),
        transformer_decoder=dict(aux_semantic_head='light'),
        loss=dict(
            insdis_sample_temperature=0.6,
            aux_semantic_sample_temperature=1.0,
            aux_semantic_sample_k=0,
        ),
    ),
    panoptic_fusion_head=dict(
        num_things_classes=num_things_classes, num_stuff_classes=num_stuff_classes
    ),
    test_cfg=dict(thing_thr=0.5, stuff_thr=0.3, overlap_thr=0.9, reorder_mask_weight=0.0),
)
# mmdet's Resize/RandomResize/RandomCrop sizes are (width, height)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='effvision.LoadCocoPanopticAnnotations'),
    dict(type='RandomResize', scale=canvas[::-1], ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=canvas[::-1], crop_type='absolute', recompute_bbox=True,
         allow_negative_crop=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]  # fmt: skip
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=canvas[::-1], keep_ratio=True),
    dict(type='effvision.LoadCocoPanopticAnnotations'),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'),
    ),
]
train_dataloader = dict(
    batch_size=4,
    dataset=dict(filter_cfg=dict(filter_empty_gt=True), pipeline=train_pipeline),
)
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=3e-4))
param_scheduler = [
    dict(type='effvision.DeepLabPolyLR', max_iters=max_iters, warmup_iters=5000, power=0.9),
]
train_cfg = dict(max_iters=max_iters)
