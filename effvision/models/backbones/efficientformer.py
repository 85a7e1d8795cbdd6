"""EfficientFormer (v1) backbone for dense prediction.

Li et al., "EfficientFormer: Vision Transformers at MobileNet Speed", NeurIPS 2022.
Reference: the official dense code, snap-research/EfficientFormer ``segmentation/backbone.py``
(``efficientformer_l{1,3,7}_feat``, used by the official Semantic FPN configs) and its twin
``detection/backbone.py`` (Mask R-CNN), @ d01da42; our outputs match it to float64 round-off.
Written anew; what differs and why:

* State-dict names follow timm's layout (``stem.conv1``, ``stages.i.downsample``,
  ``stages.i.blocks.j`` with the parameterless ``Flat`` keeping its index, ``ls1.gamma``), which
  is cleaner than the official flat ``network.k`` list; the official dense ``norm{0,2,4,6}``
  output norms become ``norm{0..3}``. ``convert_*`` below translate the official dense (segmentation
  and detection), official ImageNet and timm checkpoints.
* The attention bias table is one parameter, ``attention_biases``, laid out for the token grid of
  ``attn_bias_size`` (512: the official segmentation code's 16x16 grid, 800: detection's 25x25,
  224: ImageNet's 7x7). The official dense code keeps the ImageNet table as an unused buffer next
  to a second, zero-initialised ``attention_biases_seg``; we keep only the table that is used.
  Index tables are rebuilt (non-persistent buffers) and not stored.
* Attention runs through ``F.scaled_dot_product_attention`` with the bias as an additive mask.
  In inference (eval mode, no gradient to the table) the resized bias is cached for the last
  token count seen, keyed on the table's version, so ``load_state_dict`` or ``.double()`` never
  leave a stale bias (the official eval-time cache ``self.ab`` does; golden README quirk 3).
* On CPU (see :func:`cpu_kernels`), eval-mode BatchNorms are folded into their convolution on
  the fly and the pooling mixer is a depthwise convolution of ones over the in-image tap count:
  the same arithmetic up to rounding, without PyTorch's slow CPU average pooling and one pass
  less over the activations. Elsewhere the standard operations run.
* ``switch_to_deploy()`` folds every BatchNorm into the convolution before it and every layer
  scale that follows a convolution or linear layer into it.

Behaviour of the official dense code that we keep on purpose (it defines the published numbers):
the bias for a grid of N tokens is the learned (heads, R^2, R^2) token-pair matrix of the R x R
training grid resized to (N, N) with ``F.interpolate(mode='bicubic', align_corners=False)``, as
if it were an image: it is not a geometric resize of the offset table, yet it is what the
published models were trained and evaluated with. ImageNet bias tables laid out for another grid
are dropped and re-learned from zero, as the official dense code does (EfficientFormer#19).
Any input size works without padding: every stride-2 convolution (k3, p1) rounds up, so stage i
has ``ceil(H / 2**(i + 2))`` rows; the attention needs no particular grid.

Not reproduced: the ``FORK_LAST3`` environment switch (replaces ``norm0`` with Identity), and the
classification file's ``fork_feat`` mode, which cannot run (LayerNorm on NCHW; golden README).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.logging import print_log
from timm.layers import DropPath, trunc_normal_
from torch import nn

from effvision.models.backbones.base import DenseBackbone
from effvision.models.layers.mlp import Mlp
from effvision.registry import MODELS
from effvision.utils.checkpoint import CheckpointError

__all__ = [
    'EfficientFormer',
    'DERIVED_KEYS',
    'detect_format',
    'convert_official_dense',
    'convert_official_cls',
    'convert_timm',
    'convert_to_effvision',
]


# ---------------------------------------------------------------------------------------------
# building blocks shared with EfficientFormerV2
# ---------------------------------------------------------------------------------------------
def attention_bias_index(
    q_res: int, k_res: int, stride: int = 1, device: torch.device | None = None
) -> torch.Tensor:
    """(q_res^2, k_res^2) index into a table of ``k_res^2`` learned biases per head.

    Query (qy, qx) sits at (stride * qy, stride * qx) of the key grid; the pair gets the entry of
    its absolute offset (|dy|, |dx|), numbered ``|dy| * k_res + |dx|``. This is the official
    numbering: its dict of offsets is filled in this order by the first query, which sees every
    offset.
    """
    q = torch.arange(q_res * q_res, device=device)
    k = torch.arange(k_res * k_res, device=device)
    dy = (stride * (q // q_res))[:, None] - (k // k_res)[None, :]
    dx = (stride * (q % q_res))[:, None] - (k % k_res)[None, :]
    return dy.abs() * k_res + dx.abs()


def resize_pair_bias(pair: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
    """Resize a (heads, Nq0, Nk0) token-pair bias to (1, heads, nq, nk) as the official code does.

    Bicubic interpolation of the pair matrix as an image (``align_corners=False``). At the
    training size that is exactly the identity (cubic weights 0, 1, 0, 0), so eager mode skips
    it there; under ``torch.compile``/``torch.export`` the resize always runs, keeping the token
    counts symbolic.
    """
    pair = pair.unsqueeze(0)
    if not torch.compiler.is_compiling() and pair.shape[-2] == nq and pair.shape[-1] == nk:
        return pair
    return F.interpolate(pair, size=(nq, nk), mode='bicubic', align_corners=False)


class BiasedAttention(nn.Module):
    """Base of attentions with a learned (heads, R^2) bias table resized to the runtime grid.

    Subclasses define ``attention_biases`` (parameter) and ``attention_bias_idxs`` (buffer).
    """

    attention_biases: nn.Parameter
    attention_bias_idxs: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self._bias_cache: tuple[tuple, torch.Tensor] | None = None

    def attention_bias(self, nq: int, nk: int, dtype: torch.dtype) -> torch.Tensor:
        """(1, heads, nq, nk) additive bias for nq queries and nk keys."""
        table = self.attention_biases
        cacheable = (
            not self.training
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and table.requires_grad)
        )
        if cacheable:
            # the table's version changes with every in-place update (load_state_dict, copy_)
            key = (nq, nk, dtype, table.device, table.data_ptr(), table._version)
            if self._bias_cache is not None and self._bias_cache[0] == key:
                return self._bias_cache[1]
        bias = resize_pair_bias(table[:, self.attention_bias_idxs], nq, nk).to(dtype)
        if cacheable:
            self._bias_cache = (key, bias)
        return bias


class LayerScale(nn.Module):
    """Per-channel scale; ``channel_dim`` is 1 for NCHW maps and -1 for (B, N, C) tokens."""

    def __init__(self, dim: int, init_value: float, channel_dim: int = 1) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))
        self.init_value = init_value
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) or (B, N, C) -> same shape, scaled per channel."""
        if self.channel_dim == 1:
            return x * self.gamma.view(-1, 1, 1)
        return x * self.gamma


