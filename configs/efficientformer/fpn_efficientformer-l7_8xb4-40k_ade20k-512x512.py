# EfficientFormer-L7 + Semantic FPN on ADE20K, the official recipe (sem_fpn/
# fpn_efficientformer_l7_ade20k_40k.py; same schedule as L1). 45.1 mIoU (paper, quoted by the
# Next-ViT README; not reproduced here).
_base_ = ['./fpn_efficientformer-l1_8xb4-40k_ade20k-512x512.py']
checkpoint_file = 'checkpoints/efficientformer/efficientformer_l7_300d.pth'
model = dict(
    backbone=dict(arch='l7', init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
