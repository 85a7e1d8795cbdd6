# kMaX-DeepLab's optimisation (bytedance/kmax-deeplab train_net.py build_optimizer and the COCO
# yaml): AdamW 5e-4, weight decay 0.05 except norms (incl. the pixel decoder's input
# LayerNorms), biases, the axial relative-position tables and the cluster centres; backbone lr
# x0.1; no gradient clipping; TF2WarmupPolyLR (5k iterations of linear warmup from 0.001, then
# poly 0.9 counted from iteration 0); 150k iterations, evaluation every 5k.
max_iters = 150000
no_decay = dict(decay_mult=0.0)
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=5e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys={
            'backbone': dict(lr_mult=0.1),
            '_rpe': no_decay,
            'cluster_centers': no_decay,
            'in_norms': no_decay,
        },
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
    ),
)
param_scheduler = [
    dict(type='effvision.DeepLabPolyLR', max_iters=max_iters, warmup_iters=5000, power=0.9),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=5000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=5000, max_keep_ckpts=2),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='DetVisualizationHook'),
)
