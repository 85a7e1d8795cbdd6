# The quickstart (`make demo`): a narrow Swin + UPerHead trained from scratch on the synthetic
# shapes set (tools/dataset_converters/make_shapes.py), sized to train in a few minutes on 2 CPU
# cores. Same code path as the ADE20K configs, only smaller.
_base_ = [
    '../_base_/models/upernet_swin.py',
    '../_base_/datasets/shapes.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_20k.py',  # hooks and loops; iterations set below
]
crop_size = (128, 128)
num_classes = 9
norm_cfg = dict(type='BN', requires_grad=True)  # single process: no SyncBN
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        arch=None,
        embed_dim=32,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        window_size=8,  # 128 / 4 = 32 tokens: windows tile stages 0-2 without padding
        drop_path_rate=0.1,
    ),
    decode_head=dict(
        in_channels=[32, 64, 128, 256],
        channels=64,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
    ),
    auxiliary_head=dict(in_channels=128, channels=32, num_classes=num_classes, norm_cfg=norm_cfg),
)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-3, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.0),
            'relative_position_bias_table': dict(decay_mult=0.0),
            'norm': dict(decay_mult=0.0),
        }
    ),
)
max_iters = 800  # ~0.36 s per iteration on 2 idle CPU cores: under 5 minutes
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=50, end=max_iters, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=1),
)
train_dataloader = dict(batch_size=8)
randomness = dict(seed=0)
