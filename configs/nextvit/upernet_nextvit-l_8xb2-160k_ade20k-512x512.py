# Next-ViT-L + UPerNet on ADE20K, the official recipe (bytedance/Next-ViT
# segmentation/configs/upernet_512_nextvit_large_160k.py): 50.1 mIoU single-scale, 50.8 multi-scale
# (ImageNet-1K weights); 1072 GFLOPs, 92.4 M parameters (README). Same recipe as Next-ViT-S.
_base_ = ['./upernet_nextvit-s_8xb2-160k_ade20k-512x512.py']
checkpoint_file = 'checkpoints/nextvit_large_in1k_224.pth'
model = dict(
    backbone=dict(arch='large', init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file))
)
