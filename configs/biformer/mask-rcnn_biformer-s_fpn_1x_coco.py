# BiFormer-S + Mask R-CNN on COCO, the official 1x recipe (rayleizhu/BiFormer
# object_detection/configs/coco/maskrcnn.1x.biformer_small.py, which follows UniFormer): 47.8 box
# AP / 43.2 mask AP in the paper, 48.1 / 43.6 reproduced at code release
# (object_detection/README.md).
# Single-scale 1333x800 training, 8 GPUs x 2 images = batch 16, AdamW 1e-4 (betas 0.9/0.999,
# weight decay 0.05, none on norms), 500-iteration linear warmup from 0.001, steps at epochs 8
# and 11; the backbone keeps its BatchNorm statistics frozen (norm_eval, the official detection
# default) and trains everything else; n_win=16 regions per side, drop path 0.2, output LayerNorms.
# The official run used fp16 (mmcv's Fp16OptimizerHook, static loss scale 512): on GPUs add
# `optim_wrapper=dict(type='AmpOptimWrapper', loss_scale=512.0)` (mmengine refuses AMP on CPU).
_base_ = [
    '../_base_/models/mask-rcnn_fpn.py',
    '../_base_/datasets/coco_instance.py',
    '../_base_/schedules/schedule_1x.py',
    '../_base_/det_runtime.py',
]
# The official ImageNet-1K checkpoint (OneDrive, see docs/models/biformer.md for the download);
# its classifier norm and head are dropped on load.
checkpoint_file = 'checkpoints/biformer_small_in1k.pth'
model = dict(
    backbone=dict(
        type='effvision.BiFormer',
        arch='small',
        n_win=16,
        topks=(1, 4, 16, -2),
        drop_path_rate=0.2,
        frozen_stages=-1,
        norm_eval=True,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    neck=dict(in_channels=[64, 128, 256, 512]),
)
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.0),
            'relative_position_bias_table': dict(decay_mult=0.0),
            'norm': dict(decay_mult=0.0),
        }
    ),
)
default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=1))
