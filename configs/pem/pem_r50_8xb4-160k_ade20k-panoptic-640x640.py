# PEM R50, ADE20K panoptic (NiccoloCavagnero/PEM configs/ade20k/panoptic-segmentation/
# pem_R50_bs32_160k.yaml): batch 32 (8 GPUs x 4), 160k iterations, AdamW 4e-4 cosine to 1e-6, no
# warmup, 640x640 crops of images whose short side is drawn from 320..1280 (long side <= 2560),
# SSD colour augmentation, frozen-BN ResNet (detectron2's default; the official config leaves
# SyncBN commented out), images padded to 640 as the official mapper does. Published: 38.5 PQ.
_base_ = [
    '../_base_/models/pem_r50_panoptic.py',
    '../_base_/datasets/ade20k_panoptic.py',
    '../_base_/schedules/pem_160k.py',
]
num_things_classes = 100
num_stuff_classes = 50
crop_size = (640, 640)
model = dict(
    data_preprocessor=dict(
        pad_size_divisor=1,
        batch_augments=[
            dict(
                type='BatchFixedSizePad',
                size=crop_size,
                img_pad_value=0,
                pad_mask=True,
                mask_pad_value=0,
                pad_seg=True,
                seg_pad_value=255,
            ),
        ],
    ),  # fmt: skip
    backbone=dict(norm_cfg=dict(type='BN', requires_grad=False), norm_eval=True),
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
    # detectron2's ResizeShortestEdge: keep_ratio with (max long side, short side) scales.
    dict(
        type='RandomChoiceResize',
        scales=[(2560, int(640 * x * 0.1)) for x in range(5, 21)],
        keep_ratio=True,
    ),
    dict(type='RandomCrop', crop_size=crop_size, crop_type='absolute', recompute_bbox=True,
         allow_negative_crop=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackDetInputs'),
]  # fmt: skip
train_dataloader = dict(batch_size=4, dataset=dict(pipeline=train_pipeline))
default_hooks = dict(visualization=dict(type='DetVisualizationHook'))
