# Next-ViT-B + Semantic FPN on ADE20K, the official recipe (bytedance/Next-ViT
# segmentation/configs/fpn_512_nextvit_base_80k.py): 48.6 mIoU single-scale (ImageNet-1K weights);
# 260 GFLOPs, 49.3 M parameters (README). Same recipe as Next-ViT-S.
_base_ = ['./fpn_nextvit-s_8xb4-40k_ade20k-512x512.py']
checkpoint_file = 'checkpoints/nextvit_base_in1k_224.pth'
model = dict(
    backbone=dict(arch='base', init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file))
)
