# DAFormer (lhoyer/DAFormer: configs/_base_/models/daformer_sepaspp_mitb5.py,
# configs/_base_/uda/dacs_a999_fdthings.py and the final gta2cs config). MiT-B5 encoder,
# DAFormerHead with the separable-ASPP context fusion, wrapped in DACS self-training with
# DAFormer's settings: alpha 0.999, thing-class ImageNet feature distance, pseudo-label crop.
# The student is evaluated.
norm_cfg = dict(type='BN', requires_grad=True)  # single process, as the official training
data_preprocessor = dict(
    type='UDADataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=(512, 512),
)
# ImageNet-1k MiT-B5 (NVlabs' weights in mmseg's layout, as mmseg's SegFormer configs load them)
checkpoint_file = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/segformer/mit_b5_20220624-658746d9.pth'  # noqa: E501
segmentor = dict(
    type='EncoderDecoder',
    backbone=dict(
        type='MixVisionTransformer',
        in_channels=3,
        embed_dims=64,
        num_stages=4,
        num_layers=[3, 6, 40, 3],
        num_heads=[1, 2, 5, 8],
        patch_sizes=[7, 3, 3, 3],
        sr_ratios=[8, 4, 2, 1],
        out_indices=(0, 1, 2, 3),
        mlp_ratio=4,
        qkv_bias=True,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    decode_head=dict(
        type='DAFormerHead',
        in_channels=[64, 128, 320, 512],
        in_index=[0, 1, 2, 3],
        channels=256,
        dropout_ratio=0.1,
        num_classes=19,
        norm_cfg=norm_cfg,
        align_corners=False,
        embed_dims=256,
        embed_cfg=dict(type='mlp'),
        fusion_cfg=dict(type='aspp', sep=True, dilations=(1, 6, 12, 18), pool=False),
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'),
)
model = dict(
    type='DACS',
    data_preprocessor=data_preprocessor,
    model=segmentor,
    alpha=0.999,
    pseudo_threshold=0.968,
    pseudo_weight_ignore_top=15,
    pseudo_weight_ignore_bottom=120,
    imnet_feature_dist_lambda=0.005,
    imnet_feature_dist_classes=[6, 7, 11, 12, 13, 14, 15, 16, 17, 18],
    imnet_feature_dist_scale_min_ratio=0.75,
    mix='class',
    blur=True,
    color_jitter_strength=0.2,
    color_jitter_probability=0.2,
    mask_consistency=None,  # MIC: dict(mask_ratio=0.7, block_size=64, loss_weight=1.0)
)
