# Next-ViT-L + Mask R-CNN on COCO, the official 3x recipe (bytedance/Next-ViT
# detection/configs/mask_rcnn_nextvit_large_3x.py): 50.2 box AP / 44.8 mask AP (README). Same recipe
# as Next-ViT-S, with drop path 0.2 (detection/nextvit.py).
_base_ = ['./mask-rcnn_nextvit-s_fpn_ms-crop-3x_coco.py']
checkpoint_file = 'checkpoints/nextvit_large_in1k_224.pth'
model = dict(
    backbone=dict(
        arch='large',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file),
    )
)
