"""Next-ViT backbone for dense prediction.

Li et al., "Next-ViT: Next Generation Vision Transformer for Efficient Deployment in Realistic
Industrial Scenarios", arXiv 2207.05501, 2022. Reference: the official dense code,
bytedance/Next-ViT ``segmentation/nextvit.py`` (class ``NextViT``) and ``segmentation/utils.py``
(``merge_pre_bn``) @ 922e771, as the segmentation configs run it, i.e. with the final ``norm``
that commit 42bc7b8 commented out (file @ d5936ea); ``detection/nextvit.py`` is the same model.
Our outputs match it to float64 round-off. Written anew; what differs and why:

* Stage widths are an argument (``block_channels``, one width per block) instead of a table
  hard-coded in ``__init__``; the default is the official table, so every published variant is
  unchanged.
* E-MHSA works on NCHW maps: the spatial reduction pools the flattened (B, C, H*W) view directly
  (no transposes), attention runs through ``F.scaled_dot_product_attention``, and H and W stay
  symbolic under ``torch.export`` (no size-dependent Python branches; the ceil-mode pooling of the
  patch embeddings has a bit-identical export form).
* The per-stage output norms of the dense model are ``norm0``..``norm3`` (official
  ``extra_norm_list.0..2`` and ``norm``); the never-used ``extra_norm_list.3`` and the classifier
  ``proj_head`` are not built. There are no derived buffers.
* :meth:`NextViT.switch_to_deploy` (alias ``merge_bn``) folds the pre-norm BatchNorms exactly as
  the official ``merge_bn`` does, but replaces the folded norms by ``nn.Identity``: the deployed
  state dict has no stale BatchNorms (the official one keeps them and applies them twice when
  reloaded), and the forward no longer skips BatchNorms whenever ``torch.onnx.is_in_onnx_export()``
  (the official forward does, so exporting an unmerged model is silently wrong).
* ``frozen_stages`` follows effvision's (mmseg's) convention: 0 freezes the stem and k >= 1 the
  stem, stages 0..k-1 and their output norms; the official code freezes nothing for 0 and leaves
  the extra norms trainable. Every official recipe (-1 for segmentation, 1 without extra norms for
  detection) behaves the same under both.

Behaviour of the official code that we keep on purpose (the released weights depend on it):
the extra norms sit *in the trunk* (the normalised map feeds the next stage); E-MHSA's spatial
reduction is a 1-D average over runs of ``sr**2`` consecutive row-major tokens (crossing row
boundaries, bytedance/Next-ViT#2), not 2-D ``sr x sr`` pooling, and it drops the leftover tokens.

Any-size policy (the official one, there is no padding): every stride-2 step rounds up. The stem
convolutions (3x3, stride 2, padding 1) give ``ceil(H / 2)``; the stride-2 patch embeddings
average 2x2 windows with ``ceil_mode=True`` and ``count_include_pad=False`` (partial windows at
the border average their valid pixels). Stage i therefore has ``ceil(H / 2**(i + 2))`` rows for
the default strides. E-MHSA needs at least ``sr**2`` tokens: inputs below about 32x32 are refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from timm.layers import DropPath, trunc_normal_
from torch import nn

from effvision.models.backbones.base import DenseBackbone
from effvision.models.layers.window import pad_to_multiple
from effvision.registry import MODELS
from effvision.utils.checkpoint import CheckpointError

__all__ = [
    'NextViT',
    'NEXTVIT_ARCHS',
    'UNUSED_KEYS',
    'convert_official',
    'convert_timm',
    'detect_format',
    'official_block_channels',
    'padded_avg_pool_2x2',
]

NORM_EPS = 1e-5

# builds a norm layer for (channels, rank): rank 2 for (B, C, H, W) maps, 1 for (B, C, L)
NormFactory = Callable[..., nn.Module]


def make_divisible(value: float, divisor: int) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``divisor``), never more
    than 10% below it: the rounding the official code uses for hidden and attention widths."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _norm_factory(norm_cfg: Mapping | None) -> NormFactory:
    """BatchNorm (``None`` or ``type='BN'``) or SyncBatchNorm (``type='SyncBN'``) of any rank."""
    cfg = dict(norm_cfg or {})
    kind = cfg.pop('type', 'BN')
    requires_grad = cfg.pop('requires_grad', True)
    eps = cfg.pop('eps', NORM_EPS)
    if cfg:
        raise ValueError(f'unsupported norm_cfg keys {sorted(cfg)}; use type, eps, requires_grad')
    if kind not in ('BN', 'SyncBN'):
        raise ValueError(f"norm_cfg type {kind!r} is not supported; use 'BN' or 'SyncBN'")

    def build(channels: int, rank: int = 2) -> nn.Module:
        if kind == 'SyncBN':
            norm = nn.SyncBatchNorm(channels, eps=eps)
        else:
            norm = (nn.BatchNorm2d if rank == 2 else nn.BatchNorm1d)(channels, eps=eps)
        for param in norm.parameters():
            param.requires_grad = requires_grad
        return norm

    return build


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
class ConvNormAct(nn.Module):
    """3x3 convolution (padding 1, no bias) + BatchNorm + ReLU: one stem layer."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.norm = norm(out_chs)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride))."""
        return self.act(self.norm(self.conv(x)))


