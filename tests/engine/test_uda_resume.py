"""A resumed DACS run continues exactly like an uninterrupted one: the EMA teacher, its step
counter, the mixing generator and the rare-class sampler all come back from the checkpoint."""

from __future__ import annotations

import torch
from mmengine.config import Config
from mmengine.runner import Runner

from effvision.datasets.class_stats import collect_class_stats, write_class_stats
from effvision.utils import register_all_modules

SIZE = (64, 64)


def _cfg(work_dir, shapes_root, stats_dir, max_iters: int) -> Config:
    pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations'),
        dict(type='RandomCrop', crop_size=(48, 48), cat_max_ratio=0.75),
        dict(type='RandomFlip', prob=0.5),
        dict(type='PackSegInputs'),
    ]

    def shapes(split):
        return dict(
            type='ShapesDataset',
            data_root=str(shapes_root),
            data_prefix=dict(img_path=f'images/{split}', seg_map_path=f'annotations/{split}'),
            pipeline=pipeline,
        )

    norm_cfg = dict(type='BN', requires_grad=True)
    return Config(
        dict(
            default_scope='effvision',
            work_dir=str(work_dir),
            model=dict(
                type='DACS',
                data_preprocessor=dict(
                    type='UDADataPreProcessor',
                    mean=[123.675, 116.28, 103.53],
                    std=[58.395, 57.12, 57.375],
                    bgr_to_rgb=True,
                    size=SIZE,
                ),
                model=dict(
                    type='EncoderDecoder',
                    backbone=dict(
                        type='ResNetV1c',
                        depth=18,
                        stem_channels=8,
                        base_channels=8,
                        out_indices=(0, 1, 2, 3),
                        norm_cfg=norm_cfg,
                    ),
                    decode_head=dict(
                        type='DAFormerHead',
                        in_channels=[8, 16, 32, 64],
                        in_index=[0, 1, 2, 3],
                        channels=16,
                        embed_dims=8,
                        num_classes=9,
                        norm_cfg=norm_cfg,
                        dropout_ratio=0.0,  # see the module docstring of the test
                        fusion_cfg=dict(type='aspp', sep=True, dilations=(1, 2), pool=False),
                        loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0),
                    ),
                    train_cfg=dict(),
                    test_cfg=dict(mode='whole'),
                ),
                alpha=0.99,
                imnet_feature_dist_lambda=0.005,
                imnet_feature_dist_classes=[4, 5, 6, 7, 8],
                imnet_feature_dist_scale_min_ratio=0.75,
                mask_consistency=dict(block_size=16),
            ),
            train_dataloader=dict(
                batch_size=2,
                num_workers=0,
                sampler=dict(type='InfiniteSampler', shuffle=True),
                dataset=dict(
                    type='UDADataset',
                    source=shapes('training'),
                    target=shapes('validation'),
                    rare_class_sampling=dict(min_pixels=20),
                    stats_dir=str(stats_dir),
                ),
            ),
            optim_wrapper=dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3)),
            param_scheduler=[dict(type='PolyLR', power=1.0, begin=0, end=8, by_epoch=False)],
            train_cfg=dict(type='IterBasedTrainLoop', max_iters=max_iters),
            default_hooks=dict(
                checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=3),
                logger=dict(type='LoggerHook', interval=1),
            ),
            randomness=dict(seed=0),
            env_cfg=dict(cudnn_benchmark=False),
            log_level='WARNING',
        )
    )


def test_resumed_uda_run_matches_the_uninterrupted_one(tmp_path, shapes_root):
    register_all_modules()
    stats_dir = tmp_path / 'stats'
    write_class_stats(
        collect_class_stats(shapes_root / 'annotations' / 'training', '.png', ignore_index=255),
        stats_dir,
    )
    straight = Runner.from_cfg(_cfg(tmp_path / 'straight', shapes_root, stats_dir, max_iters=6))
    straight.train()

    first = Runner.from_cfg(_cfg(tmp_path / 'split', shapes_root, stats_dir, max_iters=3))
    first.train()
    resumed_cfg = _cfg(tmp_path / 'split', shapes_root, stats_dir, max_iters=6)
    resumed_cfg.resume = True
    resumed_cfg.load_from = str(tmp_path / 'split' / 'iter_3.pth')
    resumed = Runner.from_cfg(resumed_cfg)
    resumed.train()

    expected = straight.model.state_dict()
    actual = resumed.model.state_dict()
    assert int(actual['local_iter']) == 6
    assert set(expected) == set(actual)
    for key, value in expected.items():
        if key == '_extra_state':
            assert torch.equal(value['generator'], actual[key]['generator'])
        else:
            assert torch.equal(value, actual[key]), key
    teacher = [k for k in expected if k.startswith('ema_model.')]
    assert teacher and not all(
        torch.equal(expected[k], expected[k.replace('ema_model.', 'model.', 1)]) for k in teacher
    )  # the teacher is its own average, not a copy of the student
