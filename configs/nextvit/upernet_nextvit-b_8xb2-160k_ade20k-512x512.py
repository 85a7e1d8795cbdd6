# Next-ViT-B + UPerNet on ADE20K, the official recipe (bytedance/Next-ViT
# segmentation/configs/upernet_512_nextvit_base_160k.py): 50.4 mIoU single-scale, 51.1 multi-scale
# (ImageNet-1K weights); 1020 GFLOPs, 79.3 M parameters (README). Same recipe as Next-ViT-S.
_base_ = ['./upernet_nextvit-s_8xb2-160k_ade20k-512x512.py']
checkpoint_file = 'checkpoints/nextvit_base_in1k_224.pth'
model = dict(
    backbone=dict(arch='base', init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file))
)
