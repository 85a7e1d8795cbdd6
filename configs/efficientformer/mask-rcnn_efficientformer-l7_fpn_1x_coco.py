# EfficientFormer-L7 + Mask R-CNN on COCO, the official 1x recipe (snap-research/EfficientFormer
# detection/configs/mask_rcnn_efficientformer_l7_fpn_1x_coco.py, mmdet 2.19, PVT/PoolFormer
# settings): single scale 1333x800, 8 GPUs x 2 images = batch 16, AdamW lr 2e-4 weight decay 0.0001,
# 500-iteration linear warmup from 1e-6, steps at epochs 8 and 11, 12 epochs. 42.6 box AP (paper,
# quoted by the Next-ViT README) / 39.0 mask AP (unverified); not reproduced here.
# Same recipe as L1; only the variant, its checkpoint and widths change.
_base_ = ['./mask-rcnn_efficientformer-l1_fpn_1x_coco.py']
checkpoint_file = 'checkpoints/efficientformer/efficientformer_l7_300d.pth'
model = dict(
    backbone=dict(arch='l7', init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
