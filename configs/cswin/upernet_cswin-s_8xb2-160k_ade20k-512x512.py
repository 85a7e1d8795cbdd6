# CSWin-S + UPerNet on ADE20K, official recipe (upernet_cswin_small.py): 50.4 mIoU single-scale,
# 51.5 ms+flip.
_base_ = ['./upernet_cswin-t_8xb2-160k_ade20k-512x512.py']
checkpoint_file = (
    'https://github.com/microsoft/CSWin-Transformer/releases/download/v0.1.0/cswin_small_224.pth'  # noqa: E501
)
model = dict(
    backbone=dict(
        arch='small',  # embed 64, depths 2-4-32-2, heads 2-4-8-16, stripes 1-2-7-7
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256),
)
