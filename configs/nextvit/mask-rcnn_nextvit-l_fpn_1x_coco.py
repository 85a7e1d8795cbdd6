# Next-ViT-L + Mask R-CNN on COCO, the official 1x recipe (bytedance/Next-ViT
# detection/configs/mask_rcnn_nextvit_large_1x.py): 48.0 box AP / 43.2 mask AP; 77.9 M parameters,
# 391 GFLOPs (README). Same recipe as Next-ViT-S, with drop path 0.2 (detection/nextvit.py).
_base_ = ['./mask-rcnn_nextvit-s_fpn_1x_coco.py']
checkpoint_file = 'checkpoints/nextvit_large_in1k_224.pth'
model = dict(
    backbone=dict(
        arch='large',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    )
)
