# MOAT-1 + UPerNet on ADE20K: the recipe of upernet_moat-0 (ours; no official downstream config)
# with the ImageNet-1k checkpoint without position embedding. No mIoU is published for it.
_base_ = ['./upernet_moat-0_8xb2-160k_ade20k-512x512.py']
# Official TF checkpoint: https://storage.googleapis.com/gresearch/tf-deeplab/checkpoint/moat1_imagenet_1k_224_wo_position_embedding.tar.gz  # noqa: E501
checkpoint_file = 'checkpoints/moat1_imagenet_1k_224_wo_position_embedding.pth'
model = dict(
    backbone=dict(
        arch='moat1',
        drop_path_rate=0.3,  # the official survival_prob 0.7 of MOAT-1
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384),
)
