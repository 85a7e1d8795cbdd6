# BiFormer-B + Mask R-CNN on COCO, the official 1x recipe (rayleizhu/BiFormer
# object_detection/configs/coco/maskrcnn.1x.biformer_base.py): 48.6 box AP / 43.7 mask AP
# (object_detection/README.md). Same recipe as BiFormer-S, drop path 0.3.
_base_ = ['./mask-rcnn_biformer-s_fpn_1x_coco.py']
checkpoint_file = 'checkpoints/biformer_base_in1k.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
