"""The image operations of DACS-style self-training: ClassMix, colour jitter, blur, patch masking.

Behaviour follows DAFormer's ``mmseg/models/utils/dacs_transforms.py`` (itself from DACS) and the
kornia 0.5.8 operations it calls, so a run draws from the same distributions:

* colour jitter: brightness is *added* (``x + (b - 1)``), contrast *multiplies* without
  re-centring, saturation and hue act in HSV; the four run in a random order shared by the batch
  of one call, with per-image factors (kornia 0.5.8's ``ColorJitter``, not torchvision's and not
  kornia >= 0.6's, which changed brightness and contrast);
* Gaussian blur with a kernel of about a tenth of the image side and one sigma per call, reflect
  padding;
* ClassMix pastes half of the classes present in the *whole batch's* source labels (including the
  ignore label), as the official code does (lhoyer/DAFormer#19).

Every random number comes from the ``torch.Generator`` passed in, so a run is reproducible from
that generator's state alone (DACS keeps it in its checkpoint).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# kornia 0.5.8's hue shift uses its float32 constant for pi (rgb<->hsv use math.pi)
_PI32 = float(torch.tensor(math.pi, dtype=torch.float32))


def _uniform(low: float, high: float, size: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=generator, dtype=torch.float64)


def class_mix_masks(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One ClassMix mask per image: where its label is one of half the batch's classes.

    Args:
        labels: (B, 1, H, W) source labels (the ignore value counts as a class, as officially).
        generator: Source of the class choice.

    Returns:
        (B, 1, H, W) float masks, 1 where the source pixel is pasted.
    """
    classes = torch.unique(labels)
    n = classes.numel()
    masks = []
    for label in labels:
        chosen = classes[torch.randperm(n, generator=generator)[: (n + 1) // 2].to(labels.device)]
        masks.append(torch.isin(label, chosen))
    return torch.stack(masks).to(torch.float32)


def mix(mask: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mask * source + (1 - mask) * target`` with ``mask`` broadcast over channels."""
    mask = mask.to(source.dtype)
    return mask * source + (1 - mask) * target


def rgb_to_hsv(rgb: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> HSV with hue in [0, 2 pi), as kornia 0.5.8 computes it."""
    maxc = rgb.max(dim=-3).values
    minc = rgb.min(dim=-3).values
    delta = maxc - minc
    saturation = delta / (maxc + eps)
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    r, g, b = (maxc.unsqueeze(-3) - rgb).unbind(dim=-3)
    # the first channel holding the maximum decides the sector (R before G before B)
    first = (rgb == maxc.unsqueeze(-3)).to(torch.uint8).argmax(dim=-3)
    sector = torch.stack([b - g, 2.0 * safe + r - b, 4.0 * safe + g - r], dim=-3)
    hue = sector.gather(-3, first.unsqueeze(-3)).squeeze(-3) / safe
    hue = 2 * math.pi * ((hue / 6.0) % 1.0)
    return torch.stack([hue, saturation, maxc], dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    hue, sat, val = hsv.unbind(dim=-3)
    h6 = (hue / (2 * math.pi)) * 6
    sector = torch.floor(h6) % 6
    frac = (h6 % 6) - sector
    p = val * (1 - sat)
    q = val * (1 - frac * sat)
    t = val * (1 - (1 - frac) * sat)
    # (R, G, B) per sector 0..5
    table = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)]
    index = sector.long()
    out = []
    for channel in range(3):
        options = torch.stack([row[channel] for row in table], dim=-3)
        out.append(options.gather(-3, index.unsqueeze(-3)).squeeze(-3))
    return torch.stack(out, dim=-3)


def jitter_params(
    batch: int, strength: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Per-image factors and one order for :func:`apply_color_jitter` (kornia 0.5.8's ranges)."""
    s = float(strength)
    return dict(
        brightness=_uniform(max(0.0, 1 - s), min(2.0, 1 + s), batch, generator),
        contrast=_uniform(max(0.0, 1 - s), 1 + s, batch, generator),
        hue=_uniform(max(-0.5, -s), min(0.5, s), batch, generator),
        saturation=_uniform(max(0.0, 1 - s), 1 + s, batch, generator),
        order=torch.randperm(4, generator=generator),
    )


def apply_color_jitter(img: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Brightness/contrast/saturation/hue on (B, 3, H, W) RGB in [0, 1], in ``params['order']``."""

    def factor(name: str) -> torch.Tensor:
        return params[name].to(img.device, img.dtype).view(-1, 1, 1, 1)

    def brightness(x):
        return (x + factor('brightness') - 1).clamp(0, 1)

    def contrast(x):
        return (x * factor('contrast')).clamp(0, 1)

    def saturation(x):
        hue, sat, val = rgb_to_hsv(x).unbind(dim=-3)
        sat = (sat * factor('saturation')[:, 0]).clamp(0, 1)
        return hsv_to_rgb(torch.stack([hue, sat, val], dim=-3))

    def hue(x):
        h, sat, val = rgb_to_hsv(x).unbind(dim=-3)
        h = torch.fmod(h + factor('hue')[:, 0] * 2 * _PI32, 2 * _PI32)
        return hsv_to_rgb(torch.stack([h, sat, val], dim=-3))

    steps = (brightness, contrast, saturation, hue)
    for index in params['order'].tolist():
        img = steps[index](img)
    return img


def blur_kernel_size(size: int) -> int:
    """The official odd kernel size for an image side: about a tenth of it."""
    tenth = math.ceil(0.1 * size)
    return int(math.floor(tenth - 0.5 + tenth % 2))


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with the official kernel size, reflect padding."""
    _, channels, height, width = img.shape
    out = img
    for dim, size in ((2, height), (3, width)):
        k = blur_kernel_size(size)
        if k <= 1:
            continue
        # the kernel in float32, as kornia builds it, whatever the image's dtype
        x = (torch.arange(k, device=img.device) - k // 2).float()
        kernel = torch.exp(-(x**2) / (2 * sigma**2))
        kernel = (kernel / kernel.sum()).to(img.dtype).repeat(channels, 1)
        if dim == 2:
            pad, weight = (0, 0, k // 2, k // 2), kernel.view(channels, 1, k, 1)
        else:
            pad, weight = (k // 2, k // 2, 0, 0), kernel.view(channels, 1, 1, k)
        out = F.conv2d(F.pad(out, pad, mode='reflect'), weight, groups=channels)
    return out


def strong_transform(
    img: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    jitter: bool,
    blur: bool,
    jitter_strength: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Colour jitter and blur of a normalised (B, 3, H, W) batch, returned normalised.

    ``jitter``/``blur`` say whether each applies (the caller draws these once per iteration as
    the official loop does); the jitter factors are drawn per image and the blur sigma once.
    ``mean``/``std`` are the (3,) or (1, 3, 1, 1) RGB normalisation on the 0..255 scale.
    """
    mean = mean.reshape(1, -1, 1, 1).to(img)
    std = std.reshape(1, -1, 1, 1).to(img)
    if jitter:
        params = jitter_params(img.shape[0], jitter_strength, generator)
        img = (apply_color_jitter((img * std + mean) / 255.0, params) * 255.0 - mean) / std
    if blur:
        sigma = float(_uniform(0.15, 1.15, 1, generator))
        img = gaussian_blur(img, sigma)
    return img


def block_mask(
    shape: tuple[int, int, int, int], ratio: float, block: int, generator: torch.Generator
) -> torch.Tensor:
    """MIC's random patch mask: (B, 1, H, W) with ``ratio`` of ``block``-sized patches zero."""
    batch, _, height, width = shape
    grid = torch.rand(batch, 1, round(height / block), round(width / block), generator=generator)
    keep = (grid > ratio).to(torch.float32)
    return F.interpolate(keep, size=(height, width), mode='nearest')


def downscale_label_ratio(
    labels: torch.Tensor, factor: int, min_ratio: float, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Labels pooled by ``factor``: each cell's majority class if it covers ``min_ratio`` of it.

    Args:
        labels: (B, 1, H, W) integer labels.
        factor: Pooling factor (> 1).
        min_ratio: Minimum fraction of the cell the majority class must cover, else ignore.
        num_classes: Number of real classes (the ignore value is counted as one more).
        ignore_index: The ignore value.

    Returns:
        (B, 1, H // factor, W // factor) long labels.
    """
    if factor <= 1:
        raise ValueError(f'factor must be > 1, got {factor}')
    labels = labels.long().clone()
    labels[labels == ignore_index] = num_classes
    one_hot = F.one_hot(labels.squeeze(1), num_classes + 1).permute(0, 3, 1, 2).float()
    ratio, out = F.avg_pool2d(one_hot, kernel_size=factor).max(dim=1, keepdim=True)
    out[out == num_classes] = ignore_index
    out[ratio < min_ratio] = ignore_index
    return out