def avg_pool_2x2_ceil(x: torch.Tensor) -> torch.Tensor:
    """2x2 stride-2 average pooling that rounds up and averages only the valid pixels of partial
    windows: ``nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)``, bit for bit.

    Under ``torch.export`` the ``ceil_mode`` shape formula makes the exporter guard on sizes it
    cannot reason about (the exported program then only accepts multiples of 32), so there we
    zero-pad odd sizes to even ones and divide by the pooled valid-pixel mask, which keeps H and
    W symbolic. Both averages divide by 4, so the quotient is the official sum / count exactly
    (powers of two); eager mode keeps the single kernel, 2-3x faster than pad + pool + divide.
    """
    if not torch.compiler.is_exporting():
        return F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)
    return padded_avg_pool_2x2(x)


def padded_avg_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """Export form of :func:`avg_pool_2x2_ceil`: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""
    mask = x.new_ones((1, 1, x.shape[2], x.shape[3]))
    total = F.avg_pool2d(pad_to_multiple(x, 2, dims=(2, 3)), 2)
    return total / F.avg_pool2d(pad_to_multiple(mask, 2, dims=(2, 3)), 2)


class PatchEmbed(nn.Module):
    """Stride-2 2x2 average pooling and/or a 1x1 conv + BN to change the width; else identity."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        self.stride = stride
        if stride == 2 or in_chs != out_chs:
            self.conv = nn.Conv2d(in_chs, out_chs, 1, bias=False)
            self.norm = norm(out_chs)
        else:
            self.conv = nn.Identity()
            self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride))."""
        if self.stride == 2:
            x = avg_pool_2x2_ceil(x)
        return self.norm(self.conv(x))


class MHCA(nn.Module):
    """Multi-head convolutional attention: grouped 3x3 conv (one group per head) + BN + ReLU +
    1x1 projection."""

    def __init__(self, channels: int, head_dim: int, norm: NormFactory) -> None:
        super().__init__()
        self.group_conv3x3 = nn.Conv2d(
            channels, channels, 3, padding=1, groups=channels // head_dim, bias=False
        )
        self.norm = norm(channels)
        self.act = nn.ReLU(inplace=True)
        self.projection = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return self.projection(self.act(self.norm(self.group_conv3x3(x))))


class Mlp(nn.Module):
    """1x1 conv -> ReLU -> 1x1 conv, hidden width ``make_divisible(C * ratio, 32)``."""

    def __init__(self, channels: int, mlp_ratio: float, drop: float) -> None:
        super().__init__()
        hidden = make_divisible(channels * mlp_ratio, 32)
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden, channels, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return self.drop(self.conv2(self.drop(self.act(self.conv1(x)))))


@torch.no_grad()
def fold_pre_norm(layer: nn.Linear | nn.Conv2d, *norms: nn.Module) -> None:
    """Fold eval-mode BatchNorms applied (in order) to the input of a 1x1 conv or linear layer.

    ``layer(bn_n(...bn_1(x)))`` becomes ``layer'(x)``: each BatchNorm is the per-channel affine
    map ``x * s + t`` (``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``), so their
    composition is one affine map ``x * a + b``, and
    ``W (x * a + b) + c = (W diag(a)) x + (W b + c)``.
    """
    weight = layer.weight.view(layer.weight.shape[0], -1)  # (out, in) for both layer types
    if weight.shape[1] != layer.weight.shape[1]:
        raise ValueError('only 1x1 convolutions can absorb a preceding BatchNorm')
    scale = torch.ones_like(weight[0])
    shift = torch.zeros_like(weight[0])
    for norm in norms:
        s = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        scale, shift = scale * s, shift * s + (norm.bias - norm.running_mean * s)
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros_like(weight[:, 0]))
    layer.bias.add_(weight @ shift)
    weight.mul_(scale)


class NCB(nn.Module):
    """Next Convolution Block: patch embedding, MHCA residual, pre-norm MLP residual."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        *,
        stride: int,
        drop_path: float,
        drop: float,
        head_dim: int,
        mlp_ratio: float,
        norm: NormFactory,
        deploy: bool,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(in_chs, out_chs, stride, norm)
        self.mhca = MHCA(out_chs, head_dim, norm)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm = nn.Identity() if deploy else norm(out_chs)
        self.mlp = Mlp(out_chs, mlp_ratio, drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def switch_to_deploy(self) -> None:
        if not isinstance(self.norm, nn.Identity):
            fold_pre_norm(self.mlp.conv1, self.norm)
            self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride))."""
        x = self.patch_embed(x)
        x = x + self.drop_path1(self.mhca(x))
        return x + self.drop_path2(self.mlp(self.norm(x)))


class EfficientMHSA(nn.Module):
    """Multi-head self-attention whose keys and values come from spatially reduced tokens.

    The reduction averages runs of ``sr**2`` consecutive tokens of the row-major flattened map
    (as the official ``nn.AvgPool1d`` does; leftover tokens are dropped) and normalises them with
    a BatchNorm1d.
    """

    def __init__(
        self,
        dim: int,
        *,
        head_dim: int,
        sr_ratio: int,
        attn_drop: float,
        proj_drop: float,
        norm: NormFactory,
        deploy: bool,
    ) -> None:
        super().__init__()
        self.num_heads = dim // head_dim
        self.scale = head_dim**-0.5
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        self.pool = sr_ratio**2
        if sr_ratio > 1:
            self.norm = nn.Identity() if deploy else norm(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend from every token to the reduced tokens.

        Args:
            x: (B, C, H, W) normalised map, H * W >= sr**2.

        Returns:
            (B, C, H, W).
        """
        b, c, h, w = x.shape
        flat = x.flatten(2)  # (B, C, N), a view
        tokens = flat.transpose(1, 2)  # (B, N, C)
        q = self.q(tokens).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        if self.sr_ratio > 1:
            torch._check(
                h * w >= self.pool,
                lambda: (
                    f'Next-ViT input too small: E-MHSA averages runs of {self.pool} tokens but '
                    f'this stage has a {h}x{w} map; pad or resize the image (32x32 always works)'
                ),
            )
            # the pooled (B, C, N // sr^2) map is tiny: normalise it channels-first, then transpose
            tokens = self.norm(F.avg_pool1d(flat, self.pool, self.pool)).transpose(1, 2)
        k = self.k(tokens).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        v = self.v(tokens).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )  # (B, heads, N, head_dim)
        out = self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))  # (B, N, C)
        return out.unflatten(1, (h, w)).permute(0, 3, 1, 2)

    def fold_pre_norm(self, pre_norm: nn.Module) -> None:
        """Fold the block's pre-norm (and the pooled-token norm, for k and v) into q, k, v."""
        fold_pre_norm(self.q, pre_norm)
        post = [] if self.sr_ratio == 1 else [self.norm]
        # averaging commutes with a per-channel affine map, so norm(pool(pre_norm(x))) is the
        # composition of the two affine maps applied to pool(x)
        fold_pre_norm(self.k, pre_norm, *post)
        fold_pre_norm(self.v, pre_norm, *post)
        if self.sr_ratio > 1:
            self.norm = nn.Identity()


