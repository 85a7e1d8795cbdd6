# kMaX-DeepLab on ResNet-50 as an mmdet panoptic model (bytedance/kmax-deeplab configs/coco/
# panoptic_segmentation/kmax_r50.yaml): images scaled to [-1, 1] and zero-padded to a fixed odd
# canvas (1281 x 1281), an R50 whose BN uses TF's eps 1e-3 / momentum 0.01, the published head
# (pixel decoder [1, 5, 1, 1] axial/axial/bottleneck/bottleneck with [512, 256, 128, 64] channels;
# 6 kMaX layers at strides 32/16/8; 128 queries; drop path 0.2; ASPP aux semantic head) and loss
# (PQ-style class 3 / dice 3, mask-ID 0.3, instance discrimination 1, aux semantic 1), kMaX's
# panoptic merging. Set the class split and thresholds in the dataset config.
_base_ = ['../det_runtime_iter.py']
canvas = (1281, 1281)
norm_cfg = dict(type='SyncBN', eps=1e-3, momentum=0.01, requires_grad=True)
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
    backbone=dict(
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        style='pytorch',  # STRIDE_IN_1X1 False
        norm_cfg=norm_cfg,
        norm_eval=False,
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50'),
    ),
    panoptic_head=dict(
        type='effvision.KMaXHead',
        in_channels=[256, 512, 1024, 2048],
        num_queries=128,
        pixel_decoder=dict(
            dec_layers=(1, 5, 1, 1),
            dec_channels=(512, 256, 128, 64),
            layer_types=('axial', 'axial', 'bottleneck', 'bottleneck'),
        ),
        transformer_decoder=dict(
            dec_layers=(2, 2, 2), drop_path_rate=0.2, aux_semantic_head='aspp'
        ),
        norm_cfg=norm_cfg,
        loss=dict(type='effvision.KMaXCriterion'),
    ),
    panoptic_fusion_head=dict(type='effvision.MaskClassificationFusionHead', rule='kmax'),
    train_cfg=None,
    test_cfg=dict(
        panoptic_on=True,
        semantic_on=True,
        thing_thr=0.7,
        stuff_thr=0.5,
        overlap_thr=0.8,
        pixel_confidence_thr=0.4,
        reorder_class_weight=1.0,
        reorder_mask_weight=1.0,
    ),
)