@torch.no_grad()
def fuse_conv_bn(
    conv: nn.Conv2d | nn.Linear, bn: nn.Module | None, scale: torch.Tensor | None = None
) -> None:
    """Fold an eval-mode BatchNorm following ``conv`` (and then a per-channel ``scale``) into it.

    ``bn`` may be None or an Identity (nothing to fold). The conv gets a bias if it had none.
    """
    weight = conv.weight
    bias = conv.bias if conv.bias is not None else weight.new_zeros(weight.shape[0])
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        std = (bn.running_var + bn.eps).sqrt()
        factor = bn.weight / std if bn.weight is not None else 1.0 / std
        shift = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
        bias = (bias - bn.running_mean) * factor + shift
        weight = weight * factor.view(-1, *([1] * (weight.dim() - 1)))
    if scale is not None:
        bias = bias * scale
        weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    conv.weight = nn.Parameter(weight.detach().clone())
    conv.bias = nn.Parameter(bias.detach().clone())


def cpu_kernels(x: torch.Tensor) -> bool:
    """Whether to use the CPU-specific formulations below (a static property of the device)."""
    return x.device.type == 'cpu'


def conv_bn(conv: nn.Conv2d, bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x))``; on CPU with an eval-mode BatchNorm, one convolution with the BN folded in.

    In eval mode BatchNorm is a fixed per-channel affine map, so folding it into the (small)
    conv weights on the fly gives the same numbers up to rounding and saves a full pass over the
    activation, which on CPU costs more than the few operations on the weights. On GPUs, where
    those would be extra kernel launches, and for training-mode BatchNorm (batch statistics) the
    two run as usual.
    """
    if (
        not cpu_kernels(x)
        or not isinstance(bn, nn.modules.batchnorm._BatchNorm)
        or bn.training
        or bn.running_var is None
    ):
        return bn(conv(x))
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = -bn.running_mean if conv.bias is None else conv.bias - bn.running_mean
    bias = bias * scale + bn.bias if bn.bias is not None else bias * scale
    return conv._conv_forward(x, conv.weight * scale.view(-1, 1, 1, 1), bias)


class Stem(nn.Module):
    """Two 3x3 stride-2 conv + BN + ReLU: (B, C_in, H, W) -> (B, C, ceil(H/4), ceil(W/4))."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans // 2, 3, stride=2, padding=1)
        self.norm1 = nn.BatchNorm2d(out_chans // 2)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_chans // 2, out_chans, 3, stride=2, padding=1)
        self.norm2 = nn.BatchNorm2d(out_chans)
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C, ceil(H/4), ceil(W/4))."""
        x = self.act1(conv_bn(self.conv1, self.norm1, x))
        return self.act2(conv_bn(self.conv2, self.norm2, x))

    def fuse(self) -> None:
        for conv, norm in (('conv1', 'norm1'), ('conv2', 'norm2')):
            fuse_conv_bn(getattr(self, conv), getattr(self, norm))
            setattr(self, norm, nn.Identity())


class Downsample(nn.Module):
    """3x3 stride-2 conv + BN between stages (rounds odd sizes up)."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, ceil(H/2), ceil(W/2))."""
        return conv_bn(self.conv, self.norm, x)

    def fuse(self) -> None:
        fuse_conv_bn(self.conv, self.norm)
        self.norm = nn.Identity()


