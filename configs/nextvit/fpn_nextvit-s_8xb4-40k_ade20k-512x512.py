# Next-ViT-S + Semantic FPN on ADE20K, the official recipe the README calls "Semantic FPN 80k"
# (bytedance/Next-ViT segmentation/configs/fpn_512_nextvit_small_80k.py): 46.5 mIoU single-scale
# (ImageNet-1K weights); 208 GFLOPs, 36.3 M parameters (README).
# 8 GPUs x 4 images = batch 32 for 80000 // 2 = 40k iterations (twice PVT's batch 16 for 80k),
# AdamW 1e-4, weight decay 1e-4, poly (power 0.9, min lr 1e-6), SyncBN, extra stage norms.
_base_ = [
    '../_base_/models/fpn.py',
    '../_base_/datasets/ade20k.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_40k.py',
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
    neck=dict(in_channels=[96, 256, 512, 1024]),
    decode_head=dict(num_classes=150),
)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, weight_decay=1e-4),
    clip_grad=None,
)
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-6, power=0.9, begin=0, end=40000, by_epoch=False),
]
train_cfg = dict(max_iters=40000, val_interval=4000)
default_hooks = dict(checkpoint=dict(interval=4000))
train_dataloader = dict(batch_size=4)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
