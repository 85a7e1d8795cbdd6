"""EfficientFormerV2 backbone for dense prediction.

Li et al., "Rethinking Vision Transformers for MobileNet Size and Speed", ICCV 2023.
Reference: the official dense code, snap-research/EfficientFormer ``segmentation/backbonev2.py``
(``efficientformerv2_{s0,s1,s2,l}_feat``, used by the official Semantic FPN configs) and its twin
``detection/backbonev2.py`` (Mask R-CNN), @ d01da42; our outputs match it to float64 round-off,
and with ``out_norm=True, attn_bias_size=224`` they match the classification file
``models/efficientformer_v2.py`` in ``fork_feat`` mode. Written anew; what differs and why:

* State-dict names follow timm's layout (``stem.conv1.conv``/``.bn``, ``stages.i.downsample``,
  ``stages.i.blocks.j``, ``q.conv``/``q.bn`` for every conv + BatchNorm pair, ``ls1.gamma``)
  instead of the official flat ``network.k`` list with ``nn.Sequential`` indices;
  ``convert_*`` below translate the official dense, official ImageNet and timm checkpoints.
* One bias table per attention (``attention_biases``), laid out for ``attn_bias_size`` (512
  segmentation, 800 detection, 224 ImageNet); the official dense code keeps the ImageNet table
  as an unused buffer beside a zero-initialised ``attention_biases_seg``. Index tables are rebuilt.
* The attention without talking heads (the downsampling one) runs through
  ``F.scaled_dot_product_attention``; the talking-heads attention mixes heads before and after
  the softmax, which SDPA cannot express, so it stays explicit (with the scale folded into q).
  Resized biases are cached in inference, as in ``efficientformer.py``. On CPU, eval-mode
  BatchNorms are folded on the fly and attention outputs are laid out channels-last (fast
  bilinear upsampling and 1x1 projection), for the same one copy as the NCHW reshape.
* ``switch_to_deploy()`` folds every BatchNorm into its convolution, the query's stride-2
  subsampling branch into the centre tap of its depthwise convolution, and layer scales into
  the convolution before them.

Behaviour of the official dense code that we keep on purpose (it defines the published numbers):
biases are the learned token-pair matrices of the training grid resized as images
(``F.interpolate(mode='bicubic')``) to the runtime (queries, keys); ImageNet tables laid out for
another grid restart from zero (EfficientFormer#19); no output norms (the dense file has them
commented out; ``out_norm=True`` adds the classification file's BatchNorms).

Any input size. The official dense code crashes unless the stride-16 grid has even sides (its
strided attention computes ``H // 2`` while its stride-2 conv rounds up; golden README quirk 4).
We use the convolutions' rounded-up grids throughout, which is identical where the official code
runs: the strided attention upsamples its ceil(H/2) x ceil(W/2) result by 2 and crops it back to
H x W (the same as padding its input to even sides), and the downsampling attention's queries
live on the ceil(H/2) x ceil(W/2) grid its stride-2 convolutions produce while its keys stay the
H x W real tokens (no padded keys).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from timm.layers import DropPath, trunc_normal_
from torch import nn

from effvision.models.backbones.base import DenseBackbone
from effvision.models.backbones.efficientformer import (
    BiasedAttention,
    LayerScale,
    attention_bias_index,
    conv_bn,
    cpu_kernels,
    drop_unfit_bias_tables,
    fuse_conv_bn,
)
from effvision.registry import MODELS
from effvision.utils.checkpoint import CheckpointError

__all__ = [
    'EfficientFormerV2',
    'DERIVED_KEYS',
    'detect_format',
    'convert_official_dense',
    'convert_official_cls',
    'convert_timm',
    'convert_to_effvision',
]


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
class ConvNorm(nn.Module):
    """Conv2d followed by BatchNorm2d (folded into the conv by :meth:`fuse`)."""

    def __init__(
        self, in_chans: int, out_chans: int, kernel: int = 1, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, kernel, stride, kernel // 2, groups=groups)
        self.bn: nn.Module = nn.BatchNorm2d(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, ceil(H/stride), ceil(W/stride))."""
        return conv_bn(self.conv, self.bn, x)

    def fuse(self, scale: torch.Tensor | None = None) -> None:
        """Fold the BatchNorm (then an optional per-channel ``scale``) into the conv."""
        fuse_conv_bn(self.conv, self.bn, scale)
        self.bn = nn.Identity()


