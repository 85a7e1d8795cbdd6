# EfficientFormerV2-L + Mask R-CNN on COCO, the official 1x recipe (snap-research/EfficientFormer
# detection/configs/mask_rcnn_efficientformerv2_l_fpn_1x_coco.py, mmdet 2.19, PVT/PoolFormer
# settings): single scale 1333x800, 8 GPUs x 2 images = batch 16, AdamW lr 2e-4 weight decay 0.05
# (0.0001 for v1), 500-iteration linear warmup from 1e-6, steps at epochs 8 and 11, 12 epochs. 44.7
# box AP / 40.4 mask AP in the paper (unverified here; not reproduced).
# Same recipe as S0; only the variant, its checkpoint, drop-path rate and widths change.
_base_ = ['./mask-rcnn_efficientformerv2-s0_fpn_1x_coco.py']
checkpoint_file = 'checkpoints/efficientformer/eformer_l_450.pth'
model = dict(
    backbone=dict(
        arch='l',
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    neck=dict(in_channels=[40, 80, 192, 384]),
)
