# EfficientFormer-L3 + Semantic FPN on ADE20K, the official recipe (sem_fpn/
# fpn_efficientformer_l3_ade20k_40k.py; same schedule as L1). 43.5 mIoU in the paper (unverified
# here; not reproduced).
_base_ = ['./fpn_efficientformer-l1_8xb4-40k_ade20k-512x512.py']
checkpoint_file = 'checkpoints/efficientformer/efficientformer_l3_300d.pth'
model = dict(
    backbone=dict(arch='l3', init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[64, 128, 320, 512]),
)
