# kMaX-DeepLab (semantic) on the synthetic shapes set: a narrow Swin + small kMaX head from
# scratch, sized for CPU. Inputs scaled to [-1, 1] as kMaX-DeepLab does.
_base_ = [
    '../_base_/models/kmax-deeplab_swin-nano_shapes.py',
    '../_base_/datasets/shapes.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/shapes_2k.py',
]
crop_size = (128, 128)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(
        type='SegDataPreProcessor',
        mean=[127.5, 127.5, 127.5],
        std=[127.5, 127.5, 127.5],
        bgr_to_rgb=True,
        pad_val=0,
        seg_pad_val=255,
        size=crop_size,
        test_cfg=dict(size=crop_size),
    ),
    backbone={{_base_.backbone}},
    decode_head=dict(
        type='effvision.KMaXHead',
        in_channels=[32, 64, 128, 256],
        num_classes=9,
        num_queries=24,
        pixel_decoder={{_base_.kmax_pixel_decoder}},
        transformer_decoder={{_base_.kmax_transformer_decoder}},
        norm_cfg={{_base_.norm_cfg}},
        loss={{_base_.kmax_loss}},
    ),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'),
)
train_dataloader = dict(batch_size=8)
