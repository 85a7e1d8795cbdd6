# BiFormer-S + Semantic FPN on ADE20K, the official recipe the README calls "S-FPN 80K"
# (rayleizhu/BiFormer semantic_segmentation/configs/ade20k/sfpn.biformer_small.py, which follows
# UniFormer): 48.9 mIoU single-scale (semantic_segmentation/README.md).
# 8 GPUs x 4 images = batch 32 for 160000 // 2 = 80k iterations, AdamW lr 1e-4 * 2 = 2e-4 (betas
# 0.9/0.999), weight decay 1e-4 on every parameter, 1000-iteration linear warmup from 0.1 on top of
# cosine annealing to 1e-8 x lr over all 80k iterations, evaluation and checkpoints every 4000,
# SyncBN in the backbone, n_win=8, drop path 0.15, output LayerNorms. Test images are resized to
# the short side 512 and then to a multiple of 32 (the official AlignResize).
# The official run used fp16 with a static loss scale of 512: on GPUs add
# `optim_wrapper=dict(type='AmpOptimWrapper', loss_scale=512.0)` (mmengine refuses AMP on CPU).
_base_ = [
    '../_base_/models/fpn.py',
    '../_base_/datasets/ade20k.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_80k.py',
]
# The official ImageNet-1K checkpoint (OneDrive, see docs/models/biformer.md for the download),
# loaded in its own format: converted on load, its classifier norm and head dropped.
checkpoint_file = 'checkpoints/biformer_small_in1k.pth'
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='BiFormer',
        arch='small',
        n_win=8,
        topks=(1, 4, 16, -2),
        drop_path_rate=0.15,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        frozen_stages=-1,
        norm_eval=False,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    neck=dict(in_channels=[64, 128, 256, 512]),
    decode_head=dict(num_classes=150),
)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=1e-4),
    clip_grad=None,
)
# mmcv's CosineAnnealing policy with linear warmup: the cosine runs over all 80k iterations
# (min_lr_ratio 1e-8) and the warmup factor (from 0.1) multiplies it for the first 1000
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=1000),
    dict(
        type='CosineAnnealingLR',
        T_max=80000,
        eta_min_ratio=1e-8,
        begin=0,
        end=80000,
        by_epoch=False,
    ),
]
train_cfg = dict(max_iters=80000, val_interval=4000)
default_hooks = dict(checkpoint=dict(interval=4000, max_keep_ckpts=1, save_best='mIoU'))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='ResizeToMultiple', size_divisor=32),
    # annotations are loaded after the resizes: evaluation happens at the original size
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(batch_size=4)
val_dataloader = dict(batch_size=1, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
