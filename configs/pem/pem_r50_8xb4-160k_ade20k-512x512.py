# PEM R50, ADE20K semantic (NiccoloCavagnero/PEM configs/ade20k/semantic-segmentation/
# pem_R50_bs32_160k.yaml): batch 32 (8 GPUs x 4), 160k iterations, AdamW 4e-4 with cosine decay to
# 1e-6 and no warmup, 512x512 crops of images whose short side is drawn from 256..1024, SSD colour
# augmentation. The ResNet is frozen-BN as in the official ADE20K base config (its SyncBN line is
# commented out, so detectron2's FrozenBN default applies). Published: 45.5 mIoU.
_base_ = [
    '../_base_/models/pem_r50.py',
    '../_base_/datasets/ade20k.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/pem_160k.py',
]
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(norm_cfg=dict(type='BN', requires_grad=False), norm_eval=True),
    decode_head=dict(num_classes=150),
)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(
        type='RandomChoiceResize',
        scales=[int(512 * x * 0.1) for x in range(5, 21)],
        resize_type='ResizeShortestEdge',
        max_size=2048,
    ),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=1.0),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(batch_size=4, dataset=dict(pipeline=train_pipeline))
