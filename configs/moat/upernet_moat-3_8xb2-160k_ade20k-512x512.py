# MOAT-3 + UPerNet on ADE20K: the recipe of upernet_moat-0 (ours; no official downstream config)
# with the ImageNet-22k + 1k checkpoint without position embedding. No mIoU is published for it.
_base_ = ['./upernet_moat-0_8xb2-160k_ade20k-512x512.py']
# Official TF checkpoint: https://storage.googleapis.com/gresearch/tf-deeplab/checkpoint/moat3_imagenet_22k_and_1k_512_wo_position_embedding.tar.gz  # noqa: E501
checkpoint_file = 'checkpoints/moat3_imagenet_22k_and_1k_512_wo_position_embedding.pth'
# this checkpoint expects "option 2" input normalisation: mean = std = 127.5
data_preprocessor = dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5])
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        arch='moat3',
        drop_path_rate=0.6,  # the official survival_prob 0.4 of MOAT-3
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    ),
    decode_head=dict(in_channels=[160, 320, 640, 1280]),
    auxiliary_head=dict(in_channels=640),
)
