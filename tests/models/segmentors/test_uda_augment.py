"""DACS's image operations, checked against kornia 0.5.8 (the release DAFormer pins)."""

from __future__ import annotations

import math

import pytest
import torch

from effvision.models.segmentors import uda_augment as aug

kornia = pytest.importorskip('kornia')  # requirements/tests.txt pins 0.5.8; CI installs it


def test_kornia_is_the_pinned_release():
    assert kornia.__version__ == '0.5.8'


def _images(batch=3, height=24, width=20):
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(batch, 3, height, width, generator=gen, dtype=torch.float64)
    img[:, :, :3] = img[:, :1, :3]  # gray pixels: zero saturation, hue from the delta==0 branch
    img[:, 1, 3:6] = img[:, 0, 3:6]  # ties between the maximum channels
    img[:, :, 6, :4] = 1.0
    return img


def test_hsv_matches_kornia():
    img = _images()
    hsv = aug.rgb_to_hsv(img)
    torch.testing.assert_close(hsv, kornia.color.rgb_to_hsv(img), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        aug.hsv_to_rgb(hsv), kornia.color.hsv_to_rgb(hsv), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(aug.hsv_to_rgb(hsv), img, atol=1e-5, rtol=0)


@pytest.mark.parametrize('order', [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
def test_color_jitter_matches_kornia_058(order):
    img = _images()
    params = dict(
        brightness=torch.tensor([0.8, 1.1, 1.2], dtype=torch.float64),
        contrast=torch.tensor([1.2, 0.9, 0.8], dtype=torch.float64),
        hue=torch.tensor([-0.2, 0.05, 0.2], dtype=torch.float64),
        saturation=torch.tensor([0.8, 1.15, 1.2], dtype=torch.float64),
        order=torch.tensor(order),
    )
    img = img.float()  # training runs in float32; see the tolerance below
    ours = aug.apply_color_jitter(img, params)
    jitter = kornia.augmentation.ColorJitter(0.2, 0.2, 0.2, 0.2)
    theirs = jitter.apply_transform(
        img,
        dict(
            brightness_factor=params['brightness'],
            contrast_factor=params['contrast'],
            hue_factor=params['hue'],
            saturation_factor=params['saturation'],
            order=params['order'],
        ),
    )
    # a few float32 ulps of [0, 1] values (the HSV round trips amplify them a little)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_brightness_contrast_saturation_exact_in_float64():
    img = _images()
    params = aug.jitter_params(3, 0.2, torch.Generator().manual_seed(3))
    params['hue'] = torch.zeros(3, dtype=torch.float64)
    for order in ([0, 1, 2], [2, 1, 0]):
        params['order'] = torch.tensor(order)
        steps = [
            lambda x: kornia.enhance.adjust_brightness(x, params['brightness'] - 1),
            lambda x: kornia.enhance.adjust_contrast(x, params['contrast']),
            lambda x: kornia.enhance.adjust_saturation(x, params['saturation']),
        ]
        theirs = img
        for index in order:
            theirs = steps[index](theirs)
        ours = aug.apply_color_jitter(img, params)
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)


def test_jitter_ranges_are_korninas():
    params = aug.jitter_params(20000, 0.2, torch.Generator().manual_seed(1))
    for name, (low, high) in dict(
        brightness=(0.8, 1.2), contrast=(0.8, 1.2), saturation=(0.8, 1.2), hue=(-0.2, 0.2)
    ).items():
        values = params[name]
        assert low <= values.min() and values.max() <= high, name
        assert values.min() < low + 1e-3 and values.max() > high - 1e-3, name
    assert sorted(params['order'].tolist()) == [0, 1, 2, 3]
    wide = aug.jitter_params(20000, 1.5, torch.Generator().manual_seed(1))
    assert wide['brightness'].min() >= 0 and wide['brightness'].max() <= 2  # kornia's bounds
    assert wide['hue'].min() >= -0.5 and wide['hue'].max() <= 0.5


@pytest.mark.parametrize('size', [(64, 48), (128, 128), (37, 90)])
def test_blur_matches_kornia(size):
    img = torch.rand(2, 3, *size, dtype=torch.float64)
    sigma = 0.7
    kernel = (aug.blur_kernel_size(size[0]), aug.blur_kernel_size(size[1]))
    theirs = kornia.filters.GaussianBlur2d(kernel, (sigma, sigma))(img)
    # kornia convolves with the float32 outer product of the 1D kernels; ours applies the same
    # float32 1D kernels one axis after the other: equal to float32 rounding of the weights
    torch.testing.assert_close(aug.gaussian_blur(img, sigma), theirs, atol=1e-6, rtol=0)


def test_official_kernel_sizes():
    # floor(ceil(0.1 s) - 0.5 + ceil(0.1 s) % 2): always odd
    assert [aug.blur_kernel_size(s) for s in (512, 128, 1024, 37)] == [51, 13, 103, 3]


def test_strong_transform_round_trips_normalisation():
    mean = torch.tensor([123.675, 116.28, 103.53])
    std = torch.tensor([58.395, 57.12, 57.375])
    pixels = torch.rand(1, 3, 16, 16) * 255
    normalised = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    gen = torch.Generator().manual_seed(0)
    same = aug.strong_transform(
        normalised, mean, std, jitter=False, blur=False, jitter_strength=0.2, generator=gen
    )
    assert torch.equal(same, normalised)
    jittered = aug.strong_transform(
        normalised, mean, std, jitter=True, blur=False, jitter_strength=0.2, generator=gen
    )
    back = jittered * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    assert back.min() >= -1e-3 and back.max() <= 255 + 1e-3  # jitter clamps to the image range
    assert not torch.allclose(jittered, normalised)


def test_class_mix_takes_half_of_the_batch_classes():
    labels = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    labels[0, 0, :2] = 1
    labels[0, 0, 3, 3] = 255  # the ignore value counts as a class, as in the official code
    labels[1, 0, :, :2] = 2
    gen = torch.Generator().manual_seed(0)
    masks = aug.class_mix_masks(labels, gen)
    assert masks.shape == labels.shape and masks.dtype == torch.float32
    for label, mask in zip(labels, masks):
        chosen = torch.unique(label[mask.bool()])
        assert torch.equal(mask.bool(), torch.isin(label, chosen))
    # 4 classes in the batch (0, 1, 2, 255): every mask selects from exactly 2 of them
    seen = set()
    for seed in range(30):
        mask = aug.class_mix_masks(labels, torch.Generator().manual_seed(seed))[0].bool()
        row_classes = {0, 1, 255} & set(torch.unique(labels[0][mask]).tolist())
        assert len(row_classes) <= 2
        seen.add(tuple(sorted(row_classes)))
    assert len(seen) > 2


def test_mix():
    mask = torch.tensor([[1.0, 0.0]])
    assert torch.equal(
        aug.mix(mask, torch.tensor([[5.0, 5.0]]), torch.tensor([[7.0, 7.0]])),
        torch.tensor([[5.0, 7.0]]),
    )


def test_block_mask():
    keep = aug.block_mask((2, 3, 128, 192), 0.7, 64, torch.Generator().manual_seed(0))
    assert keep.shape == (2, 1, 128, 192)
    blocks = keep[:, :, ::64, ::64]
    assert torch.equal(keep, blocks.repeat_interleave(64, 2).repeat_interleave(64, 3))
    many = aug.block_mask((64, 1, 256, 256), 0.7, 16, torch.Generator().manual_seed(1))
    assert abs(many.mean().item() - 0.3) < 0.02


def test_downscale_label_ratio():
    gt = torch.full((1, 1, 4, 4), 3, dtype=torch.long)
    gt[0, 0, :2, :2] = torch.tensor([[1, 1], [1, 2]])  # 3/4 class 1
    gt[0, 0, :2, 2:] = torch.tensor([[1, 1], [2, 2]])  # a tie, 1/2 each
    gt[0, 0, 2:, :2] = 255  # ignore
    out = aug.downscale_label_ratio(gt, 2, 0.75, num_classes=5)
    assert out.tolist() == [[[[1, 255], [255, 3]]]]
    with pytest.raises(ValueError, match='> 1'):
        aug.downscale_label_ratio(gt, 1, 0.75, 5)


def test_hue_wraps():
    hsv = aug.rgb_to_hsv(torch.tensor([[[[1.0]], [[0.0]], [[0.2]]]]))
    assert 0 <= hsv[0, 0].item() < 2 * math.pi
