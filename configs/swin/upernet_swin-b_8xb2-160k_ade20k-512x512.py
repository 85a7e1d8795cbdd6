# Swin-B (ImageNet-1k) + UPerNet on ADE20K, official recipe: 48.13 mIoU single-scale, 49.72 ms+flip.
_base_ = ['./upernet_swin-t_8xb2-160k_ade20k-512x512.py']
checkpoint_file = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_base_patch4_window7_224.pth'  # noqa: E501
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512),
)
