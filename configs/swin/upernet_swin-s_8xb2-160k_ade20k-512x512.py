# Swin-S + UPerNet on ADE20K, official recipe: 47.64 mIoU single-scale, 49.47 ms+flip.
_base_ = ['./upernet_swin-t_8xb2-160k_ade20k-512x512.py']
checkpoint_file = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_small_patch4_window7_224.pth'  # noqa: E501
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384),
)
