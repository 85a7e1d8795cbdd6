# Runtime of mmdet configs trained by iterations with an effvision schedule that brings its own
# hooks (configs/_base_/schedules/pem_*.py, kmax_*.py): mmdet's scope and visualizer, no hooks.
# Detection models are built in mmdet's scope; effvision modules are reached as `effvision.<Name>`
# (importing effvision.models registers them, also for mmdet's tools).
default_scope = 'mmdet'
custom_imports = dict(imports=['effvision.models'], allow_failed_imports=False)
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='DetLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
