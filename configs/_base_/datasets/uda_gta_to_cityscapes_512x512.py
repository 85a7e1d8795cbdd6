# GTA5 -> Cityscapes for unsupervised domain adaptation, as DAFormer trains it (lhoyer/DAFormer:
# configs/_base_/datasets/uda_gta_to_cityscapes_512x512.py). Each training item pairs a labelled
# GTA5 crop with an unlabelled Cityscapes crop (UDADataset; see docs/datasets/uda.md), drawn with
# rare class sampling. Prepare the data with
#   python tools/dataset_converters/gta.py data/gta --nproc 8
#   python <mmsegmentation checkout>/tools/dataset_converters/cityscapes.py data/cityscapes \
#       --nproc 8   (needs `pip install cityscapesscripts`)
# Normalisation and padding to crop_size are the data preprocessor's job in mmseg 1.x (in the
# model config: size=crop_size, pad_val=0, seg_pad_val=255). PhotoMetricDistortion is left out on
# purpose: DAFormer applies its colour augmentation inside the UDA model.
dataset_type = 'CityscapesDataset'
data_root = 'data/cityscapes/'
crop_size = (512, 512)
gta_train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='Resize', scale=(1280, 720), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
cityscapes_train_pipeline = [
    dict(type='LoadImageFromFile'),
    # Target labels are loaded as in the official pipeline (handy for logging pseudo-label
    # quality); a UDA model must never train on them.
    dict(type='LoadAnnotations'),
    dict(type='Resize', scale=(1024, 512), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(1024, 512), keep_ratio=True),
    # Annotations after Resize: the metric compares predictions with the full-size label map.
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type='UDADataset',
        source=dict(
            type='GTA5Dataset',
            data_root='data/gta/',
            data_prefix=dict(img_path='images', seg_map_path='labels'),
            pipeline=gta_train_pipeline,
        ),
        target=dict(
            type=dataset_type,
            data_root=data_root,
            data_prefix=dict(img_path='leftImg8bit/train', seg_map_path='gtFine/train'),
            pipeline=cityscapes_train_pipeline,
        ),
        # DAFormer's published values; statistics read from data/gta/ (written by gta.py above).
        rare_class_sampling=dict(class_temp=0.01, min_pixels=3000, min_crop_ratio=0.5),
    ),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='leftImg8bit/val', seg_map_path='gtFine/val'),
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
