# BiFormer-S + UPerNet on ADE20K, the official recipe (rayleizhu/BiFormer
# semantic_segmentation/configs/ade20k/upernet.biformer_small.py): 49.8 mIoU single-scale, 50.8
# multi-scale + flip (semantic_segmentation/README.md).
# 8 GPUs x 2 images = batch 16, AdamW 6e-5 (betas 0.9/0.999, weight decay 0.01, none on norms),
# 1500-iteration linear warmup on top of poly (power 1) over all 160k iterations, SyncBN in the
# backbone (BiFormer_mm converts its BatchNorms), n_win=8 regions per side for the 512 crops,
# auto-padding for any size (always on here), drop path 0.3, output LayerNorms (extra_norms).
# The official run used fp16 with a static loss scale of 512: on GPUs add
# `optim_wrapper=dict(type='AmpOptimWrapper', loss_scale=512.0)` (mmengine refuses AMP on CPU).
_base_ = [
    '../_base_/models/upernet.py',
    '../_base_/datasets/ade20k.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_160k.py',
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
        drop_path_rate=0.3,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        frozen_stages=-1,
        norm_eval=False,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    decode_head=dict(in_channels=[64, 128, 256, 512], num_classes=150),
    auxiliary_head=dict(in_channels=256, num_classes=150),
)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    # the official custom_keys (the first two match nothing in BiFormer; 'norm' matches the
    # block and output LayerNorms, not the stem/downsampling BatchNorms, as officially)
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.0),
            'relative_position_bias_table': dict(decay_mult=0.0),
            'norm': dict(decay_mult=0.0),
        }
    ),
)
# mmcv's poly policy with linear warmup: the poly factor runs over all 160k iterations and the
# warmup factor (from 1e-6) multiplies it for the first 1500
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=0, end=160000, by_epoch=False),
]
default_hooks = dict(checkpoint=dict(max_keep_ckpts=1, save_best='mIoU'))
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
