# kMaX-DeepLab (panoptic) on the synthetic shapes set: the narrow Swin + small kMaX head of the
# semantic config as an mmdet panoptic model, evaluated with PQ and mIoU; kMaX's merging with
# COCO's thresholds. Labels put the 5 things before the 4 stuff classes.
_base_ = [
    '../_base_/models/kmax-deeplab_swin-nano_shapes.py',
    '../_base_/datasets/shapes_panoptic.py',
    '../_base_/det_runtime_iter.py',
    '../_base_/schedules/shapes_2k.py',
]
num_things_classes = 5
num_stuff_classes = 4
canvas = (128, 128)
model = dict(
    type='effvision.PanopticMaskClassifier',
    data_preprocessor=dict(
        type='effvision.CanvasDetDataPreprocessor',
        canvas=canvas,
        mean=[127.5, 127.5, 127.5],
        std=[127.5, 127.5, 127.5],
        bgr_to_rgb=True,
        pad_size_divisor=1,
        pad_mask=True,
        mask_pad_value=0,
        pad_seg=True,
        seg_pad_value=255,
    ),
    backbone={{_base_.backbone}},
    panoptic_head=dict(
        type='effvision.KMaXHead',
        in_channels=[32, 64, 128, 256],
        num_classes=num_things_classes + num_stuff_classes,
        num_things_classes=num_things_classes,
        num_stuff_classes=num_stuff_classes,
        num_queries=24,
        pixel_decoder={{_base_.kmax_pixel_decoder}},
        transformer_decoder={{_base_.kmax_transformer_decoder}},
        norm_cfg={{_base_.norm_cfg}},
        loss={{_base_.kmax_loss}},
    ),
    panoptic_fusion_head=dict(
        type='effvision.MaskClassificationFusionHead',
        num_things_classes=num_things_classes,
        num_stuff_classes=num_stuff_classes,
        rule='kmax',
    ),
    train_cfg=None,
    test_cfg=dict(panoptic_on=True, semantic_on=True, thing_thr=0.7, stuff_thr=0.5,
                  overlap_thr=0.8),
)  # fmt: skip
train_dataloader = dict(batch_size=8)
default_hooks = dict(visualization=dict(type='DetVisualizationHook'))
