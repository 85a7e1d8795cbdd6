# Next-ViT-S + Mask R-CNN on COCO, the official 3x recipe (bytedance/Next-ViT
# detection/configs/mask_rcnn_nextvit_small_3x.py): 48.0 box AP / 43.2 mask AP (README).
# As the 1x recipe with DETR-style multi-scale (480-800) + random-crop training, 36 epochs with
# steps at epochs 27 and 33, and no decay on parameters named *norm* (the 3x config lists no 'bn').
# The official run used fp16 with a static loss scale of 512: on GPUs add
# `optim_wrapper=dict(type='AmpOptimWrapper', loss_scale=512.0)` (mmengine refuses AMP on CPU).
_base_ = [
    '../_base_/models/mask-rcnn_fpn.py',
    '../_base_/datasets/coco_instance_ms-crop.py',
    '../_base_/schedules/schedule_3x.py',
    '../_base_/det_runtime.py',
]
# The official ImageNet-1K checkpoint (Google Drive only, see docs/models/nextvit.md); its final
# norm and classifier are dropped on load.
checkpoint_file = 'checkpoints/nextvit_small_in1k_224.pth'
model = dict(
    backbone=dict(
        type='effvision.NextViT',
        arch='small',
        drop_path_rate=0.1,  # detection/nextvit.py: 0.1 for S, 0.2 for B and L
        with_extra_norm=False,
        frozen_stages=1,
        norm_eval=True,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    neck=dict(in_channels=[96, 256, 512, 1024]),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=36, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.0)}),
)
