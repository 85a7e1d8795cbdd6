# MOAT-0 + UPerNet on ADE20K. deeplab2 releases no downstream config and the paper's ADE20K
# models use a DeepLab decoder, so this recipe is ours (docs/models/moat.md): the Swin/Next-ViT
# UPerNet recipe (8 GPUs x 2 images = batch 16, AdamW 6e-5, weight decay 0.01 with none on norms
# and position tables, 1500-iteration linear warmup then poly, 160k iterations). From the official
# side: global attention in both MOAT stages (the maintainers' ADE20K setting,
# google-research/deeplab2#146), the dense shortcut pooling (pool_size=3, deeplab2 get_model), the
# ImageNet checkpoint without position embedding (recommended for downstream tasks in
# g3doc/projects/moat_imagenet_pretrained_checkpoints.md), its input normalisation ("option 1":
# ImageNet mean/std for MOAT-0/1) and SyncBN. No mIoU is published for this recipe.
_base_ = [
    '../_base_/models/upernet.py',
    '../_base_/datasets/ade20k.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_160k.py',
]
# Official TF checkpoint: https://storage.googleapis.com/gresearch/tf-deeplab/checkpoint/moat0_imagenet_1k_224_wo_position_embedding.tar.gz  # noqa: E501
# converted once with tools/model_converters/moat_to_effvision.py (needs TensorFlow, see the doc).
checkpoint_file = 'checkpoints/moat0_imagenet_1k_224_wo_position_embedding.pth'
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='MOAT',
        arch='moat0',
        window_sizes=(None, None, None, None),  # global attention at strides 16 and 32
        relative_position_embedding=False,  # the "wo_position_embedding" checkpoint
        pool_size=3,
        drop_path_rate=0.2,  # the official survival_prob 0.8 of MOAT-0
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150),
)
# deeplab2 trains with synchronised BatchNorm (the backbone's BatchNorm2d become SyncBatchNorm
# when training distributed)
sync_bn = 'torch'
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    # no weight decay on BatchNorm/LayerNorm (backbone: *norm*, heads: *bn*), none on the tables
    paramwise_cfg=dict(
        custom_keys={
            'relative_position_embedding': dict(decay_mult=0.0),
            'norm': dict(decay_mult=0.0),
            'bn': dict(decay_mult=0.0),
        }
    ),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
