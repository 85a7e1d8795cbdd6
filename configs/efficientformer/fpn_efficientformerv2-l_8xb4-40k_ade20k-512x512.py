# EfficientFormerV2-L + Semantic FPN on ADE20K, the official recipe (sem_fpn/
# fpn_efficientformerv2_l_ade20k_40k.py; same schedule as S0). 45.2 mIoU in the paper (unverified
# here; not reproduced).
_base_ = ['./fpn_efficientformerv2-s0_8xb4-40k_ade20k-512x512.py']
checkpoint_file = 'checkpoints/efficientformer/eformer_l_450.pth'
model = dict(
    backbone=dict(
        arch='l',
        drop_path_rate=0.1,  # fixed per variant by the official *_feat classes
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    neck=dict(in_channels=[40, 80, 192, 384]),
)