class Flat(nn.Module):
    """(B, C, H, W) -> (B, H*W, C) tokens; holds its block index as in the official list."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H*W, C)."""
        return x.flatten(2).transpose(1, 2)


class Pooling(nn.Module):
    """PoolFormer token mixer: k x k average (padding excluded from the count) minus identity.

    On CPU computed as a depthwise convolution with a kernel of ones divided by the number of
    in-image taps: ``AvgPool2d(k, 1, k // 2, count_include_pad=False)`` up to summation order, and
    over 20x faster than PyTorch's CPU average pooling on NCHW maps. Elsewhere the pooling itself.
    """

    def __init__(self, pool_size: int) -> None:
        super().__init__()
        if pool_size % 2 != 1:
            raise ValueError(f'pool_size={pool_size} must be odd (same-size pooling)')
        self.pool_size = pool_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        k, c = self.pool_size, x.shape[1]
        if not cpu_kernels(x):
            return F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False) - x
        ones = x.new_ones(c, 1, k, k)
        total = F.conv2d(x, ones, padding=k // 2, groups=c)
        count = F.conv2d(x.new_ones(1, 1, x.shape[2], x.shape[3]), ones[:1], padding=k // 2)
        return total / count - x


class ConvMlp(nn.Module):
    """1x1 conv + BN + GELU + 1x1 conv + BN on NCHW maps."""

    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        x = self.drop(self.act(conv_bn(self.fc1, self.norm1, x)))
        return self.drop(conv_bn(self.fc2, self.norm2, x))


class Attention(BiasedAttention):
    """Global multi-head attention (LeViT style) with a learned, resized relative bias.

    Sizes are fixed whatever the width, as in the official code: 8 heads, key dim 32, value dim
    ``attn_ratio * 32`` = 128. ``qkv`` lays out each head's [q, k, v] together.
    """

    def __init__(
        self, dim: int, resolution: int, key_dim: int = 32, num_heads: int = 8, attn_ratio: int = 4
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = attn_ratio * key_dim
        self.scale = key_dim**-0.5
        self.resolution = resolution
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Linear(num_heads * self.val_dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        self.register_buffer(
            'attention_bias_idxs', attention_bias_index(resolution, resolution), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C), for any number of tokens N."""
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, self.num_heads, -1).transpose(1, 2)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=-1)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.attention_bias(n, n, q.dtype), scale=self.scale
        )  # (B, heads, N, val_dim)
        return self.proj(x.transpose(1, 2).reshape(b, n, -1))


class MetaBlock2d(nn.Module):
    """Meta4D: pooling token mixer and conv MLP on NCHW maps, each with a layer scale."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float,
        pool_size: int,
        drop: float,
        drop_path: float,
        layer_scale_init_value: float,
    ) -> None:
        super().__init__()
        self.token_mixer = Pooling(pool_size)
        self.ls1 = LayerScale(dim, layer_scale_init_value)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop)
        self.ls2: nn.Module = LayerScale(dim, layer_scale_init_value)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        x = x + self.drop_path(self.ls1(self.token_mixer(x)))
        return x + self.drop_path(self.ls2(self.mlp(x)))

    def fuse(self) -> None:
        mlp = self.mlp
        fuse_conv_bn(mlp.fc1, mlp.norm1)
        scale = self.ls2.gamma if isinstance(self.ls2, LayerScale) else None
        fuse_conv_bn(mlp.fc2, mlp.norm2, scale)
        mlp.norm1, mlp.norm2, self.ls2 = nn.Identity(), nn.Identity(), nn.Identity()


class MetaBlock1d(nn.Module):
    """Meta3D: pre-norm attention and pre-norm MLP on (B, N, C) tokens, with layer scales."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float,
        resolution: int,
        drop: float,
        drop_path: float,
        layer_scale_init_value: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mixer = Attention(dim, resolution)
        self.ls1: nn.Module = LayerScale(dim, layer_scale_init_value, channel_dim=-1)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.ls2: nn.Module = LayerScale(dim, layer_scale_init_value, channel_dim=-1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        x = x + self.drop_path(self.ls1(self.token_mixer(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))

    def fuse(self) -> None:
        for ls, linear in ((self.ls1, self.token_mixer.proj), (self.ls2, self.mlp.fc2)):
            if isinstance(ls, LayerScale):
                fuse_conv_bn(linear, None, ls.gamma)
        self.ls1, self.ls2 = nn.Identity(), nn.Identity()


class EfficientFormerStage(nn.Module):
    """Optional downsampling, Meta4D blocks, then (last stage) Flat and ``num_vit`` Meta3D blocks.

    The block list mirrors the official one, ``Flat`` included, so that block indices (and so
    checkpoint keys) are the official ones.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_vit: int,
        downsample: bool,
        mlp_ratio: float,
        pool_size: int,
        resolution: int,
        drop: float,
        drop_path: Sequence[float],
        layer_scale_init_value: float,
        with_cp: bool,
    ) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        blocks: list[nn.Module] = []
        if num_vit >= depth > 0:
            blocks.append(Flat())
        for j in range(depth):
            if depth - j <= num_vit:
                blocks.append(
                    MetaBlock1d(
                        dim, mlp_ratio, resolution, drop, drop_path[j], layer_scale_init_value
                    )
                )
            else:
                blocks.append(
                    MetaBlock2d(
                        dim, mlp_ratio, pool_size, drop, drop_path[j], layer_scale_init_value
                    )
                )
                # (the official list also ends a stage without attention with a Flat, which
                # holds no index of a block with weights: not built, no needless reshapes)
                if 0 < num_vit == depth - j - 1:
                    blocks.append(Flat())
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C, H', W'), H' = ceil(H / 2) if downsampling else H."""
        x = self.downsample(x)
        h, w = x.shape[2], x.shape[3]
        for block in self.blocks:
            if self.with_cp and x.requires_grad and not isinstance(block, Flat):
                x = cp.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if x.dim() == 3:  # tokens after Flat: back to NCHW through (B, C, N), export-friendly
            x = x.transpose(1, 2).contiguous().view(x.shape[0], x.shape[2], h, w)
        return x


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
@MODELS.register_module()
class EfficientFormer(DenseBackbone):
    """EfficientFormer (v1) backbone with the official dense-prediction behaviour.

    Args:
        arch: One of :attr:`arch_settings` (``l1``, ``l3``, ``l7``), or None to give ``depths``,
            ``widths`` and ``num_vit`` explicitly. Explicit values override the arch's.
        depths: Blocks per stage (Meta4D, and Meta3D at the end of the last stage).
        widths: Channels per stage.
        num_vit: Meta3D (attention) blocks at the end of the last stage.
        layer_scale_init_value: Initial layer scale (1e-5; 1e-6 for L7 in the dense code).
        attn_bias_size: Input side the attention bias table is laid out for: 512 (official
            segmentation, 16x16 tokens), 800 (detection, 25x25) or 224 (ImageNet/timm, 7x7). Any
            input size works with any value; the bias is resized to the actual grid.
        mlp_ratio: MLP hidden width over the block width.
        pool_size: Window of the pooling token mixer.
        in_channels: Input image channels.
        drop_rate: Dropout in the MLPs.
        drop_path_rate: Stochastic depth, increasing linearly from 0 over all blocks.
        out_indices: Stages whose (GroupNorm-normalised) outputs are returned.
        frozen_stages: -1 freezes nothing; 0 the stem; k >= 1 the stem and stages 0..k-1 with
            their output norms.
        norm_eval: Keep BatchNorm layers in eval mode while training.
        with_cp: Gradient checkpointing of every block.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH[, prefix='backbone'])`` loads an
            official dense (segmentation/detection), official ImageNet, timm or effvision
            checkpoint, converted on the fly; otherwise the official random init.
    """

    arch_settings: ClassVar[dict[str, dict[str, Any]]] = {
        # snap-research/EfficientFormer segmentation/backbone.py EfficientFormer_{width,depth}
        'l1': dict(
            depths=(3, 2, 6, 4), widths=(48, 96, 224, 448), num_vit=1, layer_scale_init_value=1e-5
        ),
        'l3': dict(
            depths=(4, 4, 12, 6), widths=(64, 128, 320, 512), num_vit=4, layer_scale_init_value=1e-5
        ),
        'l7': dict(
            depths=(6, 6, 18, 8), widths=(96, 192, 384, 768), num_vit=8, layer_scale_init_value=1e-6
        ),
    }

    def __init__(
        self,
        *,
        arch: str | None = 'l1',
        depths: Sequence[int] | None = None,
        widths: Sequence[int] | None = None,
        num_vit: int | None = None,
        layer_scale_init_value: float | None = None,
        attn_bias_size: int = 512,
        mlp_ratio: float = 4.0,
        pool_size: int = 3,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        norm_eval: bool = False,
        with_cp: bool = False,
        init_cfg: dict | list[dict] | None = None,
    ) -> None:
        settings = self.resolve_arch(arch, depths=depths, widths=widths, num_vit=num_vit)
        if layer_scale_init_value is None:
            layer_scale_init_value = settings.get('layer_scale_init_value', 1e-5)
        depths, widths = tuple(settings['depths']), tuple(settings['widths'])
        num_vit = settings['num_vit']
        if len(depths) != len(widths):
            raise ValueError(f'depths {depths} and widths {widths} differ in length')
        if not 0 <= num_vit <= depths[-1]:
            raise ValueError(f'num_vit={num_vit} must be in [0, depths[-1]={depths[-1]}]')
        if attn_bias_size < 1:
            raise ValueError(f'attn_bias_size={attn_bias_size} must be positive')
        super().__init__(
            num_stages=len(depths),
            out_indices=out_indices,
            frozen_stages=frozen_stages,
            norm_eval=norm_eval,
            init_cfg=init_cfg,
        )
        self.depths, self.widths, self.num_vit = depths, widths, num_vit
        self.layer_scale_init_value = layer_scale_init_value
        self.attn_bias_size = attn_bias_size
        self.num_features = list(widths)
        # the attention runs on the last stage's grid: 2 ** (num_stages + 1) times smaller
        self.attn_resolution = -(-attn_bias_size // 2 ** (len(depths) + 1))

        self.stem = Stem(in_channels, widths[0])
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.stages.append(
                EfficientFormerStage(
                    widths[max(i - 1, 0)],
                    widths[i],
                    depth,
                    num_vit if i == len(depths) - 1 else 0,
                    downsample=i > 0,
                    mlp_ratio=mlp_ratio,
                    pool_size=pool_size,
                    resolution=self.attn_resolution,
                    drop=drop_rate,
                    drop_path=rates[start : start + depth],
                    layer_scale_init_value=self.layer_scale_init_value,
                    with_cp=with_cp,
                )
            )
        for i in self.out_indices:
            self.add_module(f'norm{i}', nn.GroupNorm(1, widths[i]))
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
            ``out_indices`` entry, after its GroupNorm(1, C).
        """
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(getattr(self, f'norm{i}')(x))
        return tuple(outs)

    # -- training utilities --------------------------------------------------------------------
    @torch.no_grad()
    def switch_to_deploy(self) -> EfficientFormer:
        """Fold BatchNorms and layer scales into the convolutions/linears before them.

        For inference: the model is put in eval mode (BatchNorm statistics are frozen into the
        weights) and its state dict loses the folded keys. Calling it again changes nothing.
        """
        if self.deployed:
            return self
        self.eval()
        self.stem.fuse()
        for stage in self.stages:
            if isinstance(stage.downsample, Downsample):
                stage.downsample.fuse()
            for block in stage.blocks:
                if isinstance(block, (MetaBlock2d, MetaBlock1d)):
                    block.fuse()
        self.deployed = True
        return self

    # -- weight init ---------------------------------------------------------------------------
    def init_random_weights(self) -> None:
        """The official init: truncated normal (std 0.02) for linear layers and MLP convs, zero
        biases there, PyTorch defaults for the other convs, zero attention biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear) or (
                isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
            ):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d | nn.BatchNorm2d | nn.LayerNorm | nn.GroupNorm):
                module.reset_parameters()
            elif isinstance(module, LayerScale):
                nn.init.constant_(module.gamma, module.init_value)
            elif isinstance(module, Attention):
                nn.init.zeros_(module.attention_biases)

    def convert_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Convert any supported format (see :func:`detect_format`) to this model's keys.

        Output norms of stages not in ``out_indices`` are left out (the model has none), and
        attention bias tables laid out for another grid are dropped with a warning, as the
        official dense code does with ImageNet tables: they restart from zero.
        """
        converted, fmt = convert_to_effvision(state)
        for i in range(len(self.stages)):
            if i not in self.out_indices:
                converted = {k: v for k, v in converted.items() if not k.startswith(f'norm{i}.')}
        return drop_unfit_bias_tables(self, converted, fmt)


# ---------------------------------------------------------------------------------------------
# official-checkpoint conversion
# ---------------------------------------------------------------------------------------------
# Buffers the official code (and timm v1) store that we rebuild from the configuration, and the
# official dense code's placeholder for the ImageNet table, which its forward never reads.
DERIVED_KEYS = ('attention_bias_idxs', 'attention_bias_idxs_seg')
_DENSE_PLACEHOLDER = 'attention_biases'
_CLS_HEAD_PREFIXES = ('head.', 'dist_head.', 'head_dist.', 'norm.')


def _is_v2(keys: Sequence[str]) -> bool:
    # only EfficientFormerV2 MLPs have the depthwise ``mid`` conv
    return any('.mlp.mid' in k for k in keys)


def detect_format(state: Mapping[str, torch.Tensor]) -> str:
    """Name the format of an EfficientFormer (v1) state dict.

    Returns:
        ``'official_dense'`` (segmentation/backbone.py or detection/backbone.py: ``network.*``
        with ``attention_biases_seg`` or ``norm{0,2,4,6}``), ``'official_cls'`` (the ImageNet
        checkpoints of models/efficientformer.py), ``'timm'`` (``stem.*``/``stages.*`` with a
        classifier or timm's stored index buffer) or ``'effvision'``.

    Raises:
        CheckpointError: Not an EfficientFormer v1 checkpoint (the message says which model
            fits when it is a V2 one).
    """
    keys = list(state)
    if _is_v2(keys):
        raise CheckpointError(
            'this is an EfficientFormerV2 checkpoint (its MLPs have a depthwise mid conv); '
            "build the backbone with type='EfficientFormerV2'"
        )
    if any(k.startswith('network.') for k in keys):
        dense = any(k.endswith('attention_biases_seg') or re.match(r'norm\d+\.', k) for k in keys)
        return 'official_dense' if dense else 'official_cls'
    if any(k.startswith('stages.') for k in keys):
        timm = any(k.startswith(_CLS_HEAD_PREFIXES) or k.endswith(DERIVED_KEYS) for k in keys)
        return 'timm' if timm else 'effvision'
    raise CheckpointError(
        'not an EfficientFormer checkpoint: no key starts with network. (official) or stages. '
        f'(timm/effvision); first keys: {keys[:5]}. For a full segmentor or detector checkpoint '
        "pass prefix='backbone'."
    )


def _official_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official key names -> ours (shared by the dense and ImageNet formats).

    ``network.2i`` holds stage i's blocks and ``network.2i-1`` the downsampling into stage i
    (every published model downsamples between all stages).
    """
    stem = {'0': 'conv1', '1': 'norm1', '3': 'conv2', '4': 'norm2'}
    out = {}
    for key, value in state.items():
        new = key
        if m := re.match(r'patch_embed\.(\d)\.(.*)', key):
            new = f'stem.{stem[m[1]]}.{m[2]}'
        elif m := re.match(r'network\.(\d+)\.(proj|norm)\.(.*)', key):
            part = 'conv' if m[2] == 'proj' else 'norm'
            new = f'stages.{(int(m[1]) + 1) // 2}.downsample.{part}.{m[3]}'
        elif m := re.match(r'network\.(\d+)\.(\d+)\.(.*)', key):
            new = f'stages.{int(m[1]) // 2}.blocks.{m[2]}.{m[3]}'
        elif m := re.match(r'norm(\d+)\.(.*)', key):
            new = f'norm{int(m[1]) // 2}.{m[2]}'
        new = re.sub(r'layer_scale_(\d)$', r'ls\1.gamma', new)
        out[new] = value
    return out


def convert_official_dense(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official dense checkpoint (segmentation or detection ``*_feat``) -> effvision keys.

    The used table ``attention_biases_seg`` becomes ``attention_biases``; the unused ImageNet
    placeholder and the index buffers are dropped.
    """
    kept = {}
    for key, value in state.items():
        if key.endswith(DERIVED_KEYS) or key.endswith('.' + _DENSE_PLACEHOLDER):
            continue
        if key.endswith('attention_biases_seg'):
            key = key[: -len('_seg')]
        kept[key] = value
    return _official_names(kept)


def convert_official_cls(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ImageNet checkpoint -> effvision keys: heads, final norm and index buffers dropped.

    The 7x7 bias tables are kept; a model laid out for another grid drops them on load.
    """
    return _official_names(convert_timm(state))  # timm drops the same heads and buffers


def convert_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``efficientformer_l*`` checkpoint -> effvision keys (same layout, heads dropped)."""
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
    """Detect the format of a v1 state dict and convert it; returns (state, format)."""
    fmt = detect_format(state)
    return _CONVERTERS[fmt](state), fmt


def drop_unfit_bias_tables(
    model: nn.Module, state: dict[str, torch.Tensor], fmt: str
) -> dict[str, torch.Tensor]:
    """Leave out ``attention_biases`` whose shape does not fit ``model`` and say so.

    A table belongs to one token grid; the official dense code re-learns the ImageNet tables from
    zero (they land in an unused buffer), and so do we, for every format.
    """
    own = model.state_dict()
    unfit = [
        k
        for k, v in state.items()
        if k.endswith('attention_biases') and k in own and own[k].shape != v.shape
    ]
    if unfit:
        print_log(
            f'{type(model).__name__}: {len(unfit)} attention bias tables of the {fmt} checkpoint '
            f'are laid out for another token grid ({tuple(state[unfit[0]].shape)} vs '
            f'{tuple(own[unfit[0]].shape)}) and start from zero, as in the official dense code. '
            'To use them, build the model with the attn_bias_size they were trained at '
            '(224 ImageNet, 512 segmentation, 800 detection).',
            logger='current',
            level=logging.WARNING,
        )
    return {k: v for k, v in state.items() if k not in unfit}