class Stem(nn.Module):
    """Two 3x3 stride-2 ConvNorm + GELU: (B, C_in, H, W) -> (B, C, ceil(H/4), ceil(W/4))."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(in_chans, out_chans // 2, 3, stride=2)
        self.conv2 = ConvNorm(out_chans // 2, out_chans, 3, stride=2)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C, ceil(H/4), ceil(W/4))."""
        return self.act(self.conv2(self.act(self.conv1(x))))


class ConvMlp(nn.Module):
    """1x1 ConvNorm + GELU, depthwise 3x3 ConvNorm + GELU (no residual), 1x1 ConvNorm."""

    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = ConvNorm(dim, hidden)
        self.mid = ConvNorm(hidden, hidden, 3, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = ConvNorm(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        x = self.act(self.mid(self.act(self.fc1(x))))
        return self.drop(self.fc2(self.drop(x)))


class Attention2d(BiasedAttention):
    """Talking-heads attention on NCHW maps with a local (depthwise) value branch.

    With ``stride=2`` (stage 3 of 4) it attends on the stride-2 grid and upsamples back. Sizes
    are fixed whatever the width, as in the official code: 8 heads, key dim 32, value dim 128.
    """

    def __init__(
        self,
        dim: int,
        resolution: int,
        stride: int | None,
        key_dim: int = 32,
        num_heads: int = 8,
        attn_ratio: int = 4,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = attn_ratio * key_dim
        self.scale = key_dim**-0.5
        if stride is not None:
            resolution = -(-resolution // stride)
            self.stride_conv: nn.Module | None = ConvNorm(dim, dim, 3, stride=stride, groups=dim)
        else:
            self.stride_conv = None
        self.stride = stride
        self.resolution = resolution
        dh = num_heads * self.val_dim
        self.q = ConvNorm(dim, num_heads * key_dim)
        self.k = ConvNorm(dim, num_heads * key_dim)
        self.v = ConvNorm(dim, dh)
        self.v_local = ConvNorm(dh, dh, 3, groups=dh)
        self.talking_head1 = nn.Conv2d(num_heads, num_heads, 1)
        self.talking_head2 = nn.Conv2d(num_heads, num_heads, 1)
        self.act = nn.GELU()
        self.proj = ConvNorm(dh, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        self.register_buffer(
            'attention_bias_idxs', attention_bias_index(resolution, resolution), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        b, _, h, w = x.shape
        y = self.stride_conv(x) if self.stride_conv is not None else x
        hs, ws = y.shape[2], y.shape[3]  # ceil(H / stride), ceil(W / stride)
        n = hs * ws
        q = self.q(y).flatten(2).view(b, self.num_heads, self.key_dim, n).transpose(2, 3)
        k = self.k(y).flatten(2).view(b, self.num_heads, self.key_dim, n)
        v = self.v(y)
        v_local = self.v_local(v)
        v = v.flatten(2).view(b, self.num_heads, self.val_dim, n).transpose(2, 3)
        attn = (q * self.scale) @ k + self.attention_bias(n, n, q.dtype)  # (B, heads, N, N)
        attn = self.talking_head2(self.talking_head1(attn).softmax(dim=-1))
        out = _heads_to_map(attn @ v, hs, ws) + v_local
        if self.stride_conv is not None:
            # an explicit size, not scale_factor: same numbers for an integer stride, and no
            # float rounding of the size that would pin H/W in a dynamic-shape export
            size = (hs * self.stride, ws * self.stride)
            out = F.interpolate(out, size=size, mode='bilinear', align_corners=False)
            # crop the rounded-up row/column (none for the even grids the official code takes)
            out = _crop(out, h, w)
        return self.proj(self.act(out))


def _heads_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, heads, h*w, d) attention output -> (B, heads*d, h, w).

    One copy either way. On CPU the map is laid out channels-last, which makes the following
    bilinear upsampling (~100x for 1024 channels) and 1x1 projection faster; elsewhere NCHW.
    """
    if not cpu_kernels(x):
        return x.transpose(2, 3).reshape(x.shape[0], -1, h, w)
    return x.transpose(1, 2).reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)


def _crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """x[:, :, :h, :w]; a gather under torch.compile/export, where slicing to a symbolic size
    would make the exporter guard on h <= 2 * ceil(h / 2) and specialise the input size."""
    if not torch.compiler.is_compiling():
        return x[:, :, :h, :w]
    x = x.index_select(2, torch.arange(h, device=x.device))
    return x.index_select(3, torch.arange(w, device=x.device))


class LocalGlobalQuery(nn.Module):
    """Stride-2 query: depthwise 3x3 stride-2 conv plus 2x subsampling, then 1x1 ConvNorm."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.local = nn.Conv2d(in_dim, in_dim, 3, stride=2, padding=1, groups=in_dim)
        self.proj = ConvNorm(in_dim, out_dim)
        self.subsample = True  # folded into ``local`` by fuse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C_out, ceil(H/2), ceil(W/2))."""
        q = self.local(x)
        if self.subsample:  # the official AvgPool2d(1, 2, 0): every other row and column
            q = q + F.avg_pool2d(x, kernel_size=1, stride=2)
        return self.proj(q)

    @torch.no_grad()
    def fuse(self) -> None:
        if self.subsample:
            # x[2i, 2j] is the centre tap of the stride-2, padding-1 3x3 window of output (i, j)
            self.local.weight[:, 0, 1, 1] += 1
            self.subsample = False
        self.proj.fuse()


class Attention2dDownsample(BiasedAttention):
    """Attention from a stride-2 query grid to all H x W tokens, with a stride-2 local value.

    Sizes as in the official code: 8 heads, key dim 16, value dim 64.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        resolution: int,
        key_dim: int = 16,
        num_heads: int = 8,
        attn_ratio: int = 4,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = attn_ratio * key_dim
        self.scale = key_dim**-0.5
        self.resolution = resolution
        self.resolution2 = -(-resolution // 2)
        dh = num_heads * self.val_dim
        self.q = LocalGlobalQuery(dim, num_heads * key_dim)
        self.k = ConvNorm(dim, num_heads * key_dim)
        self.v = ConvNorm(dim, dh)
        self.v_local = ConvNorm(dh, dh, 3, stride=2, groups=dh)
        self.act = nn.GELU()
        self.proj = ConvNorm(dh, out_dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        stride = -(-resolution // self.resolution2)  # 2 (1 for a 1x1 grid)
        self.register_buffer(
            'attention_bias_idxs',
            attention_bias_index(self.resolution2, resolution, stride),
            persistent=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C_out, ceil(H/2), ceil(W/2))."""
        b, _, h, w = x.shape
        q = self.q(x)
        hq, wq = q.shape[2], q.shape[3]
        nq, nk = hq * wq, h * w
        q = q.flatten(2).view(b, self.num_heads, self.key_dim, nq).transpose(2, 3)
        k = self.k(x).flatten(2).view(b, self.num_heads, self.key_dim, nk).transpose(2, 3)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.flatten(2).view(b, self.num_heads, self.val_dim, nk).transpose(2, 3)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.attention_bias(nq, nk, q.dtype), scale=self.scale
        )  # (B, heads, Nq, val_dim)
        out = _heads_to_map(out, hq, wq) + v_local
        return self.proj(self.act(out))


class Downsample(nn.Module):
    """3x3 stride-2 ConvNorm, plus (before the last stage) the downsampling attention."""

    def __init__(self, in_chans: int, out_chans: int, resolution: int | None) -> None:
        super().__init__()
        self.conv = ConvNorm(in_chans, out_chans, 3, stride=2)
        self.attn = (
            Attention2dDownsample(in_chans, out_chans, resolution)
            if resolution is not None
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, ceil(H/2), ceil(W/2))."""
        out = self.conv(x)
        return out + self.attn(x) if self.attn is not None else out

    def fuse(self) -> None:
        self.conv.fuse()
        if self.attn is not None:
            attn = self.attn
            attn.q.fuse()
            for name in ('k', 'v', 'v_local', 'proj'):
                getattr(attn, name).fuse()


class EfficientFormerV2Block(nn.Module):
    """Optional attention (stages 3 and 4) and a conv MLP, each residual with a layer scale."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float,
        use_attn: bool,
        resolution: int,
        stride: int | None,
        drop: float,
        drop_path: float,
        layer_scale_init_value: float,
    ) -> None:
        super().__init__()
        if use_attn:
            self.token_mixer: nn.Module | None = Attention2d(dim, resolution, stride)
            self.ls1: nn.Module | None = LayerScale(dim, layer_scale_init_value)
        else:
            self.token_mixer = self.ls1 = None
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop)
        self.ls2: nn.Module = LayerScale(dim, layer_scale_init_value)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        if self.token_mixer is not None:
            x = x + self.drop_path(self.ls1(self.token_mixer(x)))
        return x + self.drop_path(self.ls2(self.mlp(x)))

    def fuse(self) -> None:
        mlp = self.mlp
        mlp.fc1.fuse()
        mlp.mid.fuse()
        mlp.fc2.fuse(self.ls2.gamma if isinstance(self.ls2, LayerScale) else None)
        self.ls2 = nn.Identity()
        if isinstance(self.token_mixer, Attention2d):
            mixer = self.token_mixer
            for name in ('q', 'k', 'v', 'v_local'):
                getattr(mixer, name).fuse()
            if mixer.stride_conv is not None:
                mixer.stride_conv.fuse()
            mixer.proj.fuse(self.ls1.gamma if isinstance(self.ls1, LayerScale) else None)
            self.ls1 = nn.Identity()


class EfficientFormerV2Stage(nn.Module):
    """Optional downsampling, then ``depth`` blocks, the last ``num_vit`` with attention."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        downsample: bool,
        downsample_resolution: int | None,
        use_attn: bool,
        num_vit: int,
        resolution: int,
        stride: int | None,
        mlp_ratios: Sequence[float],
        drop: float,
        drop_path: Sequence[float],
        layer_scale_init_value: float,
        with_cp: bool,
    ) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.downsample = (
            Downsample(in_dim, dim, downsample_resolution) if downsample else nn.Identity()
        )
        self.blocks = nn.Sequential(
            *(
                EfficientFormerV2Block(
                    dim,
                    mlp_ratios[j],
                    use_attn and j >= depth - num_vit,
                    resolution,
                    stride,
                    drop,
                    drop_path[j],
                    layer_scale_init_value,
                )
                for j in range(depth)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C, H', W'), H' = ceil(H / 2) if downsampling else H."""
        x = self.downsample(x)
        for block in self.blocks:
            if self.with_cp and x.requires_grad:
                x = cp.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def _ratios(*stages: Sequence[float]) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(s) for s in stages)


@MODELS.register_module()
class EfficientFormerV2(DenseBackbone):
    """EfficientFormerV2 backbone with the official dense-prediction behaviour.

    Args:
        arch: One of :attr:`arch_settings` (``s0``, ``s1``, ``s2``, ``l``), or None to give
            ``depths``, ``widths``, ``mlp_ratios`` and ``num_vit`` explicitly. Explicit values
            override the arch's.
        depths: Blocks per stage.
        widths: Channels per stage.
        mlp_ratios: Per stage, the MLP expansion ratio of each block.
        num_vit: Blocks with attention at the end of stages 3 and 4 (of 4).
        drop_path_rate: Stochastic depth, increasing linearly from 0 over all blocks (the
            official dense classes fix 0, 0, 0.02, 0.1 for S0, S1, S2, L; None takes that).
        attn_bias_size: Input side the attention bias tables are laid out for: 512 (official
            segmentation), 800 (detection) or 224 (ImageNet/timm). Any input size works with any
            value; biases are resized to the actual grids.
        layer_scale_init_value: Initial layer scale.
        in_channels: Input image channels.
        drop_rate: Dropout in the MLPs.
        out_indices: Stages whose outputs are returned.
        out_norm: Add a BatchNorm per output, as the classification file in ``fork_feat`` mode
            (the official dense backbone has none).
        frozen_stages: -1 freezes nothing; 0 the stem; k >= 1 the stem and stages 0..k-1 (with
            their output norms).
        norm_eval: Keep BatchNorm layers in eval mode while training.
        with_cp: Gradient checkpointing of every block.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH[, prefix='backbone'])`` loads an
            official dense (segmentation/detection), official ImageNet, timm or effvision
            checkpoint, converted on the fly; otherwise the official random init.
    """

    arch_settings: ClassVar[dict[str, dict[str, Any]]] = {
        # snap-research/EfficientFormer segmentation/backbonev2.py: EfficientFormer_{width,depth},
        # expansion_ratios_*, and the drop_path_rate / vit_num of the *_feat classes
        's0': dict(
            depths=(2, 2, 6, 4),
            widths=(32, 48, 96, 176),
            mlp_ratios=_ratios((4, 4), (4, 4), (4, 3, 3, 3, 4, 4), (4, 3, 3, 4)),
            num_vit=2,
            drop_path_rate=0.0,
        ),
        's1': dict(
            depths=(3, 3, 9, 6),
            widths=(32, 48, 120, 224),
            mlp_ratios=_ratios((4,) * 3, (4,) * 3, (4, 4, 3, 3, 3, 3, 4, 4, 4), (4, 4, 3, 3, 4, 4)),
            num_vit=2,
            drop_path_rate=0.0,
        ),
        's2': dict(
            depths=(4, 4, 12, 8),
            widths=(32, 64, 144, 288),
            mlp_ratios=_ratios(
                (4,) * 4, (4,) * 4, (4, 4) + (3,) * 6 + (4,) * 4, (4, 4, 3, 3, 3, 3, 4, 4)
            ),
            num_vit=4,
            drop_path_rate=0.02,
        ),
        'l': dict(
            depths=(5, 5, 15, 10),
            widths=(40, 80, 192, 384),
            mlp_ratios=_ratios(
                (4,) * 5, (4,) * 5, (4,) * 4 + (3,) * 7 + (4,) * 4, (4, 4, 4, 3, 3, 3, 3, 4, 4, 4)
            ),
            num_vit=6,
            drop_path_rate=0.1,
        ),
    }

    def __init__(
        self,
        *,
        arch: str | None = 's0',
        depths: Sequence[int] | None = None,
        widths: Sequence[int] | None = None,
        mlp_ratios: Sequence[Sequence[float]] | None = None,
        num_vit: int | None = None,
        drop_path_rate: float | None = None,
        attn_bias_size: int = 512,
        layer_scale_init_value: float = 1e-5,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        out_norm: bool = False,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        with_cp: bool = False,
        init_cfg: dict | list[dict] | None = None,
    ) -> None:
        settings = self.resolve_arch(
            arch, depths=depths, widths=widths, mlp_ratios=mlp_ratios, num_vit=num_vit
        )
        depths, widths = tuple(settings['depths']), tuple(settings['widths'])
        mlp_ratios = tuple(tuple(r) for r in settings['mlp_ratios'])
        num_vit = settings['num_vit']
        if drop_path_rate is None:
            drop_path_rate = settings.get('drop_path_rate', 0.0)
        if len(depths) != 4 or len(widths) != 4:
            raise ValueError(
                f'EfficientFormerV2 has 4 stages (attention in the last two); got depths {depths}'
                f' and widths {widths}'
            )
        if [len(r) for r in mlp_ratios] != list(depths):
            raise ValueError(f'mlp_ratios {mlp_ratios} must give one ratio per block of {depths}')
        if not 0 <= num_vit <= min(depths[2:]):
            raise ValueError(f'num_vit={num_vit} must be in [0, {min(depths[2:])}]')
        if attn_bias_size < 1:
            raise ValueError(f'attn_bias_size={attn_bias_size} must be positive')
        super().__init__(
            num_stages=4,
            out_indices=out_indices,
            frozen_stages=frozen_stages,
            norm_eval=norm_eval,
            init_cfg=init_cfg,
        )
        self.depths, self.widths, self.mlp_ratios = depths, widths, mlp_ratios
        self.num_vit = num_vit
        self.attn_bias_size = attn_bias_size
        self.num_features = list(widths)

        def grid(i: int) -> int:  # token grid side of stage i at attn_bias_size
            return -(-attn_bias_size // 2 ** (i + 2))

        self.stem = Stem(in_channels, widths[0])
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.stages.append(
                EfficientFormerV2Stage(
                    widths[max(i - 1, 0)],
                    widths[i],
                    depth,
                    downsample=i > 0,
                    downsample_resolution=grid(i - 1) if i == 3 else None,
                    use_attn=i >= 2,
                    num_vit=num_vit,
                    resolution=grid(i),
                    stride=2 if i == 2 else None,
                    mlp_ratios=mlp_ratios[i],
                    drop=drop_rate,
                    drop_path=rates[start : start + depth],
                    layer_scale_init_value=layer_scale_init_value,
                    with_cp=with_cp,
                )
            )
        self.out_norm = out_norm
        if out_norm:
            for i in self.out_indices:
                self.add_module(f'norm{i}', nn.BatchNorm2d(widths[i]))
        self.feature_info = [
            dict(num_chs=widths[i], reduction=2 ** (i + 2), module=f'stages.{i}')
            for i in self.out_indices
        ]
        self.deployed = False
        self._freeze_stages()

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Extract multi-scale features.

        Args:
            x: (B, C_in, H, W) images of any size (no padding: convolutions round up).

        Returns:
            One (B, widths[i], ceil(H / 2**(i + 2)), ceil(W / 2**(i + 2))) tensor per
            ``out_indices`` entry (after its BatchNorm with ``out_norm``).
        """
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(getattr(self, f'norm{i}')(x) if self.out_norm else x)
        return tuple(outs)

    # -- training utilities --------------------------------------------------------------------
    @torch.no_grad()
    def switch_to_deploy(self) -> EfficientFormerV2:
        """Fold BatchNorms, the query subsampling branch and layer scales into convolutions.

        For inference: the model is put in eval mode and its state dict loses the folded keys.
        The output BatchNorms (``out_norm``) stay, having no conv before them. Calling it again
        changes nothing.
        """
        if self.deployed:
            return self
        self.eval()
        self.stem.conv1.fuse()
        self.stem.conv2.fuse()
        for stage in self.stages:
            if isinstance(stage.downsample, Downsample):
                stage.downsample.fuse()
            for block in stage.blocks:
                block.fuse()
        self.deployed = True
        return self

    # -- weight init ---------------------------------------------------------------------------
    def init_random_weights(self) -> None:
        """The official init: truncated normal (std 0.02) and zero bias for the MLPs' 1x1 convs,
        PyTorch defaults for every other conv and norm, zero attention biases."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.BatchNorm2d):
                module.reset_parameters()
            elif isinstance(module, LayerScale):
                nn.init.constant_(module.gamma, module.init_value)
            elif isinstance(module, BiasedAttention):
                nn.init.zeros_(module.attention_biases)
        for module in self.modules():  # after the resets above, which also reach these convs
            if isinstance(module, ConvMlp):
                for fc in (module.fc1.conv, module.fc2.conv):
                    trunc_normal_(fc.weight, std=0.02)
                    nn.init.zeros_(fc.bias)

    def convert_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Convert any supported format (see :func:`detect_format`) to this model's keys.

        Output norms the model does not have are left out, and attention bias tables laid out
        for another grid are dropped with a warning (they restart from zero, as in the official
        dense code).
        """
        converted, fmt = convert_to_effvision(state)
        own = {k for k in self.state_dict() if re.match(r'norm\d+\.', k)}
        converted = {
            k: v for k, v in converted.items() if not re.match(r'norm\d+\.', k) or k in own
        }
        return drop_unfit_bias_tables(self, converted, fmt)


# ---------------------------------------------------------------------------------------------
# official-checkpoint conversion
# ---------------------------------------------------------------------------------------------
# Buffers the official code stores that we rebuild from the configuration (the dense code's
# ``attention_biases`` placeholder is dropped too: its forward never reads it).
DERIVED_KEYS = ('attention_bias_idxs', 'attention_bias_idxs_seg')
_CLS_HEAD_PREFIXES = ('head.', 'dist_head.', 'head_dist.', 'norm.')

# official nn.Sequential indices and names -> our ConvNorm/module names, applied in this order
# (the query's own ``proj`` before the generic attention ``proj``)
_OFFICIAL_SUBMODULES = [
    (r'\.q\.local\.0\.', '.q.local.'),
    (r'\.q\.proj\.0\.', '.q.proj.conv.'),
    (r'\.q\.proj\.1\.', '.q.proj.bn.'),
    (r'\.(stride_conv|q|k|v|v_local)\.0\.', r'.\1.conv.'),
    (r'\.(stride_conv|q|k|v|v_local)\.1\.', r'.\1.bn.'),
    (r'\.proj\.1\.', '.proj.conv.'),
    (r'\.proj\.2\.', '.proj.bn.'),
    (r'\.mlp\.fc1\.', '.mlp.fc1.conv.'),
    (r'\.mlp\.norm1\.', '.mlp.fc1.bn.'),
    (r'\.mlp\.mid\.', '.mlp.mid.conv.'),
    (r'\.mlp\.mid_norm\.', '.mlp.mid.bn.'),
    (r'\.mlp\.fc2\.', '.mlp.fc2.conv.'),
    (r'\.mlp\.norm2\.', '.mlp.fc2.bn.'),
]


def detect_format(state: Mapping[str, torch.Tensor]) -> str:
    """Name the format of an EfficientFormerV2 state dict.

    Returns:
        ``'official_dense'`` (segmentation/backbonev2.py or detection/backbonev2.py: ``network.*``
        with ``attention_biases_seg``), ``'official_cls'`` (models/efficientformer_v2.py: the
        ImageNet checkpoints, or its ``fork_feat`` form with ``norm{0,2,4,6}``), ``'timm'``
        (``stem.*``/``stages.*`` with a classifier) or ``'effvision'``.

    Raises:
        CheckpointError: Not an EfficientFormerV2 checkpoint (the message says which model fits
            when it is a v1 one).
    """
    keys = list(state)
    if not any('.mlp.mid' in k for k in keys):
        if any('mlp.fc1' in k for k in keys):
            raise CheckpointError(
                'this is an EfficientFormer (v1) checkpoint (its MLPs have no depthwise mid '
                "conv); build the backbone with type='EfficientFormer'"
            )
        raise CheckpointError(
            'not an EfficientFormerV2 checkpoint: no MLP key (.mlp.mid) found; first keys: '
            f"{keys[:5]}. For a full segmentor or detector checkpoint pass prefix='backbone'."
        )
    if any(k.startswith('network.') for k in keys):
        dense = any(k.endswith('attention_biases_seg') for k in keys)
        return 'official_dense' if dense else 'official_cls'
    if any(k.startswith('stages.') for k in keys):
        timm = any(k.startswith(_CLS_HEAD_PREFIXES) for k in keys)
        return 'timm' if timm else 'effvision'
    raise CheckpointError(
        'not an EfficientFormerV2 checkpoint: no key starts with network. (official) or '
        f'stages. (timm/effvision); first keys: {keys[:5]}.'
    )


def _official_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official key names -> ours (shared by the dense, ImageNet and fork_feat formats).

    ``network.2i`` holds stage i's blocks, ``network.2i-1`` the downsampling into stage i
    (``proj``/``norm``, or ``conv``/``bn``/``attn`` before the last stage).
    """
    out = {}
    for key, value in state.items():
        new = key
        if m := re.match(r'patch_embed\.(\d)\.(.*)', key):
            part = {'0': 'conv1.conv', '1': 'conv1.bn', '3': 'conv2.conv', '4': 'conv2.bn'}
            new = f'stem.{part[m[1]]}.{m[2]}'
        elif m := re.match(r'network\.(\d+)\.(proj|norm|conv|bn|attn)\.(.*)', key):
            part = {'proj': 'conv.conv', 'norm': 'conv.bn', 'conv': 'conv.conv', 'bn': 'conv.bn'}
            new = f'stages.{(int(m[1]) + 1) // 2}.downsample.{part.get(m[2], m[2])}.{m[3]}'
        elif m := re.match(r'network\.(\d+)\.(\d+)\.(.*)', key):
            new = f'stages.{int(m[1]) // 2}.blocks.{m[2]}.{m[3]}'
        elif m := re.match(r'norm(\d+)\.(.*)', key):
            new = f'norm{int(m[1]) // 2}.{m[2]}'
        for pattern, repl in _OFFICIAL_SUBMODULES:
            new = re.sub(pattern, repl, new, count=1)
        if m := re.match(r'(.*)layer_scale_(\d)$', new):
            new = f'{m[1]}ls{m[2]}.gamma'
            value = value.reshape(-1)  # (C, 1, 1) -> (C,)
        out[new] = value
    return out


def convert_official_dense(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official dense checkpoint (segmentation or detection ``*_feat``) -> effvision keys.

    The used tables ``attention_biases_seg`` become ``attention_biases``; the unused ImageNet
    placeholders and the index buffers are dropped.
    """
    kept = {}
    for key, value in state.items():
        if key.endswith(DERIVED_KEYS) or key.endswith('.attention_biases'):
            continue
        if key.endswith('attention_biases_seg'):
            key = key[: -len('_seg')]
        kept[key] = value
    return _official_names(kept)


def convert_official_cls(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ImageNet (or ``fork_feat``) checkpoint -> effvision keys.

    Heads, the final norm and index buffers are dropped; the bias tables (laid out for 224) are
    kept, and a model laid out for another grid drops them on load.
    """
    return _official_names(convert_timm(state))  # timm drops the same heads and buffers


def convert_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``efficientformerv2_*`` checkpoint -> effvision keys (same layout, heads dropped)."""
    return {
        k: v
        for k, v in state.items()
        if not k.startswith(_CLS_HEAD_PREFIXES) and not k.endswith(DERIVED_KEYS)
    }


_CONVERTERS = {
    'official_dense': convert_official_dense,
    'official_cls': convert_official_cls,
    'timm': convert_timm,
    'effvision': convert_timm,  # drops nothing of ours
}


def convert_to_effvision(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Detect the format of a V2 state dict and convert it; returns (state, format)."""
    fmt = detect_format(state)
    return _CONVERTERS[fmt](state), fmt
