# DAFormer, GTA5 -> Cityscapes (lhoyer/DAFormer
# configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py): 68.3 mIoU on
# Cityscapes val in the paper (mean of 3 seeds), 68.85 for the released checkpoint. One GPU,
# batch 2 source + 2 target 512x512 crops, rare class sampling, 40k iterations.
_base_ = [
    '../_base_/models/daformer_mit-b5.py',
    '../_base_/datasets/uda_gta_to_cityscapes_512x512.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/daformer_40k.py',
]
