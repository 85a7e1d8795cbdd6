# PEM on torchvision's ResNet-50 as an mmseg EncoderDecoder (semantic segmentation), the published
# head of NiccoloCavagnero/PEM (configs/*/semantic-segmentation/pem_R50_bs32_*.yaml): 128-channel
# deformable FPN, mask features 256, 100 queries, 6 decoder layers (+ the prediction on the
# initial queries), 8 heads, FFN 2048, pre-norm; Mask2Former losses (class 2 with no-object 0.1,
# mask 5, dice 5, 12544 points, oversample 3, importance 0.75). Head norms are SyncBN as published.
norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    test_cfg=dict(size_divisor=32),  # the official meta-architecture pads to 32 at test time
)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        style='pytorch',  # torchvision's R-50 (stride in the 3x3 conv, STRIDE_IN_1X1 False)
        norm_cfg=norm_cfg,
        norm_eval=False,
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50'),
    ),
    decode_head=dict(
        type='effvision.PEMHead',
        in_channels=[256, 512, 1024, 2048],
        num_classes=150,
        norm_cfg=norm_cfg,
        loss=dict(type='effvision.Mask2FormerCriterion'),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'),
)
