# Next-ViT-B + Mask R-CNN on COCO, the official 1x recipe (bytedance/Next-ViT
# detection/configs/mask_rcnn_nextvit_base_1x.py): 47.2 box AP / 42.8 mask AP; 64.9 M parameters,
# 340 GFLOPs (README). Same recipe as Next-ViT-S, with drop path 0.2 (detection/nextvit.py).
_base_ = ['./mask-rcnn_nextvit-s_fpn_1x_coco.py']
checkpoint_file = 'checkpoints/nextvit_base_in1k_224.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    )
)