class NTB(nn.Module):
    """Next Transformer Block: E-MHSA on ``mhsa_chs`` channels, then MHCA on a 1x1 projection to
    the remaining channels, concatenated, then a pre-norm MLP residual."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        *,
        stride: int,
        sr_ratio: int,
        drop_path: float,
        drop: float,
        attn_drop: float,
        head_dim: int,
        mix_block_ratio: float,
        mlp_ratio: float,
        norm: NormFactory,
        deploy: bool,
    ) -> None:
        super().__init__()
        self.mhsa_chs = make_divisible(int(out_chs * mix_block_ratio), 32)
        self.mhca_chs = out_chs - self.mhsa_chs
        self.patch_embed = PatchEmbed(in_chs, self.mhsa_chs, stride, norm)
        self.norm1 = nn.Identity() if deploy else norm(self.mhsa_chs)
        self.e_mhsa = EfficientMHSA(
            self.mhsa_chs,
            head_dim=head_dim,
            sr_ratio=sr_ratio,
            attn_drop=attn_drop,
            proj_drop=drop,
            norm=norm,
            deploy=deploy,
        )
        rate = drop_path * mix_block_ratio
        self.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
        self.projection = PatchEmbed(self.mhsa_chs, self.mhca_chs, 1, norm)
        self.mhca = MHCA(self.mhca_chs, head_dim, norm)
        rate = drop_path * (1 - mix_block_ratio)
        self.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()
        self.norm2 = nn.Identity() if deploy else norm(out_chs)
        self.mlp = Mlp(out_chs, mlp_ratio, drop)
        self.drop_path3 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def switch_to_deploy(self) -> None:
        if not isinstance(self.norm1, nn.Identity):
            self.e_mhsa.fold_pre_norm(self.norm1)
            self.norm1 = nn.Identity()
        if not isinstance(self.norm2, nn.Identity):
            fold_pre_norm(self.mlp.conv1, self.norm2)
            self.norm2 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride))."""
        x = self.patch_embed(x)
        x = x + self.drop_path1(self.e_mhsa(self.norm1(x)))
        out = self.projection(x)
        out = out + self.drop_path2(self.mhca(out))
        x = torch.cat([x, out], dim=1)
        return x + self.drop_path3(self.mlp(self.norm2(x)))


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
NEXTVIT_ARCHS: dict[str, dict] = {
    # name: stem widths and blocks per stage (official segmentation/nextvit.py nextvit_*)
    'small': dict(stem_channels=(64, 32, 64), depths=(3, 4, 10, 3)),
    'base': dict(stem_channels=(64, 32, 64), depths=(3, 4, 20, 3)),
    'large': dict(stem_channels=(64, 32, 64), depths=(3, 4, 30, 3)),
}


