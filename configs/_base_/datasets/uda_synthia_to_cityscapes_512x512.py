# SYNTHIA (SYNTHIA-RAND-CITYSCAPES) -> Cityscapes for unsupervised domain adaptation, as DAFormer
# trains it (lhoyer/DAFormer: configs/_base_/datasets/uda_synthia_to_cityscapes_512x512.py). Each
# training item pairs a labelled SYNTHIA crop with an unlabelled Cityscapes crop (UDADataset; see
# docs/datasets/uda.md), drawn with rare class sampling. Prepare the data with
#   python tools/dataset_converters/synthia.py data/synthia --nproc 8
#   python <mmsegmentation checkout>/tools/dataset_converters/cityscapes.py data/cityscapes \
#       --nproc 8   (needs `pip install cityscapesscripts`)
# Normalisation and padding to crop_size are the data preprocessor's job in mmseg 1.x (in the
# model config: size=crop_size, pad_val=0, seg_pad_val=255). PhotoMetricDistortion is left out on
# purpose: DAFormer applies its colour augmentation inside the UDA model.
# Everything but the source dataset and the evaluator is the GTA5 -> Cityscapes setting.
_base_ = ['./uda_gta_to_cityscapes_512x512.py']
crop_size = (512, 512)
synthia_train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='Resize', scale=(1280, 760), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    dataset=dict(
        source=dict(
            _delete_=True,
            type='SynthiaDataset',
            data_root='data/synthia/',
            data_prefix=dict(img_path='RGB', seg_map_path='GT/LABELS'),
            pipeline=synthia_train_pipeline,
        ),
        # DAFormer's published RCS values (from the GTA5 base); statistics read from
        # data/synthia/ (written by tools/dataset_converters/synthia.py).
    )
)
# SYNTHIA labels 16 of the 19 classes (no terrain 9, truck 14, train 16): UDA papers report
# mIoU16 and mIoU13 (also without wall 3, fence 4, pole 5) besides the 19-class mIoU; the lists
# are effvision.datasets.synthia.SYNTHIA_CLASS_SUBSETS.
val_evaluator = dict(
    _delete_=True,
    type='SubsetIoUMetric',
    iou_metrics=['mIoU'],
    class_subsets=dict(
        mIoU16=[0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18],
        mIoU13=[0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18],
    ),
)
test_evaluator = val_evaluator
