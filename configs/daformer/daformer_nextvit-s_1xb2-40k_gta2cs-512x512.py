# DAFormer's decoder and UDA training with effvision's Next-ViT-S encoder (ImageNet-1k, the official
# checkpoint: see docs/models/nextvit.md for the download): same recipe, no published number.
_base_ = ['./daformer_mit-b5_1xb2-40k_gta2cs-512x512.py']
model = dict(
    model=dict(
        backbone=dict(
            _delete_=True,
            type='NextViT',
            arch='small',
            drop_path_rate=0.2,
            with_extra_norm=True,  # the dense-prediction form of the official segmentation code
            out_indices=(0, 1, 2, 3),
            init_cfg=dict(type='Pretrained', checkpoint='checkpoints/nextvit_small_in1k_224.pth'),
        ),
        decode_head=dict(in_channels=[96, 256, 512, 1024]),
    )
)
