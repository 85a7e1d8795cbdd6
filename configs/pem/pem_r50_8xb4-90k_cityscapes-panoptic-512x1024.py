# PEM R50, Cityscapes panoptic (NiccoloCavagnero/PEM configs/cityscapes/panoptic-segmentation/
# pem_R50_bs32_90k.yaml): batch 32 (8 GPUs x 4), 90k iterations, AdamW 7e-4 cosine to 0, no
# warmup, 512x1024 crops of images whose short side is drawn from 512..2048 (long side <= 4096),
# SSD colour augmentation, SyncBN ResNet; tested at 1024x2048. Published: 61.1 PQ.
# Data: tools/dataset_converters/cityscapes_panoptic.py (docs/datasets/panoptic.md).
_base_ = [
    '../_base_/models/pem_r50_panoptic.py',
    '../_base_/datasets/cityscapes_panoptic.py',
    '../_base_/schedules/pem_90k.py',
]
num_things_classes = 8
num_stuff_classes = 11
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
    dict(
        type='RandomChoiceResize',
        scales=[(4096, int(1024 * x * 0.1)) for x in range(5, 21)],
        keep_ratio=True,
    ),
    # mmdet's RandomCrop takes (width, height)
    dict(type='RandomCrop', crop_size=(1024, 512), crop_type='absolute', recompute_bbox=True,
         allow_negative_crop=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackDetInputs'),
]  # fmt: skip
train_dataloader = dict(batch_size=4, dataset=dict(pipeline=train_pipeline))
default_hooks = dict(visualization=dict(type='DetVisualizationHook'))
