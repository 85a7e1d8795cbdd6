# BiFormer-B + UPerNet on ADE20K, the official recipe (rayleizhu/BiFormer
# semantic_segmentation/configs/ade20k/upernet.biformer_base.py): 51.0 mIoU single-scale, 51.7
# multi-scale + flip (semantic_segmentation/README.md). Same recipe as BiFormer-S, drop path 0.4.
_base_ = ['./upernet_biformer-s_8xb2-160k_ade20k-512x512.py']
checkpoint_file = 'checkpoints/biformer_base_in1k.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384),
)
