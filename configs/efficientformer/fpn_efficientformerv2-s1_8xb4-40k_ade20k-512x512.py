# EfficientFormerV2-S1 + Semantic FPN on ADE20K, the official recipe (sem_fpn/
# fpn_efficientformerv2_s1_ade20k_40k.py; same schedule as S0). Downstream numbers for S1 are not in
# the official repository.
_base_ = ['./fpn_efficientformerv2-s0_8xb4-40k_ade20k-512x512.py']
checkpoint_file = 'checkpoints/efficientformer/eformer_s1_450.pth'
model = dict(
    backbone=dict(
        arch='s1',
        drop_path_rate=0.0,  # fixed per variant by the official *_feat classes
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    neck=dict(in_channels=[32, 48, 120, 224]),
)
