"""DACS: the EMA teacher, pseudo-labels, mixing, feature distance and the training step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import ConfigDict
from mmengine.optim import OptimWrapper
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample

from effvision.models.segmentors.dacs import DACS, pixel_weights
from effvision.registry import MODELS
from effvision.utils import register_all_modules

NUM_CLASSES = 4
SIZE = 64


def _segmentor_cfg() -> ConfigDict:
    return ConfigDict(
        type='EncoderDecoder',
        backbone=dict(
            type='MixVisionTransformer',
            embed_dims=8,
            num_layers=[1, 1, 1, 1],
            num_heads=[1, 2, 4, 8],
            sr_ratios=[8, 4, 2, 1],
            drop_path_rate=0.1,
        ),
        decode_head=dict(
            type='DAFormerHead',
            in_channels=[8, 16, 32, 64],
            in_index=[0, 1, 2, 3],
            channels=16,
            embed_dims=8,
            num_classes=NUM_CLASSES,
            norm_cfg=dict(type='BN', requires_grad=True),
            fusion_cfg=dict(type='aspp', sep=True, dilations=(1, 2), pool=False),
            loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0),
        ),
        train_cfg=dict(),
        test_cfg=dict(mode='whole'),
    )


def _dacs(**kwargs) -> DACS:
    register_all_modules()
    cfg = dict(
        type='DACS',
        model=_segmentor_cfg(),
        data_preprocessor=dict(
            type='UDADataPreProcessor',
            mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375],
            bgr_to_rgb=True,
            size=(SIZE, SIZE),
        ),
        alpha=0.999,
        seed=0,
    )
    cfg.update(kwargs)
    model = MODELS.build(cfg)
    model.init_weights()
    return model


def _samples(labels: torch.Tensor) -> list[SegDataSample]:
    out = []
    for label in labels:
        sample = SegDataSample(
            metainfo=dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE), pad_shape=(SIZE, SIZE))
        )
        sample.gt_sem_seg = PixelData(data=label[None].clone())
        out.append(sample)
    return out


def _batch(seed=0, batch=2, target_labels=None) -> dict:
    gen = torch.Generator().manual_seed(seed)
    src_labels = torch.randint(0, NUM_CLASSES, (batch, SIZE, SIZE), generator=gen)
    src_labels[:, : SIZE // 2, : SIZE // 2] = 1  # a large thing region for the feature distance
    random_labels = torch.randint(0, NUM_CLASSES, (batch, SIZE, SIZE), generator=gen)
    target_labels = random_labels if target_labels is None else target_labels
    images = torch.randint(0, 256, (2, batch, 3, SIZE, SIZE), generator=gen, dtype=torch.uint8)
    return dict(
        inputs=list(images[0]),
        data_samples=_samples(src_labels),
        target_inputs=list(images[1]),
        target_data_samples=_samples(target_labels),
    )


def _optim(model) -> OptimWrapper:
    return OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3))


def _params(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_train_step_logs_every_term_and_leaves_the_frozen_copy_alone():
    model = _dacs(
        imnet_feature_dist_lambda=0.005,
        imnet_feature_dist_classes=[1],
        imnet_feature_dist_scale_min_ratio=0.75,
        mask_consistency=dict(block_size=16),
    ).train()
    imnet = _params(model.imnet_model)
    student = _params(model.model)
    optim = _optim(model)
    for step in range(2):
        logs = model.train_step(_batch(step), optim)
    expected = {
        'decode.loss_ce',
        'decode.acc_seg',
        'src.loss_imnet_feat_dist',
        'pseudo_weight',
        'mix.decode.loss_ce',
        'mix.decode.acc_seg',
        'masked.decode.loss_ce',
        'masked.decode.acc_seg',
        'loss',
    }
    assert set(logs) == expected
    assert all(torch.isfinite(v).all() for v in logs.values())
    assert logs['src.loss_imnet_feat_dist'] > 0  # the student moved away after one step
    assert int(model.local_iter) == 2
    assert all(torch.equal(a, b) for a, b in zip(imnet, model.imnet_model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(student, model.model.parameters()))
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # zero_grad ran


def test_teacher_is_a_copy_then_an_average_of_parameters_only():
    model = _dacs(alpha=0.999).train()
    optim = _optim(model)
    before = _params(model.model)
    model.train_step(_batch(0), optim)
    # iteration 0 copied the student as it was before the step
    assert all(torch.equal(t, s) for t, s in zip(model.ema_model.parameters(), before))
    teacher0 = _params(model.ema_model)
    student1 = _params(model.model)
    bn = model.model.decode_head.fuse_layer.bottleneck.bn
    bn.running_var.fill_(123.0)  # a buffer: must not reach the teacher
    model.train_step(_batch(1), optim)
    alpha = min(1 - 1 / 2, 0.999)  # t = 1
    for t, t0, s1 in zip(model.ema_model.parameters(), teacher0, student1):
        torch.testing.assert_close(t, alpha * t0 + (1 - alpha) * s1, atol=0, rtol=0)
    assert not (model.ema_model.decode_head.fuse_layer.bottleneck.bn.running_var == 123).any()


def test_modes_teacher_without_dropout_frozen_copy_in_eval():
    model = _dacs(imnet_feature_dist_lambda=0.005).train()
    drops = [m for m in model.ema_model.modules() if 'Drop' in type(m).__name__]
    assert drops and not any(m.training for m in drops)
    assert model.ema_model.decode_head.fuse_layer.training  # batch-norm uses batch statistics
    assert not any(m.training for m in model.imnet_model.modules())
    assert all(m.training for m in model.model.modules())
    assert not any(p.requires_grad for p in model.ema_model.parameters())


def test_target_labels_are_never_read():
    results = []
    for target in (None, torch.zeros(2, SIZE, SIZE, dtype=torch.long)):
        torch.manual_seed(0)
        model = _dacs().train()
        optim = _optim(model)
        logs = model.train_step(_batch(0, target_labels=target), optim)
        logs = model.train_step(_batch(1, target_labels=target), optim)
        results.append((logs, _params(model.model)))
    (logs_a, params_a), (logs_b, params_b) = results
    assert all(torch.equal(logs_a[k], logs_b[k]) for k in logs_a)
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


def test_pseudo_label_weight_is_the_confident_fraction(monkeypatch):
    model = _dacs(pseudo_threshold=0.9).train()
    logits = torch.zeros(3, NUM_CLASSES, 8, 8)
    logits[0, 2] = 10.0  # confident (p ~ 0.9999)
    logits[1, 3] = 1.0  # not confident (p ~ 0.48)
    logits[2, 1] = 10.0
    monkeypatch.setattr(model.ema_model.decode_head, 'forward', lambda feats: logits)
    label, confident = model.pseudo_label(torch.zeros(3, 3, SIZE, SIZE))
    assert confident == 2 / 3  # one weight for the whole batch
    assert label.shape == (3, SIZE, SIZE)
    assert (label[0] == 2).all() and (label[1] == 3).all() and (label[2] == 1).all()


def test_pixel_weights_give_mmseg_weighted_mean_over_all_pixels():
    model = _dacs().train()
    seg = model.model
    inputs = torch.randn(2, 3, SIZE, SIZE)
    labels = torch.randint(0, NUM_CLASSES, (2, SIZE, SIZE))
    labels[0, :4] = 255
    weight = torch.rand(2, SIZE, SIZE)
    seg.eval()  # fixed batch-norm statistics: the same logits twice
    with pixel_weights(seg, weight):
        loss = seg.loss(inputs, _samples(labels))['decode.loss_ce']
    logits = F.interpolate(
        seg.decode_head(seg.extract_feat(inputs)), size=(SIZE, SIZE), mode='bilinear'
    )
    per_pixel = F.cross_entropy(logits, labels, ignore_index=255, reduction='none')
    torch.testing.assert_close(loss, (per_pixel * weight).mean())
    assert seg.decode_head.sampler is None  # restored


def test_feature_distance_masks_thing_cells_and_is_zero_without_them():
    model = _dacs(
        imnet_feature_dist_lambda=0.005,
        imnet_feature_dist_classes=[1],
        imnet_feature_dist_scale_min_ratio=0.75,
    ).eval()  # no drop path: the student's features are deterministic
    inputs = torch.randn(2, 3, SIZE, SIZE)
    gt = torch.zeros(2, 1, SIZE, SIZE, dtype=torch.long)
    feat = model.model.extract_feat(inputs)[-1]
    shifted = feat + 1.0
    assert model.feature_distance(inputs, gt, shifted).item() == 0  # no class-1 cell: 0, not NaN
    gt[0, :, :32, :32] = 1  # stride 32: exactly cell (0, 0) of image 0
    # same weights: distance 0 up to float32 noise (nn.MultiheadAttention takes its fused path
    # without autograd, for the frozen copy)
    assert model.feature_distance(inputs, gt, feat).item() < 1e-4
    dist = model.feature_distance(inputs, gt, shifted)
    torch.testing.assert_close(dist, torch.tensor(feat.shape[1] ** 0.5))


def test_generator_state_travels_with_the_state_dict():
    model = _dacs().train()
    model.train_step(_batch(0), _optim(model))
    state = copy.deepcopy(model.state_dict())
    assert '_extra_state' in state
    expected = torch.rand(4, generator=model.generator)
    fresh = _dacs(seed=123)
    fresh.load_state_dict(state)
    assert torch.equal(torch.rand(4, generator=fresh.generator), expected)
    assert int(fresh.local_iter) == 1


@pytest.mark.parametrize(
    'kwargs, error, message',
    [
        (dict(mix='cut'), ValueError, "mix='class'"),
        (dict(mask_consistency=dict(ratio=0.5)), ValueError, 'mask_ratio'),
        (dict(imnet_feature_dist_lambda=0.1, imnet_feature_dist_classes=[1]), ValueError, '0.75'),
        (dict(alpha=1.0), ValueError, 'alpha'),
    ],
)
def test_bad_config_names_the_fix(kwargs, error, message):
    with pytest.raises(error, match=message):
        _dacs(**kwargs)


def test_inner_data_preprocessor_is_refused():
    cfg = _segmentor_cfg()
    cfg['data_preprocessor'] = dict(type='SegDataPreProcessor')
    with pytest.raises(ValueError, match='UDADataPreProcessor'):
        _dacs(model=cfg)


def test_source_only_batch_is_refused_with_the_fix():
    model = _dacs().train()
    batch = _batch(0)
    del batch['target_inputs'], batch['target_data_samples']
    with pytest.raises(KeyError, match='UDADataset'):
        model.train_step(batch, _optim(model))
    with pytest.raises(NotImplementedError, match='train_step'):
        model.loss(torch.zeros(1, 3, SIZE, SIZE), [])


def test_predict_is_the_students():
    model = _dacs().eval()
    inputs = torch.randn(1, 3, SIZE, SIZE)
    samples = _samples(torch.zeros(1, SIZE, SIZE, dtype=torch.long))
    with torch.no_grad():
        ours = model.predict(inputs, samples)[0].seg_logits.data
        student = model.model.predict(inputs, samples)[0].seg_logits.data
    assert torch.equal(ours, student)
