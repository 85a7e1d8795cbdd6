# EfficientFormerV2-S0 + Semantic FPN on ADE20K, the official recipe (snap-research/EfficientFormer
# segmentation/configs/sem_fpn/fpn_efficientformerv2_s0_ade20k_40k.py, mmseg 0.19): as for v1 (batch
# 32, AdamW 2e-4, wd 1e-4, 40k iterations) but poly down to 1e-6, and the backbone's BatchNorms
# synchronised across GPUs (the official V2 backbone converts itself to SyncBN when it loads its
# ImageNet weights). Downstream numbers for S0 are not in the official repository.
_base_ = ['./fpn_efficientformer-l1_8xb4-40k_ade20k-512x512.py']
checkpoint_file = 'checkpoints/efficientformer/eformer_s0_450.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='EfficientFormerV2',
        arch='s0',
        attn_bias_size=512,  # the official segmentation backbone's resolution=512
        drop_path_rate=0.0,  # fixed per variant by the official *_feat classes
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    neck=dict(in_channels=[32, 48, 96, 176]),
)
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-6, power=0.9, begin=0, end=40000, by_epoch=False),
]
sync_bn = 'torch'
