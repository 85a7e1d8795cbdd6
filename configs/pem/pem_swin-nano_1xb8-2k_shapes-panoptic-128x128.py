# PEM (panoptic) on the synthetic shapes set: the narrow Swin + PEM head of the semantic config as
# an mmdet panoptic model, evaluated with PQ and mIoU. Labels put the 5 things before the 4 stuff
# classes (configs/_base_/datasets/shapes_panoptic.py).
_base_ = [
    '../_base_/models/pem_swin-nano_shapes.py',
    '../_base_/datasets/shapes_panoptic.py',
    '../_base_/det_runtime_iter.py',
    '../_base_/schedules/shapes_2k.py',
]
num_things_classes = 5
num_stuff_classes = 4
data_preprocessor = dict(
    type='DetDataPreprocessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_size_divisor=32,
    pad_mask=True,
    mask_pad_value=0,
    pad_seg=True,
    seg_pad_value=255,
)
model = dict(
    type='effvision.PanopticMaskClassifier',
    data_preprocessor=data_preprocessor,
    backbone={{_base_.backbone}},
    panoptic_head=dict(
        type='effvision.PEMHead',
        in_channels=[32, 64, 128, 256],
        num_classes=num_things_classes + num_stuff_classes,
        num_things_classes=num_things_classes,
        num_stuff_classes=num_stuff_classes,
        norm_cfg={{_base_.norm_cfg}},
        network={{_base_.pem_network}},
        loss={{_base_.pem_loss}},
    ),
    panoptic_fusion_head=dict(
        type='effvision.MaskClassificationFusionHead',
        num_things_classes=num_things_classes,
        num_stuff_classes=num_stuff_classes,
        rule='maskformer',
    ),
    train_cfg=None,
    test_cfg=dict(panoptic_on=True, semantic_on=True, object_mask_thr=0.8, iou_thr=0.8),
)
train_dataloader = dict(batch_size=8)
default_hooks = dict(visualization=dict(type='DetVisualizationHook'))
