# Swin-T + UPerNet with an FCN auxiliary head (Swin-Transformer-Semantic-Segmentation recipe).
_base_ = ['./upernet.py']
model = dict(
    backbone=dict(
        type='Swin',
        arch='tiny',
        window_size=7,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.3,
        ape=False,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384),
)
