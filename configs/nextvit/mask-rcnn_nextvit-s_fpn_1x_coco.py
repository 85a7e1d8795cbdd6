# Next-ViT-S + Mask R-CNN on COCO, the official 1x recipe (bytedance/Next-ViT
# detection/configs/mask_rcnn_nextvit_small_1x.py): 45.9 box AP / 41.8 mask AP; 51.8 M parameters,
# 290 GFLOPs (README). Single-scale 1333x800 training, AdamW 1e-4 wd 0.05 with no decay on norms,
# 500-iteration linear warmup, steps at epochs 8 and 11, batch 16 (8 GPUs x 2); the backbone keeps
# its BatchNorms frozen (norm_eval) with the stem and stage 1 frozen, and has no extra norms.
# The official run used fp16 with a static loss scale of 512: on GPUs add
# `optim_wrapper=dict(type='AmpOptimWrapper', loss_scale=512.0)` (mmengine refuses AMP on CPU).
_base_ = [
    '../_base_/models/mask-rcnn_fpn.py',
    '../_base_/datasets/coco_instance.py',
    '../_base_/schedules/schedule_1x.py',
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
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'bn': dict(decay_mult=0.0), 'norm': dict(decay_mult=0.0)}),
)
