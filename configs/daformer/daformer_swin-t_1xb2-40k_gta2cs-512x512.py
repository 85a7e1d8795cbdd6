# DAFormer's decoder and UDA training with effvision's Swin-T encoder (ImageNet-1k) instead of
# MiT-B5: same recipe, no published number (not an official configuration).
_base_ = ['./daformer_mit-b5_1xb2-40k_gta2cs-512x512.py']
checkpoint_file = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth'  # noqa: E501
model = dict(
    model=dict(
        backbone=dict(
            _delete_=True,
            type='Swin',
            arch='tiny',
            window_size=7,
            drop_path_rate=0.2,
            out_indices=(0, 1, 2, 3),
            init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
        ),
        decode_head=dict(in_channels=[96, 192, 384, 768]),
    )
)
