# The UDA demo (`make demo-uda`): DAFormer's self-training (DACS with rare class sampling) from the
# labelled synthetic source domain (data/shapes) to the unlabelled target domain
# (data/shapes_target: same kind of scenes, another look). Same network, schedule and source
# batches as the source-only baseline daformer_swin-nano_1xb4-800_shapes-srconly-128x128.py, plus
# 4 target images per iteration. Trained from scratch, so the ImageNet feature distance is off.
# RCS reads the class statistics that `python tools/dataset_converters/class_stats.py data/shapes
# --ann-dir annotations/training --suffix .png` writes (make demo-uda runs it).
_base_ = ['./daformer_swin-nano_1xb4-800_shapes-srconly-128x128.py']
model = dict(
    _delete_=True,
    type='DACS',
    data_preprocessor=dict(
        type='UDADataPreProcessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_val=0,
        seg_pad_val=255,
        size={{_base_.crop_size}},
    ),
    model={{_base_.segmentor}},
    alpha=0.99,
    pseudo_threshold=0.968,
    imnet_feature_dist_lambda=0.0,
    mix='class',
    blur=True,
    color_jitter_strength=0.2,
    color_jitter_probability=0.2,
)
train_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type='UDADataset',
        source={{_base_.source_train}},
        target={{_base_.target_train}},
        rare_class_sampling=dict(class_temp=0.01, min_pixels=200, min_crop_ratio=0.5),
    )
)
