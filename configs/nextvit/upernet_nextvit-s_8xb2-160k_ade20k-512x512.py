# Next-ViT-S + UPerNet on ADE20K, the official recipe (bytedance/Next-ViT
# segmentation/configs/upernet_512_nextvit_small_160k.py): 48.1 mIoU single-scale, 49.0 multi-scale
# (ImageNet-1K weights); 968 GFLOPs, 66.3 M parameters (README).
# 8 GPUs x 2 images = batch 16, AdamW 6e-5 with no decay on norms, 1500-iteration linear warmup
# then poly (power 1) over all 160k iterations, SyncBN in the backbone, extra stage norms.
_base_ = [
    '../_base_/models/upernet.py',
    '../_base_/datasets/ade20k.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_160k.py',
]
# The official ImageNet-1K checkpoint (Google Drive only, see docs/models/nextvit.md), loaded in
# its own format (converted on load).
checkpoint_file = 'checkpoints/nextvit_small_in1k_224.pth'
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='NextViT',
        arch='small',
        drop_path_rate=0.2,
        with_extra_norm=True,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        frozen_stages=-1,
        norm_eval=False,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    decode_head=dict(in_channels=[96, 256, 512, 1024], num_classes=150),
    auxiliary_head=dict(in_channels=512, num_classes=150),
)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    # no weight decay on BatchNorms (backbone: *norm*, heads: *bn*)
    paramwise_cfg=dict(custom_keys={'bn': dict(decay_mult=0.0), 'norm': dict(decay_mult=0.0)}),
)
# mmcv's poly policy with linear warmup: the poly factor runs over all 160k iterations and the
# warmup factor multiplies it for the first 1500 (the official log: lr 5.942e-05 at iteration 1550)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=0, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
