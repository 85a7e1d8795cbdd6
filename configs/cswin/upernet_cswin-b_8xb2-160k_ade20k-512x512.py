# CSWin-B (ImageNet-1k) + UPerNet on ADE20K, official recipe (upernet_cswin_base.py): 51.1 mIoU
# single-scale, 52.2 ms+flip.
_base_ = ['./upernet_cswin-t_8xb2-160k_ade20k-512x512.py']
checkpoint_file = (
    'https://github.com/microsoft/CSWin-Transformer/releases/download/v0.1.0/cswin_base_224.pth'  # noqa: E501
)
model = dict(
    backbone=dict(
        arch='base',  # embed 96, depths 2-4-32-2, heads 4-8-16-32, stripes 1-2-7-7
        drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384),
)
