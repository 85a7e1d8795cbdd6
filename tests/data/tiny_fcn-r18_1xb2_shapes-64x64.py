# A tiny ResNet-18 + FCN on the synthetic shapes set: fast tool, API, demo and export tests.
# Tests point the dataloaders at their own generated copy with --cfg-options.
default_scope = 'effvision'
crop_size = (64, 64)
norm_cfg = dict(type='SyncBN', requires_grad=True)  # as in mmseg configs: reverted on CPU
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0,
                           seg_pad_val=255, size=crop_size),
    backbone=dict(type='ResNetV1c', depth=18, stem_channels=8, base_channels=8,
                  strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), out_indices=(1, 3),
                  norm_cfg=norm_cfg),
    decode_head=dict(type='FCNHead', in_channels=64, in_index=1, channels=16, num_convs=1,
                     concat_input=False, num_classes=9, norm_cfg=norm_cfg, align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0)),
    auxiliary_head=dict(type='FCNHead', in_channels=16, in_index=0, channels=8, num_convs=1,
                        concat_input=False, num_classes=9, norm_cfg=norm_cfg,
                        loss_decode=dict(type='CrossEntropyLoss', loss_weight=0.4)),
    train_cfg=dict(), test_cfg=dict(mode='whole'))
train_pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'),
                  dict(type='RandomCrop', crop_size=crop_size), dict(type='PackSegInputs')]
test_pipeline = [dict(type='LoadImageFromFile'),
                 dict(type='Resize', scale=crop_size, keep_ratio=True),
                 dict(type='LoadAnnotations'), dict(type='PackSegInputs')]
train_dataloader = dict(
    batch_size=2, num_workers=0, sampler=dict(type='InfiniteSampler'),
    dataset=dict(type='ShapesDataset', data_root='data/shapes', pipeline=train_pipeline,
                 data_prefix=dict(img_path='images/training',
                                  seg_map_path='annotations/training')))
val_dataloader = dict(
    batch_size=1, num_workers=0, sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='ShapesDataset', data_root='data/shapes', pipeline=test_pipeline,
                 data_prefix=dict(img_path='images/validation',
                                  seg_map_path='annotations/validation')))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.01, momentum=0.9))
param_scheduler = [dict(type='PolyLR', power=0.9, begin=0, end=100, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=100, val_interval=100)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'), param_scheduler=dict(type='ParamSchedulerHook'),
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=100),
    sampler_seed=dict(type='DistSamplerSeedHook'), visualization=dict(type='SegVisualizationHook'))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='gloo'))
visualizer = dict(type='SegLocalVisualizer', vis_backends=[dict(type='LocalVisBackend')])
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
tta_model = dict(type='SegTTAModel')
randomness = dict(seed=0)
