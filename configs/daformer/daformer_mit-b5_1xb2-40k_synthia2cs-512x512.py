# DAFormer, SYNTHIA -> Cityscapes: 60.9 mIoU over 16 classes in the paper (the 19-class mean
# scaled by 19/16, lhoyer/DAFormer#18); same model and UDA settings as GTA5 -> Cityscapes.
_base_ = [
    '../_base_/models/daformer_mit-b5.py',
    '../_base_/datasets/uda_synthia_to_cityscapes_512x512.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/daformer_40k.py',
]
