# EfficientFormer-L1 + Semantic FPN on ADE20K, the official recipe (snap-research/EfficientFormer
# segmentation/configs/sem_fpn/fpn_efficientformer_l1_ade20k_40k.py, mmseg 0.19): 8 GPUs x 4 images
# = batch 32, 512x512 crops, AdamW lr 2e-4 weight decay 1e-4, poly (power 0.9, min lr 0), 40k
# iterations, no warmup; tested at (2048, 512) resized to multiples of 32 (the official
# AlignResize). 38.9 mIoU in the paper (unverified here; not reproduced).
_base_ = [
    '../_base_/models/fpn.py',
    '../_base_/datasets/ade20k.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_40k.py',
]
# The official ImageNet-1k checkpoint (300 epochs), loaded in its own format and converted on load;
# download it from the official README (docs/models/efficientformer.md) to this path.
checkpoint_file = 'checkpoints/efficientformer/efficientformer_l1_300d.pth'
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='EfficientFormer',
        arch='l1',
        attn_bias_size=512,  # the official segmentation backbone's 16x16 bias grid
        drop_path_rate=0.0,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    neck=dict(in_channels=[48, 96, 224, 448]),
    decode_head=dict(num_classes=150),
)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0002, betas=(0.9, 0.999), weight_decay=0.0001),
)
param_scheduler = [
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=40000, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=40000, val_interval=4000)
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=4000))
train_dataloader = dict(batch_size=4)
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='ResizeToMultiple', size_divisor=32),  # = the official AlignResize(size_divisor=32)
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
val_dataloader = dict(batch_size=1, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
