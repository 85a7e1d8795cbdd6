# Runtime of mmdet configs trained by epochs (mmdet's schedules have no hooks): the iteration
# runtime plus mmdet's default hooks.
_base_ = ['./det_runtime_iter.py']
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='DetVisualizationHook'),
)
log_processor = dict(by_epoch=True)