def official_block_channels(depths: Sequence[int]) -> list[list[int]]:
    """The official per-block width table of the Next Hybrid Strategy for ``depths``."""
    return [
        [96] * depths[0],
        [192] * (depths[1] - 1) + [256],
        [384, 384, 384, 384, 512] * (depths[2] // 5),
        [768] * (depths[3] - 1) + [1024],
    ]


def _block_types(depths: Sequence[int]) -> list[list[type[nn.Module]]]:
    """Next Hybrid Strategy: NTB closes stages 1 and 3 and every group of five in stage 2."""
    return [
        [NCB] * depths[0],
        [NCB] * (depths[1] - 1) + [NTB],
        [NCB, NCB, NCB, NCB, NTB] * (depths[2] // 5),
        [NCB] * (depths[3] - 1) + [NTB],
    ]


@MODELS.register_module()
class NextViT(DenseBackbone):
    """Next-ViT backbone with the official dense-prediction behaviour.

    Args:
        arch: One of :data:`NEXTVIT_ARCHS` (``small``, ``base``, ``large``), or None to give
            ``stem_channels`` and ``depths`` explicitly. Explicit values override the arch's.
        stem_channels: Widths of the stem convolutions (the 4th repeats the 3rd).
        depths: Blocks per stage; ``depths[2]`` must be a multiple of 5.
        block_channels: Output width of every block, one list per stage; None for the official
            table (96 | 192.., 256 | 384 x4, 512 .. | 768.., 1024).
        strides: Stride of each stage's first block (1 or 2).
        sr_ratios: E-MHSA spatial-reduction ratio per stage.
        head_dim: Channels per attention head (MHCA groups and E-MHSA heads).
        mix_block_ratio: Share of an NTB's width given to E-MHSA (rounded to a multiple of 32).
        in_channels: Input image channels.
        drop_rate: Dropout in the MLPs and after the attention projection.
        attn_drop_rate: Dropout on attention probabilities.
        drop_path_rate: Stochastic depth, increasing linearly from 0 to this over all blocks
            (0.2 in the official segmentation and B/L detection recipes, 0.1 for S detection).
        with_extra_norm: BatchNorm after every stage, applied in the trunk (the segmentation
            recipes and checkpoints); False for the detection recipes and checkpoints.
        norm_cfg: None or ``dict(type='BN'|'SyncBN', eps=1e-5, requires_grad=True)`` for every
            BatchNorm (the official segmentation configs use SyncBN).
        out_indices: Stages whose outputs are returned.
        frozen_stages: -1 freezes nothing; 0 freezes the stem; k >= 1 freezes the stem and stages
            0..k-1 with their output norms.
        norm_eval: Keep BatchNorm layers in eval mode while training.
        with_cp: Gradient checkpointing of every block (saves memory, costs one extra forward).
        deploy: Build the deployed form directly (pre-norms folded, see
            :meth:`switch_to_deploy`), to load a deployed state dict.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH[, prefix='backbone'])`` loads an
            official (segmentation, classification or detection), timm or effvision checkpoint,
            converting it on the fly.
    """

    arch_settings = NEXTVIT_ARCHS
    #: Norms only the dense model has; ``norm3`` is the ImageNet classifier's final ``norm``.
    dense_only_modules = ('norm0', 'norm1', 'norm2')

    def __init__(
        self,
        *,
        arch: str | None = 'small',
        stem_channels: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
        block_channels: Sequence[Sequence[int]] | None = None,
        strides: Sequence[int] = (1, 2, 2, 2),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        head_dim: int = 32,
        mix_block_ratio: float = 0.75,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        with_extra_norm: bool = True,
        norm_cfg: dict | None = None,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        norm_eval: bool = False,
        with_cp: bool = False,
        deploy: bool = False,
        init_cfg: dict | list[dict] | None = None,
    ) -> None:
        settings = self.resolve_arch(arch, stem_channels=stem_channels, depths=depths)
        stem_channels, depths = tuple(settings['stem_channels']), tuple(settings['depths'])
        if block_channels is None:
            block_channels = official_block_channels(depths)
        block_channels = [list(stage) for stage in block_channels]
        self._check_settings(
            stem_channels, depths, block_channels, strides, sr_ratios, head_dim, mix_block_ratio
        )
        super().__init__(
            num_stages=4,
            out_indices=out_indices,
            frozen_stages=frozen_stages,
            norm_eval=norm_eval,
            init_cfg=init_cfg,
        )
        self.stem_channels = stem_channels
        self.depths = depths
        self.block_channels = block_channels
        self.with_extra_norm = with_extra_norm
        self.with_cp = with_cp
        self.deploy = deploy
        self.num_features = [stage[-1] for stage in block_channels]
        norm = _norm_factory(norm_cfg)

        self.stem = nn.Sequential(
            ConvNormAct(in_channels, stem_channels[0], 2, norm),
            ConvNormAct(stem_channels[0], stem_channels[1], 1, norm),
            ConvNormAct(stem_channels[1], stem_channels[2], 1, norm),
            ConvNormAct(stem_channels[2], stem_channels[2], 2, norm),
        )
        # official stochastic depth rule: linspace over all blocks
        rates = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        blocks: list[nn.Module] = []
        in_chs = stem_channels[2]
        for stage, types in enumerate(_block_types(depths)):
            for j, block_type in enumerate(types):
                common = dict(
                    stride=strides[stage] if j == 0 else 1,
                    drop_path=rates[len(blocks)],
                    drop=drop_rate,
                    head_dim=head_dim,
                    norm=norm,
                    deploy=deploy,
                )
                out_chs = block_channels[stage][j]
                if block_type is NCB:
                    block = NCB(in_chs, out_chs, mlp_ratio=3, **common)
                else:
                    block = NTB(
                        in_chs,
                        out_chs,
                        sr_ratio=sr_ratios[stage],
                        attn_drop=attn_drop_rate,
                        mix_block_ratio=mix_block_ratio,
                        mlp_ratio=2,
                        **common,
                    )
                blocks.append(block)
                in_chs = out_chs
        self.features = nn.ModuleList(blocks)
        # index of the last block of each stage
        self.stage_ends = [sum(depths[: i + 1]) - 1 for i in range(4)]
        if with_extra_norm:
            for i, channels in enumerate(self.num_features):
                self.add_module(f'norm{i}', norm(channels))
        reduction = 4
        self.feature_info = []
        for i in range(4):
            reduction *= strides[i]
            if i in self.out_indices:
                module = f'norm{i}' if with_extra_norm else f'features.{self.stage_ends[i]}'
                self.feature_info.append(
                    dict(num_chs=self.num_features[i], reduction=reduction, module=module)
                )
        self._freeze_stages()

    @staticmethod
    def _check_settings(
        stem_channels, depths, block_channels, strides, sr_ratios, head_dim, mix_block_ratio
    ) -> None:
        if len(stem_channels) != 3:
            raise ValueError(f'stem_channels must have 3 widths, got {tuple(stem_channels)}')
        if len(depths) != 4 or min(depths) < 1 or depths[2] % 5:
            raise ValueError(
                f'depths {tuple(depths)} must be 4 positive block counts with depths[2] a '
                'multiple of 5 (stage 3 repeats NCB x4 + NTB), e.g. (3, 4, 10, 3)'
            )
        if len(strides) != 4 or any(s not in (1, 2) for s in strides):
            raise ValueError(f'strides {tuple(strides)} must be 4 values in (1, 2)')
        if len(sr_ratios) != 4 or min(sr_ratios) < 1:
            raise ValueError(f'sr_ratios {tuple(sr_ratios)} must be 4 positive integers')
        shape = [len(stage) for stage in block_channels]
        if shape != list(depths):
            raise ValueError(f'block_channels has {shape} blocks per stage, depths say {depths}')
        for stage, types in enumerate(_block_types(depths)):
            for j, block_type in enumerate(types):
                chs = block_channels[stage][j]
                widths = [chs]
                if block_type is NTB:
                    mhsa = make_divisible(int(chs * mix_block_ratio), 32)
                    widths = [mhsa, chs - mhsa]
                if min(widths) <= 0 or any(w % head_dim for w in widths):
                    raise ValueError(
                        f'block {j} of stage {stage + 1} ({block_type.__name__}, {chs} channels) '
                        f'needs branch widths {widths} that are positive multiples of '
                        f'head_dim={head_dim}; NTB widths split as make_divisible(0.75 C, 32) for '
                        f'E-MHSA and the rest for MHCA (mix_block_ratio={mix_block_ratio})'
                    )

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Extract multi-scale features.

        Args:
            x: (B, C_in, H, W) images of any size from about 32x32 up.

        Returns:
            One (B, num_features[i], H_i, W_i) tensor per ``out_indices`` entry, NCHW, with
            ``H_i = ceil(H / reduction_i)`` (every stride-2 step rounds up).
        """
        x = self.stem(x)
        outs = []
        stage = 0
        checkpointing = self.with_cp and torch.is_grad_enabled()
        for idx, block in enumerate(self.features):
            if checkpointing:
                x = cp.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if idx == self.stage_ends[stage]:
                if self.with_extra_norm:
                    x = getattr(self, f'norm{stage}')(x)  # in the trunk, as officially
                if stage in self.out_indices:
                    outs.append(x)
                stage += 1
        return tuple(outs)

    # -- deployment ----------------------------------------------------------------------------
    def switch_to_deploy(self) -> NextViT:
        """Fold every pre-norm BatchNorm into the 1x1 conv / linear layers after it (eval mode).

        As the official ``merge_bn``: an NCB's ``norm`` goes into ``mlp.conv1``; an NTB's
        ``norm1`` into ``e_mhsa.q/k/v`` (with the pooled-token ``e_mhsa.norm`` for k and v when
        sr > 1) and ``norm2`` into ``mlp.conv1``. Folded norms become ``nn.Identity``. The model
        is put in eval mode (the folding uses the running statistics). Idempotent.
        """
        self.eval()
        for block in self.features:
            block.switch_to_deploy()
        self.deploy = True
        return self

    merge_bn = switch_to_deploy  # the official name

    # -- training utilities --------------------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        frozen: list[nn.Module] = [self.stem]
        for stage in range(min(self.frozen_stages, 4)):
            start = self.stage_ends[stage - 1] + 1 if stage else 0
            frozen.extend(self.features[start : self.stage_ends[stage] + 1])
            if self.with_extra_norm:
                frozen.append(getattr(self, f'norm{stage}'))
        return frozen

    # -- weight init ---------------------------------------------------------------------------
    def init_random_weights(self) -> None:
        """The official init: truncated normal (std 0.02) for convs and linears, zero biases,
        unit BatchNorms."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def convert_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Official (segmentation, classification, detection), timm or effvision weights to ours.

        Without extra norms (the detection form), the classifier's final ``norm`` of an ImageNet
        checkpoint is dropped, as the official detection code ignores it; stage norms of a
        segmentation checkpoint are kept, so that loading reports them as unexpected.

        Raises:
            CheckpointError: Not a Next-ViT checkpoint, or its deploy form differs from the
                model's.
        """
        fmt = detect_format(state)
        state = convert_timm(state) if fmt == 'timm' else convert_official(state)
        if not self.with_extra_norm and not any(k.startswith(('norm0.', 'norm1.')) for k in state):
            state = {k: v for k, v in state.items() if not k.startswith('norm3.')}
        deployed = _is_deployed(state)
        if deployed is not None and deployed != self.deploy:
            raise CheckpointError(
                'the checkpoint is in the deploy form (pre-norms folded) but the model is not; '
                'build it with deploy=True'
                if deployed
                else 'the checkpoint is in the training form but the model was built with '
                'deploy=True; build it with deploy=False, load, then call switch_to_deploy()'
            )
        return state


# ---------------------------------------------------------------------------------------------
# official-checkpoint conversion
# ---------------------------------------------------------------------------------------------
#: Checkpoint tensors no effvision module uses: the classifier head (official ``proj_head``,
#: timm ``head``) and the official dense model's ``extra_norm_list.3``, built but never applied.
#: Next-ViT has no derived buffers (index tables, masks) to drop.
UNUSED_KEYS = ('proj_head.', 'head.', 'extra_norm_list.3.')

_TIMM_BLOCK = re.compile(r'^stages[._](\d+)\.blocks\.(\d+)\.(.*)$')
_EXTRA_NORM = re.compile(r'^extra_norm_list\.([0-2])\.(.*)$')


def detect_format(state: Mapping[str, torch.Tensor]) -> str:
    """Name the layout of a Next-ViT state dict.

    Returns:
        ``'timm'`` (``stages.i.blocks.j``, ``head.fc``), ``'official-seg'`` (dense model with
        ``extra_norm_list``), ``'official-cls'`` (ImageNet: final ``norm`` and ``proj_head``),
        ``'effvision'`` (``norm0``..``norm3``) or ``'official-det'`` (stem and features only;
        effvision's model without extra norms has the same keys).

    Raises:
        CheckpointError: No Next-ViT key found.
    """
    keys = list(state)
    if any(_TIMM_BLOCK.match(k) for k in keys):
        return 'timm'
    if not any(k.startswith('features.') for k in keys):
        hint = (
            ' Keys start with backbone.: pass prefix="backbone".'
            if any(k.startswith('backbone.') for k in keys)
            else ''
        )
        raise CheckpointError(
            'not a Next-ViT checkpoint: no key starts with features. (official, effvision) or '
            f'stages.i.blocks. (timm); first keys: {keys[:5]}.{hint}'
        )
    if any(k.startswith('extra_norm_list.') for k in keys):
        return 'official-seg'
    if any(k.startswith(('proj_head.', 'norm.')) for k in keys):
        return 'official-cls'
    if any(re.match(r'^norm\d\.', k) for k in keys):
        return 'effvision'
    return 'official-det'


def convert_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Next-ViT weights (any of the three forms) to effvision's names.

    The official segmentation (``extra_norm_list.0..3`` + ``norm``), classification (``norm`` +
    ``proj_head``) and detection (neither) models share the stem and block names with ours;
    ``extra_norm_list.i`` becomes ``norm{i}``, the final ``norm`` (stage-4 output norm of the
    dense model, classifier norm of the ImageNet one, loaded as such by the official dense code)
    becomes ``norm3``, and :data:`UNUSED_KEYS` are dropped. effvision's keys pass unchanged.
    """
    out = {}
    for key, value in state.items():
        if key.startswith(UNUSED_KEYS):
            continue
        match = _EXTRA_NORM.match(key)
        if match:
            key = f'norm{match[1]}.{match[2]}'
        elif key.startswith('norm.'):
            key = 'norm3.' + key[len('norm.') :]
        out[key] = value
    return out


def convert_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``nextvit_*`` weights (model or ``features_only`` names) to effvision's names.

    ``stages.i.blocks.j`` becomes the flat ``features.k`` (block counts read from the keys),
    ``mlp.fc1/fc2`` become ``mlp.conv1/conv2``, the final ``norm`` becomes ``norm3`` (as for the
    official ImageNet checkpoints), and the classifier ``head`` is dropped.
    """
    counts: dict[int, int] = {}
    for key in state:
        match = _TIMM_BLOCK.match(key)
        if match:
            stage, block = int(match[1]), int(match[2])
            counts[stage] = max(counts.get(stage, 0), block + 1)
    offsets = {s: sum(counts.get(t, 0) for t in range(s)) for s in counts}
    out = {}
    for key, value in state.items():
        if key.startswith(UNUSED_KEYS):
            continue
        match = _TIMM_BLOCK.match(key)
        if match:
            rest = match[3].replace('mlp.fc1.', 'mlp.conv1.').replace('mlp.fc2.', 'mlp.conv2.')
            key = f'features.{offsets[int(match[1])] + int(match[2])}.{rest}'
        elif key.startswith('norm.'):
            key = 'norm3.' + key[len('norm.') :]
        out[key] = value
    return out


def _is_deployed(state: Mapping[str, torch.Tensor]) -> bool | None:
    """Whether converted weights have their pre-norms folded (None: no block to tell)."""
    forms = set()
    for key in state:
        match = re.match(r'^features\.(\d+)\.mlp\.conv1\.weight$', key)
        if match:
            prefix = f'features.{match[1]}.'
            transformer = prefix + 'norm2.weight' in state or prefix + 'e_mhsa.q.weight' in state
            forms.add(prefix + ('norm2.weight' if transformer else 'norm.weight') not in state)
    return None if len(forms) != 1 else forms.pop()
