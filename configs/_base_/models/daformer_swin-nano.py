# A narrow Swin (the quickstart's) with DAFormer's head, for the UDA demo on the synthetic shapes
# domains: `segmentor` is the network, `model` the plain EncoderDecoder (source-only training);
# the UDA config nests `segmentor` in DACS.
_crop = (128, 128)  # the datasets base defines crop_size
num_classes = 9
norm_cfg = dict(type='BN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=_crop,
)
segmentor = dict(
    type='EncoderDecoder',
    backbone=dict(
        type='Swin',
        arch=None,
        embed_dim=32,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        window_size=8,
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
    ),
    decode_head=dict(
        type='DAFormerHead',
        in_channels=[32, 64, 128, 256],
        in_index=[0, 1, 2, 3],
        channels=64,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        embed_dims=64,
        fusion_cfg=dict(type='aspp', sep=True, dilations=(1, 6, 12, 18), pool=False),
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'),
)
model = dict(data_preprocessor=data_preprocessor, **segmentor)
