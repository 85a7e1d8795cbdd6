# Next-ViT-L + Semantic FPN on ADE20K, the official recipe (bytedance/Next-ViT
# segmentation/configs/fpn_512_nextvit_large_80k.py): 49.1 mIoU single-scale (ImageNet-1K weights);
# 331 GFLOPs, 62.4 M parameters (README). Same recipe as Next-ViT-S.
_base_ = ['./fpn_nextvit-s_8xb4-40k_ade20k-512x512.py']
checkpoint_file = 'checkpoints/nextvit_large_in1k_224.pth'
model = dict(
    backbone=dict(arch='large', init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file))
)
