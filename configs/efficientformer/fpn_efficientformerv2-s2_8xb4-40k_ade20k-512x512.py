# EfficientFormerV2-S2 + Semantic FPN on ADE20K, the official recipe (sem_fpn/
# fpn_efficientformerv2_s2_ade20k_40k.py; same schedule as S0). 42.4 mIoU in the paper (quoted by
# PaddleSeg's EfficientFormerV2 README); not reproduced here.
_base_ = ['./fpn_efficientformerv2-s0_8xb4-40k_ade20k-512x512.py']
checkpoint_file = 'checkpoints/efficientformer/eformer_s2_450.pth'
model = dict(
    backbone=dict(
        arch='s2',
        drop_path_rate=0.02,  # fixed per variant by the official *_feat classes
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    neck=dict(in_channels=[32, 64, 144, 288]),
)
