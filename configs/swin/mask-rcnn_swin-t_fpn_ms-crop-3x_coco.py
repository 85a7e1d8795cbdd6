# Swin-T + Mask R-CNN on COCO, the official 3x recipe (..._mstrain_480-800_adamw_3x_coco.py):
# 46.0 box AP / 41.6 mask AP. Same as the 1x recipe with 36 epochs, steps at 27 and 33.
_base_ = ['./mask-rcnn_swin-t_fpn_ms-crop-1x_coco.py']
train_cfg = dict(max_epochs=36)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=36, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
