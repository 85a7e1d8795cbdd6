# PEM R50, Cityscapes semantic (NiccoloCavagnero/PEM configs/cityscapes/semantic-segmentation/
# pem_R50_bs32_90k.yaml): batch 32 (8 GPUs x 4), 90k iterations, AdamW 7e-4 with cosine decay to
# 0 and no warmup, 512x1024 crops of images whose short side is drawn from 512..2048, SSD colour
# augmentation, SyncBN ResNet. Whole-image inference at 1024x2048. Published: 79.9 mIoU.
_base_ = [
    '../_base_/models/pem_r50.py',
    '../_base_/datasets/cityscapes.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/pem_90k.py',
]
crop_size = (512, 1024)
model = dict(data_preprocessor=dict(size=crop_size), decode_head=dict(num_classes=19))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(
        type='RandomChoiceResize',
        scales=[int(1024 * x * 0.1) for x in range(5, 21)],
        resize_type='ResizeShortestEdge',
        max_size=4096,
    ),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=1.0),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(batch_size=4, dataset=dict(pipeline=train_pipeline))
