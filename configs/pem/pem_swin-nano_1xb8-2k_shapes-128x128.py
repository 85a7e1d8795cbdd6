# PEM (semantic) on the synthetic shapes set: a narrow Swin + narrow PEM head from scratch, sized
# for CPU. Same code path as the ADE20K/Cityscapes semantic configs, only smaller.
_base_ = [
    '../_base_/models/pem_swin-nano_shapes.py',
    '../_base_/datasets/shapes.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/shapes_2k.py',
]
crop_size = (128, 128)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size,
    test_cfg=dict(size_divisor=32),
)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone={{_base_.backbone}},
    decode_head=dict(
        type='effvision.PEMHead',
        in_channels=[32, 64, 128, 256],
        num_classes=9,
        norm_cfg={{_base_.norm_cfg}},
        network={{_base_.pem_network}},
        loss={{_base_.pem_loss}},
    ),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'),
)
train_dataloader = dict(batch_size=8)
