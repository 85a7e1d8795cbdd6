# BiFormer-B + Semantic FPN on ADE20K, the official recipe (rayleizhu/BiFormer
# semantic_segmentation/configs/ade20k/sfpn.biformer_base.py): 49.9 mIoU single-scale
# (semantic_segmentation/README.md). Same recipe as BiFormer-S, drop path 0.3.
_base_ = ['./fpn_biformer-s_8xb4-80k_ade20k-512x512.py']
checkpoint_file = 'checkpoints/biformer_base_in1k.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
