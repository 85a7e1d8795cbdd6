# EfficientFormer-L7 + Mask R-CNN on COCO, the official 1x recipe (snap-research/EfficientFormer
# detection/configs/mask_rcnn_efficientformer_l7_fpn_1x_coco.py, mmdet 2.19, PVT/PoolFormer
# settings): single scale 1333x800, 8 GPUs x 2 images = batch 16, AdamW lr 2e-4 weight decay 0.0001,
# 500-iteration linear warmup from 1e-6, steps at epochs 8 and 11, 12 epochs. 42.6 box AP (paper,
# quoted by the Next-ViT README) / 39.0 mask AP (unverified); not reproduced here.
_base_ = [
    '../_base_/models/mask-rcnn_fpn.py',
    '../_base_/datasets/coco_instance.py',
    '../_base_/schedules/schedule_1x.py',
    '../_base_/det_runtime.py',
]
# The official ImageNet-1k checkpoint, loaded in its own format and converted on load; download it
# from the official README (docs/models/efficientformer.md) to this path.
checkpoint_file = 'checkpoints/efficientformer/efficientformer_l7_300d.pth'
model = dict(
    backbone=dict(
        type='effvision.EfficientFormer',
        arch='l7',
        attn_bias_size=800,  # the official detection backbone's bias grid (1333x800 inputs)
        drop_path_rate=0.0,
        out_indices=(0, 1, 2, 3),
        # the official config's ResNet leftovers (frozen_stages=1, norm_eval=True) are swallowed
        # by the official backbone's **kwargs: nothing is frozen and BatchNorms train
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0002, betas=(0.9, 0.999), weight_decay=0.0001),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
train_dataloader = dict(batch_size=2)
