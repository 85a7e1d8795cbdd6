# PEM on torchvision's ResNet-50 as an mmdet panoptic model: the published head (see pem_r50.py)
# as the panoptic head of effvision.PanopticMaskClassifier, with Mask2Former's panoptic merging
# (object score > 0.8, a query keeps its pixels when it wins >= 0.8 of its own mask), as the
# official MaskFormer meta-architecture of NiccoloCavagnero/PEM does. Set num_things_classes /
# num_stuff_classes in the dataset config that uses it.
_base_ = ['../det_runtime_iter.py']
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='effvision.PanopticMaskClassifier',
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=32,
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
        style='pytorch',
        norm_cfg=norm_cfg,
        norm_eval=False,
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50'),
    ),
    panoptic_head=dict(
        type='effvision.PEMHead',
        in_channels=[256, 512, 1024, 2048],
        norm_cfg=norm_cfg,
        loss=dict(type='effvision.Mask2FormerCriterion'),
    ),
    panoptic_fusion_head=dict(type='effvision.MaskClassificationFusionHead', rule='maskformer'),
    train_cfg=None,
    test_cfg=dict(panoptic_on=True, semantic_on=True, object_mask_thr=0.8, iou_thr=0.8),
)
